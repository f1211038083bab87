"""What the machine can do fast, so defaults follow the CPU instead of one tuned machine."""

from __future__ import annotations

import functools
import os
import platform
import subprocess

import torch

_CPUINFO_KEYS = ("flags", "model name", "Features", "CPU implementer", "CPU part")


@functools.cache
def _cpuinfo() -> dict[str, str]:
    """The first value of each key that says what the CPU is (Linux /proc/cpuinfo); empty elsewhere."""
    found: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in _CPUINFO_KEYS:
                    found.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return found


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags; empty where they cannot be read."""
    info = _cpuinfo()
    return frozenset((info.get("flags") or info.get("Features") or "").split())


def cpu_name() -> str:
    """The CPU's model name, for every speed figure we print."""
    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


@functools.cache
def cpu_signature() -> str:
    """Everything -march=native depends on, so a shared build cache never hands a build to another CPU."""
    text = " ".join(platform.uname()) + platform.processor()
    text += "".join(f"{key}: {value}\n" for key, value in sorted(_cpuinfo().items()))
    if platform.system() == "Darwin":
        text += subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string", "hw.optional"],
                               capture_output=True, text=True).stdout
    return text


def fast_bf16(device: torch.device | str) -> bool:
    """Whether bfloat16 convolutions beat float32 here.

    GPUs: yes. CPUs: only with native bf16 instructions (AMX or AVX-512 BF16). Without them
    oneDNN emulates bf16 and training steps are about 8x slower than float32 (measured on
    an AVX2-only AMD EPYC: 37 s against 4.5 s per EDSR-baseline step).
    """
    kind = torch.device(device).type
    if kind == "cuda":
        return True
    if kind == "cpu" and os.environ.get("LMF_CPU_BF16") in ("0", "1"):  # a fixed answer for reproducible runs
        return os.environ["LMF_CPU_BF16"] == "1"
    if kind != "cpu" or platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    return bool(cpu_flags() & {"amx_bf16", "avx512_bf16"})
