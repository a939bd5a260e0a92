"""Device selection shared by every command."""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from pathlib import Path

import torch

__all__ = ["resolve_device", "autocast", "cpu_has_native_bf16", "keep_tensors_in_heap"]

#: glibc's mallopt parameters (<malloc.h>).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: Blocks below this size come from the heap instead of a fresh mmap: the activations of a ResNet-18 pass over
#: 16 images at 224 px (51 MB for the stem's) stay below it.
HEAP_BLOCK_LIMIT = 256 << 20
#: Free memory at the heap's top beyond this is given back to the system.
HEAP_KEEP = 512 << 20


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


@functools.cache
def keep_tensors_in_heap() -> bool:
    """Let glibc reuse the memory of large CPU tensors from one pass to the next; returns whether it took.

    By default glibc maps every block over 32 MB afresh and unmaps it when freed, so each batch-16 forward of
    a fresh process touched its 51 MB activations page by page again: 55,000 page faults and 6.7 ms of system
    time per image, 63.5 against 89.5 images/s (2026-12-02, 2-core VM); a process that had first run a backward
    pass happened to be in the fast state. Raising the mmap threshold (:data:`HEAP_BLOCK_LIMIT`) and the trim
    threshold (:data:`HEAP_KEEP`) keeps those blocks in the heap: the process holds up to HEAP_KEEP of freed
    memory for the next pass. Called once by the ``mcloss`` command; a no-op (False) off glibc and when the
    user set ``MALLOC_MMAP_THRESHOLD_`` or ``MALLOC_TRIM_THRESHOLD_`` (theirs win).
    """
    if not sys.platform.startswith("linux") or any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # the trim threshold first: once the mmap threshold is set, glibc stops adjusting both
    return mallopt(_M_TRIM_THRESHOLD, HEAP_KEEP) == 1 and mallopt(_M_MMAP_THRESHOLD, HEAP_BLOCK_LIMIT) == 1
