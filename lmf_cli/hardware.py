"""What the machine can do fast, so defaults follow the CPU instead of one tuned machine."""

from __future__ import annotations

import functools
import platform

import torch


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo); empty where they cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def fast_bf16(device: torch.device | str) -> bool:
    """Whether bfloat16 convolutions beat float32 here.

    GPUs: yes. CPUs: only with native bf16 instructions (AMX or AVX-512 BF16). Without them
    oneDNN emulates bf16 and training steps are about 8x slower than float32 (measured on
    an AVX2-only AMD EPYC: 37 s against 4.5 s per EDSR-baseline step).
    """
    kind = torch.device(device).type
    if kind == "cuda":
        return True
    if kind != "cpu" or platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    return bool(cpu_flags() & {"amx_bf16", "avx512_bf16"})
