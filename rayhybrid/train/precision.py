"""``train.precision`` on the device a worker got: bf16 autocast only where bf16 is native."""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch

__all__ = ["autocast", "cpu_has_native_bf16", "cpuinfo_has_bf16", "resolve_precision"]


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True when this CPU computes bf16 matmuls in hardware (AVX512-BF16, AMX or Arm BF16).

    Without them PyTorch emulates bf16 on the CPU, several times slower than fp32 (measured on
    an AVX-512 Xeon without AVX512-BF16: README, benchmarks). Linux only; elsewhere False.
    """
    try:
        return cpuinfo_has_bf16(Path("/proc/cpuinfo").read_text())
    except OSError:
        return False


def cpuinfo_has_bf16(text: str) -> bool:
    """Whether a ``/proc/cpuinfo`` text lists a bf16 matmul unit (x86 ``flags`` or Arm
    ``Features``)."""
    flags = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")) and ":" in line:
            flags.update(line.split(":", 1)[1].split())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def resolve_precision(precision: str, device_type: str) -> str:
    """``train.precision`` for this device: ``auto`` is bf16 where the device has bf16 units
    (a CUDA GPU that supports it, a CPU per :func:`cpu_has_native_bf16`), else fp32."""
    if precision != "auto":
        return precision
    if device_type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if device_type == "cpu" and cpu_has_native_bf16() else "fp32"


def autocast(precision: str, device: torch.device):
    """bf16 autocast for a resolved ``precision`` (see :func:`resolve_precision`), else none."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
