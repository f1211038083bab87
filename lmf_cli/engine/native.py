"""The compiled render kernel (`render_kernel.c`): LMF's render MLP fused per pixel on the CPU.

PyTorch runs the 16-wide render MLP one layer at a time through memory, which makes it the
largest cost of an LMF upscale on a CPU; the kernel keeps a batch of queries in registers
through every layer, about 4x faster on one core. It is built on first use with the system C
compiler (under a second) into the user cache, keyed by the source, the flags and the CPU,
and called through ctypes, which releases the GIL, so rows are split over threads.

With no compiler, on a GPU, or with `LMF_NATIVE=0`, rendering goes through PyTorch instead,
with the same results to float rounding (the tests hold both to the float64 formulas).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import torch

from lmf_cli.hardware import cpu_signature
from lmf_cli.models.geometry import AxisBilinear, AxisTaps
from lmf_cli.models.mlp import FusedMLP

SOURCE = Path(__file__).with_name("render_kernel.c")


def _read_source() -> bytes | None:
    try:
        return SOURCE.read_bytes()
    except OSError:
        return None


# Read when this module is imported, and built from these bytes: the kernel's arguments must be the
# ones _declare below gives, even when the package is updated under a long-running process (a
# training run that first renders at its first validation, an hour in).
SOURCE_BYTES = _read_source()
# Tried in order; the first set the compiler accepts is kept. No -ffast-math: with some
# compilers it links code that switches the whole process to flush-to-zero.
FLAG_SETS = (
    ("-O3", "-march=native", "-mprefer-vector-width=512", "-funroll-loops", "-fno-math-errno", "-fno-trapping-math"),
    ("-O3", "-march=native", "-funroll-loops", "-fno-math-errno", "-fno-trapping-math"),
    ("-O3", "-funroll-loops", "-fno-math-errno", "-fno-trapping-math"),
    ("-O3",),
)
MIN_ROWS_PER_THREAD = 4
MAX_HIDDEN = 64  # wider render MLPs (none known) use PyTorch
MIN_HIDDEN = 4  # narrower ones use PyTorch: the kernel pads the 3-colour output layer to a hidden row
STALE_DAYS = 7


def enabled() -> bool:
    return os.environ.get("LMF_NATIVE", "1") != "0"


def usable(model: torch.nn.Module, device: torch.device) -> bool:
    """Whether `model` renders through the kernel on `device`."""
    width = model.capabilities.kernel_width
    if device.type != "cpu" or not enabled() or width is None:
        return False
    return _library(width) is not None


def status() -> str:
    """One line for benchmarks and bug reports: which render path this machine uses."""
    if not enabled():
        return "PyTorch (LMF_NATIVE=0)"
    if _library(16) is not None:
        return "compiled kernel"
    return "PyTorch (the render kernel could not be built: no working C compiler)"


def _cache_dir() -> Path:
    import platformdirs

    return Path(os.environ.get("LMF_CACHE_DIR") or platformdirs.user_cache_dir("lmf")) / "kernels"


@functools.cache
def _library(hidden: int) -> ctypes.CDLL | None:
    """The kernel built for a hidden width, compiled once per machine; None if it cannot be.
    A flag set that failed leaves a `.failed` marker, so no later process tries it again."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    source = SOURCE_BYTES
    if not enabled() or compiler is None or source is None or hidden % 2 or not MIN_HIDDEN <= hidden <= MAX_HIDDEN:
        return None
    try:
        signature = cpu_signature()
    except (OSError, subprocess.SubprocessError):
        return None
    for flags in FLAG_SETS:
        key = hashlib.sha256(b"\0".join([source, " ".join(flags).encode(), str(hidden).encode(),
                                         compiler.encode(), signature.encode()])).hexdigest()[:16]
        target = _cache_dir() / f"render-{hidden}-{key}.so"
        failed = target.with_suffix(".failed")
        if failed.exists():
            continue
        if not target.exists():
            if not _compile(compiler, flags, hidden, source, target):
                _touch(failed)
                continue
            _remove_stale(target)
        try:
            lib = ctypes.CDLL(str(target))
        except OSError:
            _touch(failed)
            continue
        _declare(lib)
        return lib
    return None


def _touch(path: Path) -> None:
    try:
        path.touch()
    except OSError:
        pass


def _remove_stale(kept: Path) -> None:
    """Builds (and failure markers) a week old, of older sources or other flags, are dead weight."""
    cutoff = time.time() - STALE_DAYS * 86400
    for old in kept.parent.glob("render-*"):
        try:
            if old != kept and old.stat().st_mtime < cutoff:
                old.unlink()
        except OSError:
            pass


def _compile(compiler: str, flags: tuple[str, ...], hidden: int, source: bytes, target: Path) -> bool:
    """Build `source` into a temp file and rename it, so concurrent processes never load half a file."""
    made: list[str] = []  # the temp files, removed whatever happens
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        for suffix in (".c", ".so"):
            fd, path = tempfile.mkstemp(suffix=suffix, dir=target.parent)
            os.close(fd)
            made.append(path)
        code, library = made
        Path(code).write_bytes(source)
        cmd = [*shlex.split(compiler), *flags, f"-DHIDDEN={hidden}", "-shared", "-fPIC", "-o", library, code, "-lm"]
        done = subprocess.run(cmd, capture_output=True, timeout=120).returncode == 0
        if done:
            os.replace(library, target)
        return done
    except (OSError, subprocess.SubprocessError):
        return False
    finally:
        for path in made:
            if os.path.exists(path):
                os.unlink(path)


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.lmf_render.argtypes = [p, i64, i64, i64, i32, p, p, i64, p, p, i64, p, p,
                               p, p, p, p, i64, i64, i64, i64, i64, p, p, i64, i64, p, p, p, p, p, p,
                               p, i64, i64, i64, i32]
    lib.lmf_render.restype = ctypes.c_int64
    lib.lmf_blend_rects.argtypes = [p, i64, p, i64, i64, p, p, p, p, p, p, p, i64, i64, i64, p, i32]
    lib.lmf_blend_rects.restype = None


@functools.cache
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="lmf-render")


def _loaded(hidden: int) -> ctypes.CDLL:
    """The library for `hidden`; the CMSR helpers do not depend on it (any build serves)."""
    lib = _library(hidden)
    if lib is None:
        raise RuntimeError("the render kernel is not available on this machine")
    return lib


def _check(condition: bool, what: str) -> None:
    """The kernel trusts its inputs; these cheap checks keep a caller's slip from becoming
    an out-of-bounds write."""
    if not condition:
        raise ValueError(f"render kernel: {what}")


# The kernel's output units (render_kernel.c, store()) by the output's dtype: float32 takes values
# (normalised, or [0, 1] with `unit`), the integer types an image's samples.
_UNITS = {torch.float32: 0, torch.uint8: 2, torch.uint16: 3}


def _layout(out: torch.Tensor, unit: bool) -> tuple[int, int, int, int]:
    """Row, channel and column strides of a (1, 3, rows, cols) view, and the units the kernel writes it in."""
    if out.dtype not in _UNITS or any(s < 0 for s in out.stride()):
        raise ValueError("the kernel writes float32, uint8 or uint16 views with positive strides")
    if out.dtype != torch.float32 and not unit:
        raise ValueError("image samples (uint8, uint16) are written from [0, 1] units")
    return out.stride(2), out.stride(1), out.stride(3), _UNITS[out.dtype] + (out.dtype == torch.float32 and unit)


def _bytes(mask: torch.Tensor) -> torch.Tensor:
    """A boolean mask as the kernel's bytes of 0/1: PyTorch stores bool that way, so no copy."""
    return mask.contiguous().view(torch.uint8) if mask.dtype == torch.bool else mask.to(torch.uint8).contiguous()


def render(mlp: FusedMLP, rows: AxisTaps, cols: AxisTaps, mask: torch.Tensor | None = None,
           skip: tuple[torch.Tensor, AxisBilinear, AxisBilinear] | None = None,
           into: torch.Tensor | None = None, unit: bool = False) -> tuple[torch.Tensor, int]:
    """Ensemble-summed render MLP output (1, 3, rows, cols) in normalised units, plus
    `skip` = (image (3, h, w), row taps, column taps) sampled bilinearly if given; with
    `unit`, in [0, 1] units ((v + 1) / 2, the canvas's), or, `into` a uint8 or uint16 view, as the
    rounded samples of an 8- or 16-bit image (render.to_samples).

    With a boolean `mask` (rows, cols), only those pixels are computed; the others are 0,
    or, when writing `into` a (1, 3, rows, cols) view of a larger image, left as they are.
    Returns the output and how many pixels were drawn (counted as they are: no pass over the mask).
    """
    lib = _loaded(mlp.hidden)
    n_rows, n_cols = rows.lat.shape[0], cols.lat.shape[0]
    if into is None:
        into = torch.zeros(1, 3, n_rows, n_cols) if mask is not None else torch.empty(1, 3, n_rows, n_cols)
    layout = _layout(into, unit)
    table_h, table_w = mlp.table.shape[:2]
    _check(tuple(into.shape) == (1, 3, n_rows, n_cols), "output view has the wrong shape")
    _check(mask is None or tuple(mask.shape) == (n_rows, n_cols), "mask has the wrong shape")
    _check(int(rows.lat.max()) < table_h and int(cols.lat.max()) < table_w and int(rows.lat.min()) >= 0
           and int(cols.lat.min()) >= 0, "latent index outside the table")
    _check(rows.lat.dtype == cols.lat.dtype == torch.int64 and rows.rel.dtype == cols.rel.dtype == torch.float64,
           "taps must be int64 latents and float64 offsets")
    _check(mlp.extra is not None, "no grid chosen: the render MLP has no extra vector (see Geometry.fused_mlp)")
    tensors = [mlp.table, mlp.extra, mlp.weights, mlp.biases, mlp.w_out, mlp.b_out]
    _check(all(t.dtype == torch.float32 and t.is_contiguous() for t in tensors), "model tensors must be "
           "contiguous float32")
    base = mlp.base if mlp.base is not None else mlp.table
    mask_u8 = _bytes(mask) if mask is not None else None
    if skip is None:
        image, skip_taps = None, [None] * 6
    else:
        image, sy, sx = skip[0].float().contiguous(), skip[1], skip[2]
        _check(int(sy.hi.max()) < image.shape[1] and int(sx.hi.max()) < image.shape[2]
               and int(sy.lo.min()) >= 0 and int(sx.lo.min()) >= 0, "skip taps outside the image")
        skip_taps = [sy.lo.contiguous(), sy.hi.contiguous(), sy.frac.float().contiguous(),
                     sx.lo.contiguous(), sx.hi.contiguous(), sx.frac.float().contiguous()]
    pointers = [None if t is None else t.data_ptr() for t in [mask_u8, image, *skip_taps]]
    skip_hw = (0, 0) if image is None else image.shape[1:]

    threads = max(1, min(torch.get_num_threads(), n_rows // MIN_ROWS_PER_THREAD))

    def run(first: int) -> int:
        return lib.lmf_render(mlp.table.data_ptr(), mlp.table.shape[2], mlp.table.shape[1], mlp.depth, mlp.kind,
                              base.data_ptr(), mlp.extra.data_ptr(), mlp.code,
                              mlp.weights.data_ptr(), mlp.biases.data_ptr(), mlp.weights.shape[0],
                              mlp.w_out.data_ptr(), mlp.b_out.data_ptr(),
                              rows.lat.data_ptr(), rows.rel.data_ptr(), cols.lat.data_ptr(), cols.rel.data_ptr(),
                              rows.lat.shape[1], first, n_rows, threads, n_cols,
                              pointers[0], pointers[1], *skip_hw, *pointers[2:], into.data_ptr(), *layout)

    jobs = [_pool().submit(run, t) for t in range(1, threads)]
    try:
        drawn = run(0)
    finally:  # even on Ctrl-C, the workers must finish before the tensors they use are freed
        wait(jobs)
    return into, drawn + sum(job.result() for job in jobs)


def blend_rects(hidden: int, into: torch.Tensor, rects: torch.Tensor, coarse: torch.Tensor, rows: AxisBilinear,
                cols: AxisBilinear, unit: bool = False) -> None:
    """Write the bilinear sample of a coarse rendering (1, 3, h, w) into rectangles of `into` (1, 3,
    rows, cols): rects (n, 4) int64 of (y0, y1, x0, x1) in its rows and columns, disjoint; the
    coarse rendering is normalised, `into` is written as `render` writes it."""
    lib = _loaded(hidden)
    _check(int(rows.hi.max()) < coarse.shape[2] and int(cols.hi.max()) < coarse.shape[3]
           and int(rows.lo.min()) >= 0 and int(cols.lo.min()) >= 0, "taps outside the coarse grid")
    _check(rows.lo.shape[0] == into.shape[2] and cols.lo.shape[0] == into.shape[3], "taps and output view disagree")
    _check(rects.dtype == torch.int64 and rects.shape[-1] == 4 and bool((rects[:, 0::2] >= 0).all())
           and int(rects[:, 1].max()) <= into.shape[2] and int(rects[:, 3].max()) <= into.shape[3],
           "rectangles outside the output view")
    rects = rects.contiguous()
    coarse = coarse[0].float().contiguous()
    fy, fx = rows.frac.float().contiguous(), cols.frac.float().contiguous()
    lo_y, hi_y, lo_x, hi_x = rows.lo.contiguous(), rows.hi.contiguous(), cols.lo.contiguous(), cols.hi.contiguous()
    layout = _layout(into, unit)

    widest = 6 * int((rects[:, 3] - rects[:, 2]).max())

    def draw(k0: int, k1: int) -> None:  # disjoint rectangles: threads never write the same pixel
        scratch = torch.empty(widest)  # the thread's two sampled coarse rows
        lib.lmf_blend_rects(rects[k0:k1].data_ptr(), k1 - k0, coarse.data_ptr(), *coarse.shape[1:],
                            lo_y.data_ptr(), hi_y.data_ptr(), fy.data_ptr(), lo_x.data_ptr(), hi_x.data_ptr(),
                            fx.data_ptr(), into.data_ptr(), *layout[:3], scratch.data_ptr(), layout[3])

    _in_row_bands(rects.shape[0], draw, per_thread=1)


def _in_row_bands(n_rows: int, work: Callable[[int, int], None], per_thread: int = MIN_ROWS_PER_THREAD) -> None:
    """work(r0, r1) on contiguous bands of rows (or rectangles), one per thread (ctypes releases
    the GIL): CMSR's blending touches most output pixels at large scales."""
    threads = max(1, min(torch.get_num_threads(), n_rows // per_thread))
    bounds = [n_rows * t // threads for t in range(threads + 1)]
    jobs = [_pool().submit(work, bounds[t], bounds[t + 1]) for t in range(1, threads)]
    try:
        work(bounds[0], bounds[1])
    finally:  # the bands use tensors that must outlive every thread
        wait(jobs)
    for job in jobs:
        job.result()
