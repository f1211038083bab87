"""The image batch runner: files, folders and patterns become planned jobs (sizes, names, refusals),
then each job is read, upscaled and written atomically, here (`run_batch`) or by a cluster's workers
(the per-job work is shared), with the model chosen per file (`ModelChoice`).

Everything in planning is decided from file headers before any pixel is decoded, so a batch
reports what it will do (or why it won't) up front. Errors are InputError, one line each.
"""

from __future__ import annotations

import errno
import glob
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from lmf_cli.errors import InputError, LmfError, OptionError, option_name
from lmf_cli.files import atomic_write
from lmf_cli.io.images import (
    FORMATS,
    IMAGE_SUFFIXES,
    WRITABLE,
    ImageFile,
    frames_refusal,
    inspect_image,
    read_frames,
    read_image,
    write_frames,
    write_image,
)
from lmf_cli.options import EngineOptions
from lmf_cli.sizes import TRAINED_MAX_SCALE, plan_size, round_size

if TYPE_CHECKING:
    import numpy as np

ASPECT_TOLERANCE = 0.01  # an exact size that changes the aspect by more is said (rounding alone stays under)

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

    @property
    def fixes_both_sides(self) -> bool:
        """An exact width and height were asked for: the aspect may change without the user meaning it."""
        return self.width is not None and self.height is not None

    def label(self, out_hw: tuple[int, int]) -> str:
        return f"x{self.scale[0]:g}" if self.uniform else f"{out_hw[1]}x{out_hw[0]}"


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


def exists(path: Path) -> bool:
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
            empty = "no images in this folder" + ("" if recursive else f" ({option_name('recursive')} includes "
                                                                          "subfolders)")
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
                raise InputError(f"{what} is {total:,} pixels, over the limit of {max_pixels:,} "
                                 f"({option_name('max_pixels')})")
            job.target = out_file or target_for(job, sizing.label(out_hw), fmt, out_dir, recursive)
            refusal = frames_refusal(info, job.target.suffix)
            if refusal is not None:
                raise InputError(refusal)
        except LmfError as exc:
            job.drop("failed", str(exc))
            job.out_hw = job.target = None
            continue
        factor = max(out_hw[0] / height, out_hw[1] / width)
        warnings = []
        if factor > TRAINED_MAX_SCALE + 1e-9:
            warnings.append(f"x{factor:.3g} is beyond the trained range (up to x{TRAINED_MAX_SCALE:g}); "
                            "quality may drop")
        stretch = (out_hw[1] / out_hw[0]) / (width / height)
        if sizing.fixes_both_sides and abs(stretch - 1) > ASPECT_TOLERANCE:
            warnings.append(f"{fmt_size(out_hw)} stretches the picture {'wider' if stretch > 1 else 'taller'} by "
                            f"{abs(stretch - 1):.0%} ({option_name('fit')} keeps the aspect)")
        job.warnings = tuple(warnings)
    planned = [j for j in jobs if j.status == "pending"]
    owners = {_file_id(j.target): j for j in planned if exists(j.target)}
    for job in jobs:  # a folder rerun finds the last run's outputs (even broken ones): they are not inputs
        owner = None if job.explicit else owners.get(_file_id(job.source))
        if owner is not None and owner is not job:
            job.drop("skipped", f"it is the output of {owner.source}")
            job.target = None
    inputs = {_file_id(j.source) for j in jobs if j.status != "skipped" and exists(j.source)}
    claimed: dict[str, Job] = {}
    for job in (j for j in planned if j.status == "pending"):
        key = os.path.normcase(os.path.abspath(job.target))
        if exists(job.target) and _file_id(job.target) in inputs:
            job.drop("failed", f"refusing to write over the input {job.target}")
        elif key in claimed:
            job.drop("failed", f"{job.target} is also the output of {claimed[key].source}")
        elif exists(job.target) and not overwrite:
            job.drop("skipped", f"{job.target} exists ({option_name('overwrite')} replaces it)")
        else:
            claimed[key] = job


# The work of one job ---------------------------------------------------------------------------------------

class ImageUpscaler(Protocol):
    """What a file job needs of an upscaler (`lmf_cli.Upscaler` is one); a protocol, so batch never imports the API."""

    def upscale(self, image: np.ndarray, scale: Any = None, size: tuple[int, int] | None = None, *,
                options: EngineOptions | None = None, progress: Any = None) -> np.ndarray: ...

    def upscale_batch(self, images: np.ndarray, scale: Any = None, size: tuple[int, int] | None = None, *,
                      options: EngineOptions | None = None, progress: Any = None) -> np.ndarray: ...

    def frames_per_call(self, in_hw: tuple[int, int], out_hw: tuple[int, int]) -> int: ...

    @property
    def name(self) -> str: ...


class TileProgress(Protocol):
    """The current image's tiles: `start(passes)` once per image (alpha is a second pass), then per-tile calls."""

    def start(self, passes: int) -> None: ...

    def __call__(self, done: int, total: int) -> None: ...


JPEG_QUALITY = 95


@dataclass(frozen=True)
class FileOptions:
    """What every file of a batch shares: the engine's options and the writer's. Small and picklable, so
    a cluster's workers get the very settings of a local run."""

    engine: EngineOptions = EngineOptions()
    jpeg_quality: int = JPEG_QUALITY  # JPEG, WebP, AVIF, HEIC and JPEG XL file quality, 1..100
    keep_metadata: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.jpeg_quality, bool) or not isinstance(self.jpeg_quality, int) \
                or not 1 <= self.jpeg_quality <= 100:
            raise OptionError("jpeg_quality", self.jpeg_quality, "must be between 1 and 100")

    @property
    def max_pixels(self) -> int:
        return self.engine.max_pixels


def upscale_pixels(up: ImageUpscaler, pixels: np.ndarray, out_hw: tuple[int, int], options: EngineOptions,
                   progress: TileProgress | None = None) -> np.ndarray:
    """Upscaler.upscale, plus gray + alpha (which the API takes as RGBA)."""
    import numpy as np

    if pixels.ndim == 3 and pixels.shape[2] == 2:  # in float, to round once as the API does for gray
        peak = float(np.iinfo(pixels.dtype).max)
        rgba = up.upscale(pixels[..., [0, 0, 0, 1]].astype(np.float32) / peak, size=out_hw, options=options,
                          progress=progress)
        gray_alpha = np.stack([rgba[..., :3].mean(axis=2), rgba[..., 3]], axis=2)
        return np.round(gray_alpha * peak).astype(pixels.dtype)
    return up.upscale(pixels, size=out_hw, options=options, progress=progress)


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
        alpha_pass = pixels.ndim == 3 and pixels.shape[2] in (2, 4) and options.engine.alpha == "model"
        if tiles is not None:
            tiles.start(2 if alpha_pass else 1)
        return upscale_pixels(up, pixels, out_hw, options.engine, tiles)

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
        raise InputError(out_of_memory()) from exc


def out_of_memory() -> str:
    return f"out of memory; try a smaller {option_name('tile')} or {option_name('max_memory')}"


def _written(job: Job, target: Path, options: FileOptions, encode: Callable[..., list[str]], *args: Any) -> list[str]:
    """encode(target, *args, quality, keep_metadata); a failed write named by the job's own target
    (reading and upscaling report their own errors)."""
    try:
        return encode(target, *args, options.jpeg_quality, options.keep_metadata)
    except OSError as exc:
        raise InputError(f"cannot write {job.target} ({exc.strerror or exc})") from exc


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
                outputs = list(up.upscale_batch(np.stack(pixels), size=jobs[members[0]].out_hw,
                                                options=options.engine))
            else:  # one image, or gray + alpha (the API takes it as RGBA): one at a time
                outputs = [upscale_pixels(up, p, jobs[i].out_hw, options.engine)
                           for p, i in zip(pixels, members, strict=True)]
        except (MemoryError, torch.cuda.OutOfMemoryError):
            for i in members:
                results[i] = InputError(out_of_memory())
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


# The batch ---------------------------------------------------------------------------------------------------

class ModelChoice:
    """A named model for every file, or the shipped model for what each file is (`inputs`: auto reads
    each file's headers; clean or compressed decides for all), with the reason to show."""

    def __init__(self, model: str | None, inputs: str) -> None:
        self.model, self.inputs = model, inputs
        self.decided: dict[Path, tuple[str, str]] = {}  # grouping asks again: each file's headers are read once

    def for_job(self, job: Job) -> tuple[str, str]:
        """(model, why); why is empty when the model was named."""
        from lmf_cli.io.compression import input_quality
        from lmf_cli.models.zoo import choose_model

        if self.model is not None:
            return self.model, ""
        if self.inputs != "auto":
            choice = choose_model(self.inputs, light=False)
            return choice.name, f"{option_name('input_quality')} {self.inputs}"
        if job.source not in self.decided:
            found = input_quality(job.source)
            self.decided[job.source] = (choose_model(found.kind, light=False).name,
                                        f"{found.reason}: {found.kind} input")
        return self.decided[job.source]

    def for_batch(self, jobs: list[Job]) -> tuple[str, str]:
        """One model for a whole cluster batch (each actor holds one): what most of the files need."""
        from lmf_cli.models.zoo import DEFAULT_MODEL

        if self.model is not None or not jobs:
            return self.model or DEFAULT_MODEL, ""
        picks = [self.for_job(job)[0] for job in jobs]
        chosen = max(set(picks), key=picks.count)
        return chosen, (f"chosen for {picks.count(chosen)} of {len(picks)} files by "
                        f"{option_name('input_quality')} {self.inputs}")


def same_size_run(jobs: list[Job], start: int, limit: int, models: ModelChoice) -> list[Job]:
    """jobs[start] and the pending still images right after it with its sizes and model, up to `limit`."""
    first = jobs[start]
    group = [first]
    if first.frames > 1:
        return group
    model = models.for_job(first)[0]
    for job in jobs[start + 1:]:
        if len(group) >= limit or job.status != "pending" or job.frames > 1 or job.in_hw != first.in_hw \
                or job.out_hw != first.out_hw or models.for_job(job)[0] != model:
            break
        group.append(job)
    return group


class BatchEvents(Protocol):
    """What a batch tells its front end: each planned refusal (`settled`), each model loaded, each job
    as it starts and as it ends (status done or failed, with what the output format could not keep);
    `tiles` and `frames` follow the current file."""

    tiles: TileProgress | None
    frames: Callable[[int, int], None] | None

    def settled(self, job: Job) -> None: ...

    def loaded(self, up: ImageUpscaler) -> None: ...

    def started(self, job: Job, model: str, why: str) -> None: ...

    def ended(self, job: Job, notes: list[str]) -> None: ...


def run_batch(jobs: list[Job], options: FileOptions, models: ModelChoice, load: Callable[[str], ImageUpscaler],
              events: BatchEvents) -> None:
    """Upscale the planned jobs on this machine, in order; a job that fails is reported and the batch goes on.

    Each model is loaded once (`load(name)`); runs of same-size still images with the same model go
    through one model call where the device takes several (a GPU), each output equal to a one-by-one
    run to rounding.
    """
    import time

    loaded: dict[str, ImageUpscaler] = {}
    index = 0
    while index < len(jobs):
        job = jobs[index]
        if job.status != "pending":
            events.settled(job)
            index += 1
            continue
        chosen, why = models.for_job(job)
        if chosen not in loaded:
            loaded[chosen] = load(chosen)
            events.loaded(loaded[chosen])
        up = loaded[chosen]
        group = same_size_run(jobs, index, up.frames_per_call(job.in_hw, job.out_hw), models)
        index += len(group)
        for member in group:
            events.started(member, up.name, models.for_job(member)[1] if why else "")
        t0 = time.perf_counter()
        if len(group) == 1:
            try:
                outcomes: list[list[str] | LmfError] = [upscale_file(job, up, options, tiles=events.tiles,
                                                                     frames=events.frames)]
            except LmfError as exc:
                outcomes = [exc]
        else:  # same-size files on a GPU: one model call for the group
            outcomes = upscale_same_size(group, up, options)
        for member, outcome in zip(group, outcomes, strict=True):
            if isinstance(outcome, LmfError):
                member.drop("failed", str(outcome))
            else:
                member.status = "done"
            member.seconds = (time.perf_counter() - t0) / len(group)
            events.ended(member, [] if isinstance(outcome, LmfError) else outcome)
