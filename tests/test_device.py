"""Device selection, the bf16 autocast switch and the CPU allocator's settings."""

import os
import platform
import subprocess
import sys

import pytest
import torch

from mcloss.core.device import (
    MALLOC_ENV,
    autocast,
    native_bf16_in_cpuinfo,
    resolve_device,
    user_sets_malloc_thresholds,
)

CPU = torch.device("cpu")


def test_autocast_is_off_on_the_cpu_unless_asked():
    x = torch.randn(2, 4)
    w = torch.randn(4, 3)
    with autocast(CPU):
        assert (x @ w).dtype == torch.float32
    with autocast(CPU, cpu=True):
        assert (x @ w).dtype == torch.bfloat16
    with autocast(CPU, False, cpu=True):
        assert (x @ w).dtype == torch.float32


@pytest.mark.parametrize(
    ("flags", "native"),
    [
        ("fpu sse2 avx2 avx512f avx512bw", False),
        ("fpu avx512f avx512_bf16 avx512_vnni", True),
        ("fpu amx_tile amx_bf16 amx_int8", True),
        ("fpu avx512f avx512_bf16_x", False),
    ],
)
def test_native_bf16_is_read_from_the_cpu_flags(flags, native):
    text = f"processor\t: 0\nmodel name\t: test\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n"
    assert native_bf16_in_cpuinfo(text) is native
    assert native_bf16_in_cpuinfo("processor\t: 0\n") is False


def test_resolve_device():
    assert resolve_device("cpu") == CPU
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="auto, cpu or cuda"):
        resolve_device("tpu")


_HEAP_PROBE = """
import resource, sys, torch, torchvision
from mcloss.core.device import keep_tensors_in_heap
took = keep_tensors_in_heap() if sys.argv[1] == "tuned" else None
torch.set_num_threads(1)
model, x = torchvision.models.resnet18(weights=None).eval(), torch.randn(16, 3, 224, 224)
faults = []
with torch.inference_mode():
    model(x), model(x)  # the stem's activations alone are 51 MB
    for _ in range(2):  # the fewer of two passes: one page-in by the system in one pass is not the allocator's
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        model(x)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(took, min(faults))
"""


def _heap_probe(mode: str, **env: str) -> tuple[str, int]:
    clean = {k: v for k, v in os.environ.items() if k not in (*MALLOC_ENV, "GLIBC_TUNABLES")}
    out = subprocess.run(
        [sys.executable, "-c", _HEAP_PROBE, mode], capture_output=True, text=True, check=True, env={**clean, **env}
    ).stdout.split()
    return out[0], int(out[1])


_GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


@pytest.mark.slow
def test_keep_tensors_in_heap_spares_a_batch_forward_its_page_faults():
    took, tuned = _heap_probe("tuned")
    if not _GLIBC:  # glibc's thresholds only: elsewhere the setting is a no-op and says so
        assert took == "False"
        return
    _, plain = _heap_probe("plain")
    assert plain >= 1000  # glibc maps each block over 32 MB afresh: its pages fault on every pass
    assert took == "True" and tuned * 10 <= plain


@pytest.mark.parametrize(
    "env",
    [
        {"MALLOC_MMAP_THRESHOLD_": "1048576"},
        {"MALLOC_TRIM_THRESHOLD_": "0"},
        {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=1048576"},
        {"GLIBC_TUNABLES": "glibc.elision.enable=1:glibc.malloc.trim_threshold=0"},
    ],
)
def test_keep_tensors_in_heap_leaves_the_users_malloc_settings_alone(env):
    assert user_sets_malloc_thresholds(env)
    assert not user_sets_malloc_thresholds({"GLIBC_TUNABLES": "glibc.elision.enable=1", "PATH": "/usr/bin"})


def test_keep_tensors_in_heap_is_a_no_op_under_the_users_setting():
    code = "from mcloss.core.device import keep_tensors_in_heap; print(keep_tensors_in_heap())"
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "1048576"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == "False"
