"""What the CPU can do natively, for the choices that depend on it (bf16 on a CPU; docs/speed.md).

bf16 on a CPU is fast only with native bf16 instructions (AVX-512 BF16, AMX, Arm BF16); without them PyTorch
emulates it, and a bf16 training step is about ten times *slower* than fp32 (measured: benchmarks/train_step.py's
files, one per machine, in docs/speed.md). The latency benchmark skips bf16 there; ``fit`` and ``study run`` say so
in one warning line.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

#: /proc/cpuinfo flags of native bf16 arithmetic: x86's AMX and AVX-512 BF16, Arm's FEAT_BF16 ("bf16" in Features)
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16", "bf16")


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no flags to read, so no claim of native bf16
        return ""


def cpu_bf16() -> str | None:
    """The CPU's native bf16 instructions (``amx_bf16``, ``avx512_bf16``, Arm's ``bf16``) as one string, or None
    without them or where they cannot be read (read from /proc/cpuinfo, and oneDNN must agree)."""
    flags = set(_cpuinfo().split())
    have = [f for f in NATIVE_BF16_FLAGS if f in flags]
    if not have or not torch.backends.mkldnn.is_available():
        return None
    try:
        if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return None
    except (AttributeError, RuntimeError):
        pass
    return "+".join(have)


def emulates_bf16() -> bool:
    """Whether this CPU is known to lack native bf16 (its flags were read and show none, or oneDNN says so): the
    case worth a warning. Where the flags cannot be read (not Linux), nothing is known and nothing is claimed."""
    return bool(_cpuinfo()) and cpu_bf16() is None


def cpu_description() -> dict[str, str | None]:
    """The CPU a measurement ran on, for its result file: model name, widest vector extension, native bf16."""
    info = _cpuinfo()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                platform.processor() or platform.machine())
    flags = set(info.split())
    vector = next((f for f in ("avx512f", "avx2", "avx", "neon", "asimd") if f in flags), None)
    return {"cpu": name, "vector": vector, "native_bf16": cpu_bf16()}


def describe_machine(gpus: list[str]) -> str:
    """What a study's trials ran on, in one line (recorded with the study and with each trial: results from a GPU
    and a laptop differ in train time and latency, and a report must say which is which)."""
    cores = f"{os.cpu_count()} CPU cores"
    if gpus and torch.cuda.is_available():
        return f"{len(gpus)} x {torch.cuda.get_device_name(0)}, {cores}"
    # two 2-core machines differed 4.5x in an fp32 step, and bf16 is native on one only (docs/speed.md)
    cpu = cpu_description()
    native = f", native bf16 ({cpu['native_bf16']})" if cpu["native_bf16"] else ""
    return f"CPU only ({cpu['cpu']}, {cpu['vector'] or 'vector extensions unknown'}{native}), {cores}"
