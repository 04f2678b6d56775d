"""The exact score as rayhybrid.evaluation.search defines it, computed the simplest way.

One product of the whole matrices (no shards, tiles, heaps or partial sorts): float32 by the
BLAS the process's shape check picked (``search.f32_backend``: numpy's OpenBLAS, or torch's
MKL where OpenBLAS's AVX2 kernels fail it), padded with zero rows so that it runs the blocked
sgemm kernels; float64-accumulated and rounded to float32 where no BLAS passes.
"""

from __future__ import annotations

import numpy as np
import torch

from rayhybrid.evaluation.search import f32_backend


def reference_scores(q: np.ndarray, c: np.ndarray) -> np.ndarray:
    """``[len(q), len(c)]`` float32 scores."""
    backend = f32_backend()
    if backend is None:
        return (q.astype(np.float64) @ c.astype(np.float64).T).astype(np.float32)
    pad = max(512, len(q), len(c))
    qp, cp = np.zeros((pad, q.shape[1]), np.float32), np.zeros((pad, c.shape[1]), np.float32)
    qp[: len(q)], cp[: len(c)] = q, c
    s = (torch.from_numpy(qp) @ torch.from_numpy(cp).T).numpy() if backend == "torch" else qp @ cp.T
    return s[: len(q), : len(c)]
