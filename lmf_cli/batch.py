"""From a command line's files, folders and patterns to upscale jobs: sizes, names, refusals;
then the work of one job (read, upscale, write), shared by a local run and a cluster's workers.

Everything in planning is decided from file headers before any pixel is decoded, so a batch
reports what it will do (or why it won't) up front. Errors are InputError, one line each.
"""

from __future__ import annotations

import errno
import glob
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from lmf_cli.engine.sizes import TRAINED_MAX_SCALE, plan_size, round_size
from lmf_cli.errors import InputError, LmfError
from lmf_cli.files import atomic_write
from lmf_cli.io.images import (
    DEFAULT_MAX_PIXELS,
    FORMATS,
    IMAGE_SUFFIXES,
    OUTPUT_FORMATS,
    WRITABLE,
    ImageFile,
    frames_refusal,
    inspect_image,
    read_frames,
    read_image,
    write_frames,
    write_image,
)

if TYPE_CHECKING:
    import numpy as np

SIZE_OPTIONS = "--scale (or --scale-x/--scale-y), --width/--height, --size or --fit"


def parse_wxh(text: str, option: str) -> tuple[int, int]:
    """'1920x1080' -> (height, width); sizes are written W x H everywhere."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise InputError(f"{option} {text!r} must look like WIDTHxHEIGHT, e.g. 1920x1080") from None
    if w <= 0 or h <= 0:
        raise InputError(f"{option} {text}: width and height must be positive")
    return h, w


def fmt_size(hw: tuple[int, int]) -> str:
    return f"{hw[1]} x {hw[0]}"


@dataclass(frozen=True)
class Sizing:
    """The requested output size, resolved per image; one rule: round(input x scale) per axis, halves up."""

    scale: tuple[float, float] | None = None  # (y, x)
    uniform: bool = False  # a single --scale: outputs are named <stem>_x<scale>
    width: int | None = None
    height: int | None = None
    box: tuple[int, int] | None = None  # --fit (height, width)

    def out_hw(self, in_hw: tuple[int, int]) -> tuple[int, int]:
        """Output (height, width) for an input; lmf_cli.api.plan_size refuses shrinking and empty sizes."""

        if self.scale is not None:
            return plan_size(in_hw, scale=self.scale).out_hw
        h, w = in_hw
        out_h, out_w = self.height, self.width
        if self.box is not None:
            box_h, box_w = self.box
            if box_w * h <= box_h * w:  # the width is the tighter side
                out_h, out_w = min(box_h, round_size(h * box_w / w)), box_w
            else:
                out_h, out_w = box_h, min(box_w, round_size(w * box_h / h))
        elif out_h is None:
            out_h = round_size(h * out_w / w)
        elif out_w is None:
            out_w = round_size(w * out_h / h)
        return plan_size(in_hw, size=(out_h, out_w)).out_hw

    def label(self, out_hw: tuple[int, int]) -> str:
        return f"x{self.scale[0]:g}" if self.uniform else f"{out_hw[1]}x{out_hw[0]}"


def parse_sizing(scale: float | None, scale_x: float | None, scale_y: float | None, width: int | None,
                 height: int | None, size: str | None, fit: str | None) -> Sizing:
    """Check the size options once, before any file is touched."""
    groups = [scale is not None or scale_x is not None or scale_y is not None,
              width is not None or height is not None, size is not None, fit is not None]
    if sum(groups) != 1:
        raise InputError(f"give one of {SIZE_OPTIONS}")
    for option, value in (("--scale", scale), ("--scale-x", scale_x), ("--scale-y", scale_y)):
        if value is None:
            continue
        if not math.isfinite(value) or value <= 0:
            raise InputError(f"{option} {value:g} must be a positive number")
        if value < 1:
            raise InputError(f"{option} {value:g}: lmf only enlarges (scale >= 1 on each axis); use a resampler "
                             "such as Pillow's LANCZOS to shrink")
    if groups[0]:
        base = scale if scale is not None else 1.0
        factors = (scale_y if scale_y is not None else base, scale_x if scale_x is not None else base)
        return Sizing(scale=factors, uniform=scale_x is None and scale_y is None)
    for option, value in (("--width", width), ("--height", height)):
        if value is not None and value <= 0:
            raise InputError(f"{option} {value} must be a positive number of pixels")
    if size is not None:
        h, w = parse_wxh(size, "--size")
        return Sizing(width=w, height=h)
    if fit is not None:
        return Sizing(box=parse_wxh(fit, "--fit"))
    return Sizing(width=width, height=height)


@dataclass
class Job:
    """One input file and what becomes of it."""

    source: Path
    base: Path  # where its mirrored tree starts (--recursive)
    explicit: bool  # named on the command line, so never taken for an earlier output
    status: str = "pending"  # -> done, skipped, failed (or dry-run)
    reason: str = ""
    in_hw: tuple[int, int] | None = None
    out_hw: tuple[int, int] | None = None
    target: Path | None = None
    seconds: float = 0.0
    warnings: tuple[str, ...] = ()
    frames: int = 1  # of an animation, or pages of a TIFF
    paged: bool = False  # the frames are a TIFF's pages
    page_scale: tuple[float, float] | None = None  # (y, x) for TIFF pages of another size than the first

    @property
    def kind(self) -> str:
        return "pages" if self.paged else "frames"

    def drop(self, status: str, reason: str) -> None:
        self.status, self.reason = status, reason

    def frame_out_hw(self, in_hw: tuple[int, int]) -> tuple[int, int]:
        """Output (height, width) of a frame or page: the first page's size, or its factors for pages of other sizes."""
        if in_hw == self.in_hw or self.page_scale is None:
            return self.out_hw
        return plan_size(in_hw, scale=self.page_scale).out_hw

    def record(self) -> str:
        """The --json line for scripts: sizes as [width, height]."""
        def wh(hw: tuple[int, int] | None) -> list[int] | None:
            return [hw[1], hw[0]] if hw else None

        return json.dumps({"input": str(self.source), "output": str(self.target) if self.target else None,
                           "input_size": wh(self.in_hw), "output_size": wh(self.out_hw), "frames": self.frames,
                           "seconds": round(self.seconds, 3), "status": self.status, "reason": self.reason or None})


def _file_id(path: Path) -> tuple[int, int]:
    """Identity that survives symlinks, hard links and case-insensitive names."""
    st = path.stat()
    return st.st_dev, st.st_ino


def _exists(path: Path) -> bool:
    """Path.exists, with names the file system refuses (too long, ...) taken as absent; writing them says why."""
    try:
        return path.exists()
    except OSError:
        return False


def _missing(path: Path) -> str:
    """Why a command-line input that is neither a file nor a folder cannot be read."""
    try:
        path.stat()
    except OSError as exc:
        if path.is_symlink():
            if exc.errno == errno.ELOOP:
                return "a symbolic link loop (the link leads back to itself)"
            return f"a broken symbolic link (to {os.readlink(path)}, which does not exist)"
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            return "no such file or folder"
        return f"cannot read it ({exc.strerror or exc})"
    return "not a regular file (a pipe, device or socket)"


def _inside(path: Path, folder: Path | None) -> bool:
    return folder is not None and folder in path.resolve().parents


def _folder_images(folder: Path, recursive: bool, exclude: Path | None) -> list[Path]:
    """Image files of a folder (and its subfolders with --recursive); hidden ones are left out."""

    found = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in found if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts)
                  and not _inside(p, exclude))


def _glob_base(pattern: str) -> Path:
    """The folder a pattern's matches are mirrored from: its parts before the first wildcard."""
    fixed = []
    for part in Path(pattern).parts:
        if glob.escape(part) != part:
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


def expand_inputs(inputs: list[str], recursive: bool, exclude: Path | None) -> list[Job]:
    """Files, folders and glob patterns -> one job per distinct file; inputs that match nothing fail."""

    jobs: list[Job] = []
    seen: set[tuple[int, int]] = set()

    def add(path: Path, base: Path, explicit: bool) -> None:
        key = _file_id(path)
        if key not in seen:
            seen.add(key)
            jobs.append(Job(path, base, explicit))

    for item in inputs:
        path = Path(item)
        if path.is_file():
            add(path, path.parent, True)
            continue
        if path.is_dir():
            base, found = path, _folder_images(path, recursive, exclude)
            empty = "no images in this folder" + ("" if recursive else " (--recursive includes subfolders)")
        elif glob.escape(item) != item:
            base, found = _glob_base(item), []
            for match in map(Path, sorted(glob.glob(item, recursive=recursive))):
                if match.is_dir():
                    found += _folder_images(match, recursive, exclude)
                elif match.suffix.lower() in IMAGE_SUFFIXES and not _inside(match, exclude):
                    found.append(match)
            empty = "no image matches this pattern"
        else:
            jobs.append(Job(path, path.parent, True, "failed", _missing(path)))
            continue
        for p in found:
            add(p, base, False)
        if not found:
            jobs.append(Job(path, base, True, "failed", empty))
    return jobs


def output_place(output: str | None, inputs: list[str], fmt: str | None) -> tuple[Path | None, Path | None]:
    """(output file, output folder) from -o: a file only for a single input file."""

    if output is None:
        return None, None
    path = Path(output)
    folder = path.is_dir() or output.endswith(("/", os.sep)) or not path.suffix
    for parent in ([path] if folder else []) + list(path.parents):
        if _exists(parent) and not parent.is_dir():
            raise InputError(f"-o {output}: {parent} is a file, not a folder")
    if folder:
        return None, path
    if len(inputs) == 1 and Path(inputs[0]).is_file():
        if path.suffix.lower() not in WRITABLE:
            raise InputError(f"-o {output}: lmf writes {', '.join(OUTPUT_FORMATS)} files")
        if fmt is not None and FORMATS[fmt] != FORMATS[path.suffix.lower()[1:]]:
            raise InputError(f"-o {output} does not match --format {fmt}")
        return path, None
    if path.suffix.lower() in WRITABLE:
        raise InputError(f"-o {output}: several inputs need an output folder, not a file")
    return None, path


def target_for(job: Job, label: str, fmt: str | None, out_dir: Path | None, recursive: bool) -> Path:
    """<stem>_<label>.<ext> beside the input, or in the output folder (mirroring the tree with --recursive)."""

    src = job.source
    own = src.suffix.lower() in WRITABLE and (src.suffix.lower() != ".gif" or job.frames > 1)  # a still GIF -> PNG
    suffix = FORMATS[fmt] if fmt else src.suffix if own else ".png"
    name = f"{src.stem}_{label}{suffix}"
    if out_dir is None:
        return src.with_name(name)
    return out_dir / (os.path.relpath(src.parent, job.base) if recursive else "") / name


def plan_jobs(jobs: list[Job], sizing: Sizing, max_pixels: int, fmt: str | None, out_file: Path | None,
              out_dir: Path | None, recursive: bool, overwrite: bool) -> None:
    """Sizes and output names from the headers alone; settles what will be skipped or refused."""

    for job in jobs:
        if job.status != "pending":
            continue
        try:
            info = inspect_image(job.source, max_pixels)
            width, height = info.size_wh
            job.in_hw, job.frames, job.paged = (height, width), info.frames, info.format == "TIFF"
            out_hw = job.out_hw = sizing.out_hw(job.in_hw)
            job.page_scale = sizing.scale or (out_hw[0] / height, out_hw[1] / width)
            if info.page_sizes:
                total = sum(h * w for h, w in (job.frame_out_hw((h, w)) for w, h in info.page_sizes))
            else:
                total = info.frames * out_hw[0] * out_hw[1]
            if total > max_pixels:
                what = f"the output {fmt_size(out_hw)}" + (f" x {info.frames:,} {job.kind}" if info.frames > 1 else "")
                raise InputError(f"{what} is {total:,} pixels, over the limit of {max_pixels:,} (--max-pixels)")
            job.target = out_file or target_for(job, sizing.label(out_hw), fmt, out_dir, recursive)
            refusal = frames_refusal(info, job.target.suffix)
            if refusal is not None:
                raise InputError(refusal)
        except LmfError as exc:
            job.drop("failed", str(exc))
            job.out_hw = job.target = None
            continue
        factor = max(out_hw[0] / height, out_hw[1] / width)
        if factor > TRAINED_MAX_SCALE + 1e-9:
            job.warnings = (f"x{factor:.3g} is beyond the trained range (up to x{TRAINED_MAX_SCALE:g}); "
                            "quality may drop",)
    planned = [j for j in jobs if j.status == "pending"]
    owners = {_file_id(j.target): j for j in planned if _exists(j.target)}
    for job in jobs:  # a folder rerun finds the last run's outputs (even broken ones): they are not inputs
        owner = None if job.explicit else owners.get(_file_id(job.source))
        if owner is not None and owner is not job:
            job.drop("skipped", f"it is the output of {owner.source}")
            job.target = None
    inputs = {_file_id(j.source) for j in jobs if j.status != "skipped" and _exists(j.source)}
    claimed: dict[str, Job] = {}
    for job in (j for j in planned if j.status == "pending"):
        key = os.path.normcase(os.path.abspath(job.target))
        if _exists(job.target) and _file_id(job.target) in inputs:
            job.drop("failed", f"refusing to write over the input {job.target}")
        elif key in claimed:
            job.drop("failed", f"{job.target} is also the output of {claimed[key].source}")
        elif _exists(job.target) and not overwrite:
            job.drop("skipped", f"{job.target} exists (--overwrite replaces it)")
        else:
            claimed[key] = job


# The work of one job ---------------------------------------------------------------------------------------

class ImageUpscaler(Protocol):
    """What a file job needs of an upscaler (`lmf_cli.Upscaler` is one); a protocol, so batch never imports the API."""

    def upscale(self, image: np.ndarray, scale: Any = None, size: tuple[int, int] | None = None,
                **options: Any) -> np.ndarray: ...

    def upscale_batch(self, images: np.ndarray, scale: Any = None, size: tuple[int, int] | None = None,
                      **options: Any) -> np.ndarray: ...


class TileProgress(Protocol):
    """The current image's tiles: `start(passes)` once per image (alpha is a second pass), then per-tile calls."""

    def start(self, passes: int) -> None: ...

    def __call__(self, done: int, total: int) -> None: ...


@dataclass(frozen=True)
class FileOptions:
    """What every file of a batch shares: the engine's options and the writer's. Small and picklable, so
    a cluster's workers get the very settings of a local run."""

    max_pixels: int = DEFAULT_MAX_PIXELS
    jpeg_quality: int = 95
    keep_metadata: bool = True
    tile: int | None = None
    max_memory: int | None = None
    alpha: str = "model"
    cmsr: bool | str = False

    @property
    def engine(self) -> dict[str, Any]:
        return {"tile": self.tile, "max_memory": self.max_memory, "alpha": self.alpha, "cmsr": self.cmsr}


def upscale_pixels(up: ImageUpscaler, pixels: np.ndarray, out_hw: tuple[int, int], **engine: Any) -> np.ndarray:
    """Upscaler.upscale, plus gray + alpha (which the API takes as RGBA)."""
    import numpy as np

    if pixels.ndim == 3 and pixels.shape[2] == 2:  # in float, to round once as the API does for gray
        peak = float(np.iinfo(pixels.dtype).max)
        rgba = up.upscale(pixels[..., [0, 0, 0, 1]].astype(np.float32) / peak, size=out_hw, **engine)
        gray_alpha = np.stack([rgba[..., :3].mean(axis=2), rgba[..., 3]], axis=2)
        return np.round(gray_alpha * peak).astype(pixels.dtype)
    return up.upscale(pixels, size=out_hw, **engine)


def upscale_file(job: Job, up: ImageUpscaler, options: FileOptions, *, source: Path | None = None,
                 target: Path | None = None, tiles: TileProgress | None = None,
                 frames: Callable[[int, int], None] | None = None) -> list[str]:
    """Read, upscale and write one planned job atomically; returns what the output format could not keep.

    A file of several frames (animation, TIFF pages) is read, upscaled and encoded one frame at a time.
    `source` and `target` stand in for the job's own paths where a worker works on copies; messages
    still name the job's files, so a worker reports a file exactly as a local run does.
    """
    import torch

    source, target = source or job.source, target or job.target

    def one(pixels: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
        alpha_pass = pixels.ndim == 3 and pixels.shape[2] in (2, 4) and options.alpha == "model"
        if tiles is not None:
            tiles.start(2 if alpha_pass else 1)
        return upscale_pixels(up, pixels, out_hw, progress=tiles, **options.engine)

    try:
        if job.frames > 1:  # read, upscaled and encoded one frame at a time, as write_frames asks for them
            anim, decoded = read_frames(source, options.max_pixels)

            def upscaled() -> Iterator:
                for index, frame in enumerate(decoded):
                    frame.pixels = one(frame.pixels, job.frame_out_hw(frame.pixels.shape[:2]))
                    if frames is not None:
                        frames(index + 1, anim.frames)
                    yield frame

            return _written(job, target, options, write_frames, upscaled(), anim)
        src = read_image(source, options.max_pixels)
        return _written(job, target, options, write_image, replace(src, pixels=one(src.pixels, job.out_hw)))
    except (MemoryError, torch.cuda.OutOfMemoryError) as exc:
        raise InputError(OUT_OF_MEMORY) from exc


OUT_OF_MEMORY = "out of memory; try a smaller --tile or --max-memory"


def _written(job: Job, target: Path, options: FileOptions, encode: Callable[..., list[str]], *args: Any) -> list[str]:
    """encode(target, *args, quality, keep_metadata); a failed write named by the job's own target
    (reading and upscaling report their own errors)."""
    try:
        return encode(target, *args, options.jpeg_quality, options.keep_metadata)
    except OSError as exc:
        raise InputError(f"cannot write {job.target} ({exc.strerror or exc})") from exc


def same_size_batch(up: ImageUpscaler, in_hw: tuple[int, int], out_hw: tuple[int, int]) -> int:
    """Still images of one size to upscale per model call: 1 on a CPU (the cores are busy with one
    image; measured, a batch only adds latency), else as many as half the free GPU memory holds."""
    from lmf_cli.engine.budget import video_batch

    device = getattr(up, "device", None)
    if device is None or device.type != "cuda":
        return 1
    return video_batch(up.model, device, in_hw, out_hw)


def upscale_same_size(jobs: list[Job], up: ImageUpscaler, options: FileOptions) -> list[list[str] | LmfError]:
    """`upscale_file` for still images of one input and output size, with one model call per batch of
    the images that share a layout (one encoder call covers them all: what a GPU wants); the results
    equal `upscale_file` of each to float rounding. Per job: the notes, or the error to report."""
    import numpy as np
    import torch

    results: list[list[str] | LmfError] = []
    read: dict[int, ImageFile] = {}
    for index, job in enumerate(jobs):
        try:
            read[index] = read_image(job.source, options.max_pixels)
        except LmfError as exc:
            results.append(exc)
            continue
        results.append([])
    layouts: dict[tuple, list[int]] = {}
    for index, src in read.items():
        layouts.setdefault((src.pixels.shape, src.pixels.dtype.str), []).append(index)
    for (shape, _), members in layouts.items():
        try:
            pixels = [read[i].pixels for i in members]
            if len(members) > 1 and not (len(shape) == 3 and shape[2] == 2):
                outputs = list(up.upscale_batch(np.stack(pixels), size=jobs[members[0]].out_hw, **options.engine))
            else:  # one image, or gray + alpha (the API takes it as RGBA): one at a time
                outputs = [upscale_pixels(up, p, jobs[i].out_hw, **options.engine) for p, i in zip(pixels, members,
                                                                                                    strict=True)]
        except (MemoryError, torch.cuda.OutOfMemoryError):
            for i in members:
                results[i] = InputError(OUT_OF_MEMORY)
            continue
        for i, out in zip(members, outputs, strict=True):
            try:
                results[i] = _written(jobs[i], jobs[i].target, options, write_image, replace(read[i], pixels=out))
            except InputError as exc:
                results[i] = exc
    return results


def read_input(job: Job) -> bytes:
    """A job's input bytes, for a worker that does not see this file system; the reader's message on failure."""
    try:
        return job.source.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read the file ({exc.strerror or exc})") from exc


def upscale_bytes(job: Job, data: bytes, up: ImageUpscaler, options: FileOptions) -> tuple[bytes, list[str]]:
    """`upscale_file` on a file's bytes, returning the output's bytes: what a cluster's worker runs.

    The bytes pass through a private temp folder, so the very readers and writers of a local run
    decode and encode them, and the output bytes are the ones a local run writes.
    """
    with tempfile.TemporaryDirectory(prefix="lmf-job-") as folder:
        source = Path(folder) / f"input{job.source.suffix}"
        target = Path(folder) / f"output{job.target.suffix}"
        source.write_bytes(data)
        notes = upscale_file(job, up, options, source=source, target=target)
        return target.read_bytes(), notes


def write_output(job: Job, data: bytes) -> None:
    """Write a worker's output bytes to the job's target, atomically, as a local run's writer does."""
    try:
        atomic_write(job.target, lambda tmp: tmp.write_bytes(data))
    except OSError as exc:
        raise InputError(f"cannot write {job.target} ({exc.strerror or exc})") from exc
