"""Process-wide settings for a long upscaling job, made by the `lmf` command and each Ray worker
(`prepare_process`); Python API users may call the two functions themselves.

Freed memory kept (`keep_freed_memory`). By default glibc serves every allocation over 32 MB (a
layer's activations, a latent table, an output canvas at x8 and up) with a fresh mapping from the
kernel and unmaps it on free, so each upscale, tile and frame pays again for pages the kernel must zero
and map: at about 2.5 GB/s on a cloud vCPU, that was a fifth of a whole x4 upscale of a 320 x 180 photo
(866 -> 700 ms on one thread of an AMD EPYC, Zen 5; the encoder 661 -> 537, the latent MLP 113 -> 75
ms), and `lmf video` of a 120 x 192 clip at x4 ran at 16 frames/s, 20 with it. Served from the heap
instead, with up to RETAINED bytes of freed memory kept mapped rather than trimmed, the next allocation
reuses pages that are already there. The cost is resident memory: 150-180 MB more in those runs, flat
over 36 upscales of mixed sizes and over 720 video frames.

Short OpenMP spins (`short_thread_spin`). After each parallel PyTorch operation, libgomp's worker
threads spin for a few milliseconds waiting for more. CMSR runs a PyTorch operation or two between
calls of the compiled kernel, whose own threads then share the cores with spinning ones: on two
threads of the same EPYC its x8 render took as long as the exact render (169 against 174 ms). With a
spin of SPIN_COUNT iterations it takes 99 ms, the exact render 166, and the PyTorch renderer's own
parallel operations are as fast as before (a passive wait made them 1.7x slower).
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

# mallopt's parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
# Freed memory at the top of the heap kept mapped, at most: enough for every buffer of a large upscale's
# working set, so a process that once needed much more gives the rest back.
RETAINED = 1 << 30
KEEP_MEMORY = "LMF_KEEP_MEMORY"
SPIN_COUNT = "10000"  # libgomp's default is 300000
_kept = False  # whether keep_freed_memory has set malloc in this process (glibc cannot be asked)


def prepare_process() -> None:
    """Both settings below, as the `lmf` command makes them before it runs a command."""
    keep_freed_memory()
    short_thread_spin()


def keep_freed_memory() -> bool:
    """Serve large allocations from the heap and keep up to RETAINED bytes of what is freed, where the
    C library is glibc (Linux); elsewhere, or with LMF_KEEP_MEMORY=0, nothing changes. Returns whether
    it was set."""
    if os.environ.get(KEEP_MEMORY) == "0" or platform.libc_ver()[0] != "glibc":
        return False
    global _kept
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _kept = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, RETAINED))
    return _kept


def short_thread_spin() -> bool:
    """Have libgomp's idle threads (PyTorch's on Linux) spin SPIN_COUNT iterations before they sleep,
    unless GOMP_SPINCOUNT is set already. libgomp reads it when PyTorch loads it, so this works only
    before `import torch`; returns whether it could still take effect."""
    if "torch" in sys.modules:
        return False
    os.environ.setdefault("GOMP_SPINCOUNT", SPIN_COUNT)
    return True


def describe() -> dict[str, str]:
    """The settings in effect, for benchmark figures: the same code runs a fifth slower with glibc's own."""
    return {"freed memory": "kept" if _kept else "returned to the system",
            "GOMP_SPINCOUNT": os.environ.get("GOMP_SPINCOUNT", "libgomp's default")}
