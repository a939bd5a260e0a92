"""Device selection shared by every command."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

__all__ = ["resolve_device", "autocast", "cpu_has_native_bf16"]


def resolve_device(name: str = "auto") -> torch.device:
    """Turn ``auto|cpu|cuda|cuda:N`` into a device; ``auto`` picks CUDA when present."""
    name = (name or "auto").lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"--device {name}: CUDA is not available on this machine; use --device cpu or auto")
    if name != "cpu" and not name.startswith("cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)


def autocast(device: torch.device, enabled: bool = True, *, cpu: bool = False) -> torch.autocast:
    """bf16 autocast on CUDA; on the CPU only with ``cpu=True`` (disabled otherwise)."""
    on = enabled and (device.type == "cuda" or (cpu and device.type == "cpu"))
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=on)


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX-BF16 in /proc/cpuinfo; Linux only).

    Elsewhere oneDNN emulates bf16, and CPU autocast is slower than fp32.
    """
    try:
        return native_bf16_in_cpuinfo(Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace"))
    except OSError:
        return False


def native_bf16_in_cpuinfo(text: str) -> bool:
    """Whether the first ``flags`` line of a /proc/cpuinfo text lists avx512_bf16 or amx_bf16."""
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return "avx512_bf16" in flags or "amx_bf16" in flags
