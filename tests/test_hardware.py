"""lit_factor/hardware.py against hand-written /proc/cpuinfo texts: what is native, emulated or unknown."""

from __future__ import annotations

import pytest

from lit_factor import hardware

AVX2 = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse avx avx2 fma\n"
AVX512_BF16 = "processor\t: 0\nmodel name\t: Intel Xeon\nflags\t\t: fpu avx avx2 avx512f avx512_bf16\n"


@pytest.fixture
def cpuinfo(monkeypatch):
    def use(text: str, onednn_bf16: bool = True):
        monkeypatch.setattr(hardware, "_cpuinfo", lambda: text)
        monkeypatch.setattr(hardware.torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: onednn_bf16,
                            raising=False)
    return use


def test_a_cpu_without_bf16_flags_emulates_it(cpuinfo):
    cpuinfo(AVX2)
    assert hardware.cpu_bf16() is None and hardware.emulates_bf16()
    assert hardware.cpu_description() == {"cpu": "AMD EPYC", "vector": "avx2", "native_bf16": None}


def test_native_bf16_needs_the_flag_and_onednn(cpuinfo):
    cpuinfo(AVX512_BF16)
    assert hardware.cpu_bf16() == "avx512_bf16" and not hardware.emulates_bf16()
    assert hardware.cpu_description()["vector"] == "avx512f"
    cpuinfo(AVX512_BF16, onednn_bf16=False)  # the flag alone does not make PyTorch's kernels native
    assert hardware.cpu_bf16() is None and hardware.emulates_bf16()


def test_unreadable_flags_claim_nothing(cpuinfo):
    cpuinfo("")  # not Linux: no /proc/cpuinfo
    assert hardware.cpu_bf16() is None and not hardware.emulates_bf16()
    assert hardware.cpu_description()["vector"] is None
