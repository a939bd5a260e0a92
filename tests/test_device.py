"""Device selection and the bf16 autocast switch."""

import pytest
import torch

from mcloss.core.device import autocast, native_bf16_in_cpuinfo, resolve_device

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
