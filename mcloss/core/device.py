"""Device selection shared by every command."""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from collections.abc import Mapping
from pathlib import Path

import torch

from mcloss.core.errors import ParameterError

__all__ = ["resolve_device", "autocast", "cpu_has_native_bf16", "keep_tensors_in_heap"]

#: glibc's mallopt parameters (<malloc.h>).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: Blocks below this size come from the heap instead of a fresh mmap: the activations of a ResNet-18 pass over
#: 16 images at 224 px (51 MB for the stem's) stay below it.
HEAP_BLOCK_LIMIT = 256 << 20
#: Free memory at the heap's top beyond this is given back to the system.
HEAP_KEEP = 512 << 20
#: the environment variables by which a user sets those thresholds for glibc
MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def resolve_device(name: str = "auto") -> torch.device:
    """Turn ``auto|cpu|cuda|cuda:N`` into a device; ``auto`` picks CUDA when present.

    Raises:
        ParameterError: an unknown name, or CUDA asked for on a machine without it.
    """
    name = (name or "auto").lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ParameterError(f"device {name}: CUDA is not available on this machine; use cpu or auto", parameter="device")
    if name != "cpu" and not name.startswith("cuda"):
        raise ParameterError(f"device must be auto, cpu or cuda, got {name!r}", parameter="device")
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

    By default glibc maps every block over 32 MB afresh and unmaps it when freed, so every batch forward
    touches its activations page by page again (BENCHMARKS.md, "The heap kept between passes"). Raising the
    mmap threshold (:data:`HEAP_BLOCK_LIMIT`) and the trim threshold (:data:`HEAP_KEEP`) keeps those blocks
    in the heap: the process holds up to HEAP_KEEP of freed memory for the next pass. Called once by the
    ``mcloss`` command. A no-op (False) off glibc, and when the user set ``MALLOC_MMAP_THRESHOLD_``,
    ``MALLOC_TRIM_THRESHOLD_`` or a ``glibc.malloc`` tunable (theirs win).
    """
    if not sys.platform.startswith("linux") or user_sets_malloc_thresholds(os.environ):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # no mallopt in the process's C library
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # the mmap threshold first: where the C library refuses it (musl; a glibc that caps it lower), the trim
    # threshold is left alone too
    return mallopt(_M_MMAP_THRESHOLD, HEAP_BLOCK_LIMIT) == 1 and mallopt(_M_TRIM_THRESHOLD, HEAP_KEEP) == 1


def user_sets_malloc_thresholds(env: Mapping[str, str]) -> bool:
    """Whether ``env`` sets glibc's mmap or trim threshold itself."""
    tunables = env.get("GLIBC_TUNABLES", "")
    return any(k in env for k in MALLOC_ENV) or any(f"glibc.malloc.{t}" in tunables for t in ("mmap_threshold", "trim_threshold"))
