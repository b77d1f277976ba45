"""Where a result came from: versions and machine, recorded next to every figure."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import numpy as np
import torch


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


#: CPU feature flags that decide which kernels PyTorch / oneDNN / ONNX Runtime use
_SIMD_PREFIXES = ("avx", "amx", "fma", "f16c", "sse4")


def cpu_flags() -> list[str]:
    """The SIMD flags of /proc/cpuinfo (AVX2, AVX-512 and its VNNI / BF16, AMX, ...), sorted."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                return sorted(f for f in flags if f.startswith(_SIMD_PREFIXES))
    except OSError:
        pass
    return []


def cpu_has_bf16() -> bool:
    """Whether the CPU computes bfloat16 natively (AVX-512 BF16 or AMX): without it, bf16 autocast
    on the CPU is emulated and several times slower than fp32."""
    return any(f in ("avx512_bf16", "amx_bf16") for f in cpu_flags())


def describe_environment() -> dict:
    """CPU model and SIMD flags, core count, torch threads and library versions."""
    from .version import __version__

    return {
        "leansam": __version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
        "machine": platform.machine(),
        "cpu": _cpu_model(),
        "cpu_flags": cpu_flags(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
