"""Freed host memory kept for the next allocation: glibc's malloc set as a long upscaling job wants it.

By default glibc serves every allocation over 32 MB (a layer's activations, a latent table, an output
canvas at x8 and up) with a fresh mapping from the kernel and unmaps it on free, so each upscale, tile
and frame pays again for pages the kernel must zero and map: at about 2.5 GB/s on a cloud vCPU, that
was a fifth of a whole x4 upscale of a 320 x 180 photo (866 -> 700 ms on one thread of an AMD EPYC,
Zen 5; the encoder 661 -> 537, the latent MLP 113 -> 75 ms). Served from the heap instead, and with up
to RETAINED bytes of freed memory kept mapped rather than trimmed, the next allocation reuses pages that
are already there (a 120 x 192 clip upscaled x4 by `lmf video`: 16 -> 20 frames/s). The cost is memory:
the process keeps its working set mapped (150-180 MB more resident in those runs, flat over 36 mixed
upscales and over 720 video frames). The `lmf` command and the Ray workers set it; Python API users may
call `keep_freed_memory()` themselves (it changes the whole process's malloc).
"""

from __future__ import annotations

import ctypes
import os
import platform

# mallopt's parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
# Freed memory at the top of the heap kept mapped, at most: enough for every buffer of a large upscale's
# working set, so a process that once needed much more gives the rest back.
RETAINED = 1 << 30
OPT_OUT = "LMF_KEEP_MEMORY"


def keep_freed_memory() -> bool:
    """Serve large allocations from the heap and keep up to RETAINED bytes of what is freed, where the
    C library is glibc (Linux); elsewhere, or with LMF_KEEP_MEMORY=0, nothing changes. Returns whether
    it was set."""
    if os.environ.get(OPT_OUT) == "0" or platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, RETAINED))
