"""Where the time goes: encoder, latent MLP and rendering timed separately, beside LIIF on
the same encoder and OpenCV bicubic, with MACs computed from the architecture."""

from __future__ import annotations

import itertools
import platform
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from lmf_cli import process
from lmf_cli.engine import native
from lmf_cli.engine.cmsr import MIN_SCALE, TORCH_MIN_SCALE, Schedule, pays, schedule_for
from lmf_cli.engine.render import encode_image, render_region, renders_fused
from lmf_cli.engine.reuse import Previous
from lmf_cli.engine.tiling import upscale_tensor
from lmf_cli.evaluation.protocol import bicubic_method, evaluate, model_method
from lmf_cli.hardware import cpu_name
from lmf_cli.imaging.resample import bicubic_resize_uint8
from lmf_cli.io.images import load_rgb
from lmf_cli.models.base import ImplicitSR
from lmf_cli.models.liif import LIIF
from lmf_cli.options import EngineOptions


@dataclass
class Timing:
    median_s: float
    spread_s: float  # max - min over the repeats

    @staticmethod
    def of(samples: list[float]) -> Timing:
        return Timing(statistics.median(samples), max(samples) - min(samples))


@dataclass
class Row:
    method: str
    scale: float
    encoder: Timing | None
    latent: Timing | None
    render: Timing | None
    total: Timing
    macs: dict[str, float]
    megapixels_per_s: float
    peak_memory_mb: float
    rendered_fraction: float = 1.0
    note: str = ""
    render_runs: list[float] = field(default_factory=list)  # each timed run's render, inputs in turn
    drawn_runs: list[float] = field(default_factory=list)  # and its share of pixels drawn
    inputs: int = 1  # the inputs the runs cycle over: run j is input j % inputs

    def as_dict(self) -> dict:
        return asdict(self)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _time(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        samples.append(time.perf_counter() - start)
    return samples


def conv_macs_per_pixel(module: nn.Module, channels: int = 3) -> float:
    """MACs per input pixel of a fully convolutional module (measured with hooks on 8x8)."""
    total = 0.0

    def hook(layer: nn.Conv2d, _inputs, output) -> None:
        nonlocal total
        k = layer.kernel_size[0] * layer.kernel_size[1]
        total += output.shape[2] * output.shape[3] * layer.out_channels * layer.in_channels // layer.groups * k

    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, nn.Conv2d)]
    try:
        with torch.inference_mode():
            module(torch.zeros(1, channels, 8, 8, device=next(module.parameters()).device))
    finally:
        for h in handles:
            h.remove()
    return total / 64


def model_macs(model: ImplicitSR, in_hw: tuple[int, int], out_hw: tuple[int, int]) -> dict[str, float]:
    """MACs of each stage for one image: the encoder per LR pixel (counted by hooks on its
    convolutions), then the decoder's stages as its family declares them (`stage_macs`)."""
    encoder = conv_macs_per_pixel(model.encoder)  # hooks see only the convolutions forward runs
    return {"encoder": encoder * in_hw[0] * in_hw[1], **model.stage_macs(in_hw, out_hw)}


def liif_twin(model: ImplicitSR) -> ImplicitSR:
    """LIIF (580 -> 256 x 4 -> 3) on the same encoder module: the paper's baseline. Its MLP
    is untrained; only its cost is measured."""
    return LIIF(model.encoder).to(next(model.parameters()).device).eval()


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _stage_samples(model: ImplicitSR, runs: list[Callable[[], object]], device: torch.device, repeats: int,
                   warmup: int) -> list[tuple[float, float, float, float]]:
    """(encoder, latent, render, total) seconds of each timed run, all four from the same
    synchronised run: hooks time the encoder and `encode` (encoder + latent MLP) inside the
    upscale, the render is the rest. `runs` are cycled (one per input image)."""
    marks: dict[str, float] = {}

    def before(*_: object) -> None:
        _sync(device)
        marks["start"] = time.perf_counter()

    def after(*_: object) -> None:
        _sync(device)
        marks["encoder"] = marks.get("encoder", 0.0) + time.perf_counter() - marks["start"]

    real_encode = model.encode

    def encode(*args: object, **kwargs: object) -> object:
        _sync(device)
        start = time.perf_counter()
        out = real_encode(*args, **kwargs)
        _sync(device)
        marks["encode"] = marks.get("encode", 0.0) + time.perf_counter() - start
        return out

    hooks = [model.encoder.register_forward_pre_hook(before), model.encoder.register_forward_hook(after)]
    model.encode = encode
    samples = []
    try:
        for i in range(warmup * len(runs) + repeats):
            marks.clear()
            _sync(device)
            start = time.perf_counter()
            runs[i % len(runs)]()
            _sync(device)
            total = time.perf_counter() - start
            if i >= warmup * len(runs):
                enc, encode_s = marks.get("encoder", 0.0), marks.get("encode", 0.0)
                samples.append((enc, max(0.0, encode_s - enc), max(0.0, total - encode_s), total))
    finally:
        for hook in hooks:
            hook.remove()
        del model.encode
    return samples


def _timings(samples: list[tuple[float, ...]]) -> list[Timing]:
    return [Timing.of([s[k] for s in samples]) for k in range(len(samples[0]))]


def benchmark_model(name: str, model: ImplicitSR, inputs: list[torch.Tensor], scale: float, repeats: int,
                    warmup: int, schedule: Schedule | None = None) -> Row:
    """Stage and total times of whole upscales (one tile), cycling over the input images."""
    return _interleaved([name], model, inputs, scale, repeats, warmup, [schedule])[0]


def benchmark_scale(names: tuple[str, str], model: ImplicitSR, inputs: list[torch.Tensor], scale: float,
                    repeats: int, warmup: int, tables: dict | None, key: str) -> list[Row]:
    """The exact row of a scale (names[0]) and, above x4 where the model has a table for `key`, the
    CMSR row (names[1]), its render against the exact one in its note. The two are timed in turns, an
    input's exact run then its CMSR run: on a machine whose speed wanders (a shared VM: the same exact
    render took 8 to 14 s at x30) a slow spell then falls on both, and the ratio is what CMSR is judged
    by. Where no coarse level would pay at this scale (levels whose pixels nearly fill their blocks:
    `schedule_for`), or on a renderer where CMSR does not pay, the engine renders exactly, and the CMSR
    row is that run, saying so."""
    if not tables or key not in tables or scale <= MIN_SCALE:
        return [benchmark_model(names[0], model, inputs, scale, repeats, warmup)]
    schedule = schedule_for(tables, key, scale)
    exact, row = _interleaved(list(names), model, inputs, scale, repeats, warmup, [None, schedule])
    device = inputs[0].device
    why = ("no coarse level pays at this scale" if schedule is None
           else None if pays(scale, renders_fused(model, inputs[0]), device)
           else f"CMSR does not pay on {device.type.upper()}" if device.type != "cpu"
           else f"CMSR does not pay on the PyTorch renderer below x{TORCH_MIN_SCALE:g}")
    if why:
        row.note = "; ".join(n for n in (f"rendered exactly: {why}", row.note) if n)
    else:
        row.note = "; ".join(n for n in (_against_exact(row, exact), row.note) if n)
    return [exact, row]


def _interleaved(names: list[str], model: ImplicitSR, inputs: list[torch.Tensor], scale: float, repeats: int,
                 warmup: int, schedules: list[Schedule | None]) -> list[Row]:
    """One row per schedule (None: exact), their runs in turns: each input under every schedule, then
    the next input."""
    device = inputs[0].device
    in_hw = tuple(inputs[0].shape[-2:])
    out_hw = (round(in_hw[0] * scale), round(in_hw[1] * scale))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    drawn: list[list[float]] = [[] for _ in schedules]

    def runner(inp: torch.Tensor, k: int) -> Callable[[], object]:
        def run() -> object:
            stats: dict[str, int] = {}
            # into 8-bit samples, as `lmf upscale` renders an 8-bit image
            out = upscale_tensor(model, inp, out_hw, EngineOptions(tile=max(in_hw)), schedules[k], stats=stats,
                                 dtype=torch.uint8)
            drawn[k].append(stats["rendered"] / stats["total"] if stats.get("total") else 1.0)
            return out
        return run

    n = len(schedules)
    with torch.inference_mode():
        samples = _stage_samples(model, [runner(inp, k) for inp in inputs for k in range(n)], device, repeats * n,
                                 warmup)
    macs = model_macs(model, in_hw, out_hw)
    rows = []
    for k, name in enumerate(names):
        mine = samples[k::n]
        enc, latent, render, total = _timings(mine)
        shares = drawn[k][-repeats:]
        fraction = statistics.mean(shares) if shares else 1.0
        rows.append(Row(name, scale, enc, latent, render, total, {**macs, "render": macs["render"] * fraction},
                        out_hw[0] * out_hw[1] / 1e6 / total.median_s, peak_memory_mb(device), fraction,
                        note=_spread_note(enc, latent, render, total), render_runs=[s[2] for s in mine],
                        drawn_runs=shares, inputs=len(inputs)))
    return rows


def _against_exact(cmsr: Row, exact: Row) -> str:
    """CMSR's render against the exact one: as a share, and per pixel drawn. Runs are paired by
    input (both rows cycle the inputs in the same order): each input's median run of each row (with
    --repeats a multiple of the inputs, a slow spell of the machine during one run is left out),
    summed over the inputs, not one median over all: the inputs draw different shares, so the median
    run of one row need not be the same input as the other's, nor have the mean share."""
    n = min(cmsr.inputs, len(cmsr.render_runs))  # fewer runs than inputs: the inputs timed
    exact_by_input = [statistics.median(exact.render_runs[i::n]) for i in range(n)]
    cmsr_by_input = [statistics.median(cmsr.render_runs[i::n]) for i in range(n)]
    drawn_by_input = [statistics.mean(cmsr.drawn_runs[i::n]) for i in range(n)]
    exact_s = sum(exact_by_input)
    drawn_s = sum(d * e for d, e in zip(drawn_by_input, exact_by_input, strict=True))
    render_s = sum(cmsr_by_input)
    return (f"render {render_s / exact_s:.2f}x exact's for {drawn_s / exact_s:.0%} drawn: "
            f"{render_s / drawn_s:.2f}x per pixel drawn")


def _spread_note(*stages: Timing) -> str:
    names = ("encoder", "latent", "render", "total")
    wide = [n for n, t in zip(names, stages, strict=False) if t.median_s > 1e-3 and t.spread_s > 0.2 * t.median_s]
    return f"spread over 20% of the median: {', '.join(wide)}" if wide else ""


def benchmark_bicubic(images: list[np.ndarray], scale: float, repeats: int, warmup: int) -> Row:
    import cv2

    h, w = images[0].shape[:2]
    size = (round(w * scale), round(h * scale))
    turn = itertools.cycle(images)
    samples = _time(lambda: cv2.resize(next(turn), size, interpolation=cv2.INTER_CUBIC),
                    torch.device("cpu"), repeats, warmup)
    total = Timing.of(samples)
    return Row("bicubic (OpenCV)", scale, None, None, None, total, {"render": 16.0 * size[0] * size[1]},
               size[0] * size[1] / 1e6 / total.median_s, peak_memory_mb(torch.device("cpu")))


def machine_info(device: torch.device) -> dict[str, str | int]:
    info: dict[str, str | int] = {"torch": torch.__version__, "threads": torch.get_num_threads(),
                                  "device": str(device), "python": platform.python_version(),
                                  "cpu": cpu_name()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    info["renderer"] = native.status() if device.type == "cpu" else "PyTorch"
    info.update(process.describe())
    return info


def test_image(height: int, width: int) -> np.ndarray:
    """A deterministic synthetic card (gradients, texture, edges), for machines without photos."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    r = 0.5 + 0.4 * np.sin(x / max(width, 1) * 6.0) * np.cos(y / max(height, 1) * 4.0)
    g = 0.5 + 0.3 * np.sin((x + y) / 7.0) * (x > width / 2)
    b = np.clip((x // 16 + y // 16) % 2 * 0.6 + 0.2 * y / max(height, 1), 0, 1)
    return (np.stack([r, g, b], -1).clip(0, 1) * 255).astype(np.uint8)


def photo_input(photo: np.ndarray, height: int, width: int) -> np.ndarray:
    """The largest centred crop of a photo with the input's aspect, downscaled (antialiased
    bicubic) to height x width: natural detail at the input size, as an LR photo has."""
    ph, pw = photo.shape[:2]
    crop_h, crop_w = (ph, round(ph * width / height)) if pw * height >= ph * width else (round(pw * height / width), pw)
    crop_h, crop_w = min(crop_h, ph), min(crop_w, pw)
    y0, x0 = (ph - crop_h) // 2, (pw - crop_w) // 2
    crop = photo[y0:y0 + crop_h, x0:x0 + crop_w]
    if (crop_h, crop_w) == (height, width):
        return crop.copy()
    return bicubic_resize_uint8(np.ascontiguousarray(crop), (height, width))


def liif_extrapolated(model: ImplicitSR, inp: torch.Tensor, scale: float, repeats: int, warmup: int,
                      window: int = 192) -> Row:
    """LIIF's time from a window x window output crop, scaled to the whole output (its cost
    is linear in output pixels); MACs for the whole output."""
    twin = liif_twin(model)
    device = inp.device
    in_hw = tuple(inp.shape[-2:])
    out_hw = (round(in_hw[0] * scale), round(in_hw[1] * scale))
    crop = (min(window, out_hw[0]), min(window, out_hw[1]))
    factor = out_hw[0] * out_hw[1] / (crop[0] * crop[1])
    with torch.inference_mode():
        enc = _time(lambda: twin.run_encoder(inp), device, repeats, warmup)
        g = encode_image(twin, inp, out_hw)
        part = _time(lambda: render_region(twin, g, out_hw, (0, crop[0]), (0, crop[1])), device, repeats, warmup)
    render = [p * factor for p in part]
    total = [a + b for a, b in zip(enc, render, strict=True)]
    macs = model_macs(twin, in_hw, out_hw)
    note = f"render timed on a {crop[1]}x{crop[0]} crop, scaled x{factor:.1f}" if factor > 1 else ""
    return Row("LIIF (same encoder)", scale, Timing.of(enc), Timing.of([0.0] * len(enc)), Timing.of(render),
               Timing.of(total), macs, out_hw[0] * out_hw[1] / 1e6 / statistics.median(total),
               peak_memory_mb(device), note=note)


def psnr_by_scale(model: ImplicitSR, device: torch.device, images: list[Path], scales: list[float], tables: dict,
                  key: str, others: dict[str, ImplicitSR] | None = None) -> dict[tuple[str, float], float]:
    """PSNR of LMF, LMF + CMSR, `others` (e.g. DIIF) and bicubic on `images` (standard protocol) up to x12."""
    scores: dict[tuple[str, float], float] = {}
    for scale in [s for s in scales if s <= 12]:
        methods = {"LMF": model_method(model, str(device)), "bicubic": bicubic_method}
        schedule = schedule_for(tables, key, scale)
        if schedule is not None:
            methods["LMF + CMSR"] = model_method(model, str(device), schedule)
        for name, other in (others or {}).items():
            methods[name] = model_method(other, str(device))
        for result in evaluate(methods, images, [scale], with_ssim=False):
            name = "bicubic (OpenCV)" if result.method == "bicubic" else result.method
            scores[(name.split(" (")[0], scale)] = result.psnr
    return scores


PLOT_FORMATS = ("png", "svg", "pdf")


def plot(path: Path, rows: list[Row], scores: dict[tuple[str, float], float], title: str, fmt: str = "png") -> None:
    """Time and PSNR against scale, one line per method (needs matplotlib), as a `fmt` file (PLOT_FORMATS)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, (ax_time, ax_psnr) = plt.subplots(1, 2, figsize=(11, 4.2))
    for method in dict.fromkeys(r.method for r in rows):
        points = [(r.scale, r.total.median_s) for r in rows if r.method == method]
        ax_time.plot(*zip(*points, strict=True), marker="o", label=method)
    ax_time.set(xscale="log", yscale="log", xlabel="scale", ylabel="seconds (whole upscale)", title="time")
    for method in dict.fromkeys(m for m, _ in scores):
        points = sorted((s, v) for (m, s), v in scores.items() if m == method)
        ax_psnr.plot(*zip(*points, strict=True), marker="o", label=method)
    ax_psnr.set(xscale="log", xlabel="scale", ylabel="Set5 PSNR (dB, Y)", title="quality")
    for ax in (ax_time, ax_psnr):
        ax.set_xticks(sorted({r.scale for r in rows}))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("x%g"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format=fmt)
    plt.close(fig)


def benchmark_inputs(height: int, width: int, photos: list[Path]) -> tuple[list[np.ndarray], str]:
    """The timed inputs: photos cropped and downscaled to the input size, or the synthetic
    card when none are given; and a line saying which, for the table."""
    if not photos:
        return [test_image(height, width)], "a synthetic test card (no photos found)"
    images = [photo_input(load_rgb(p), height, width) for p in photos]
    return images, f"{len(photos)} photo{'s' * (len(photos) > 1)} ({', '.join(p.stem for p in photos)})"


# Video: what did not change is not computed again ----------------------------------------------------------

class SequenceUpscaler(Protocol):
    """What the video benchmark needs of an upscaler (`lmf_cli.Upscaler` is one)."""

    def upscale_batch(self, images: np.ndarray, scale: Any = None, size: tuple[int, int] | None = None) -> np.ndarray:
        ...

    def upscale_sequence(self, frames: np.ndarray, scale: Any = None, size: tuple[int, int] | None = None, *,
                         previous: Previous | None = None) -> tuple[np.ndarray, int]: ...


@dataclass
class ReuseRow:
    clip: str
    frames: int  # timed frames (after the clip's first, which a segment computes whole)
    reused: float  # share of the output area copied from the frame before
    plain_fps: float
    reuse_fps: float
    identical: bool  # every output byte equals the full computation's

    @property
    def speedup(self) -> float:
        return self.reuse_fps / self.plain_fps

    def as_dict(self) -> dict:
        return {**asdict(self), "speedup": self.speedup}


CURSOR = np.array([[int(c) for c in row] for row in (
    "100000000000", "120000000000", "122000000000", "122200000000", "122220000000", "122222000000",
    "122222200000", "122222220000", "122222222000", "122222222200", "122222222220", "122222211111",
    "122122210000", "121012221000", "110012221000", "100001222100", "000001222100", "000000111000")])


def video_clips(height: int, width: int, frames: int, picture: np.ndarray) -> dict[str, np.ndarray]:
    """The benchmark's clips, N x height x width x 3, from one picture of at least (height + frames) x
    (width + 2 * frames): a screen recording (the still picture, a 12 x 18 cursor that moves every frame),
    an animation (a pan whose drawings are held two frames each) and a camera pan (every pixel moves)."""
    still = picture[:height, :width]
    screen = []
    for k in range(frames):
        frame = still.copy()
        y = int((height - CURSOR.shape[0]) * (0.5 + 0.4 * np.sin(k / 5)))
        x = int((width - CURSOR.shape[1]) * (0.5 + 0.4 * np.cos(k / 7)))
        spot = frame[y:y + CURSOR.shape[0], x:x + CURSOR.shape[1]]
        spot[CURSOR == 1], spot[CURSOR == 2] = 0, 255
        screen.append(frame)
    pan = [picture[k:k + height, 2 * k:2 * k + width] for k in range(frames)]
    return {"screen recording": np.stack(screen), "animation (twos)": np.stack([pan[k // 2] for k in range(frames)]),
            "camera pan": np.stack(pan)}


def h264_round_trip(clip: np.ndarray, crf: int = 18) -> np.ndarray:
    """A clip through libx264 (4:2:0, `crf`, default preset) and back to RGB, as a file of it decodes."""
    import av

    enc = av.CodecContext.create("libx264", "w")
    enc.width, enc.height, enc.pix_fmt = clip.shape[2], clip.shape[1], "yuv420p"
    enc.time_base, enc.framerate = Fraction(1, 30), Fraction(30)
    enc.options = {"crf": str(crf)}
    packets = [p for frame in clip for p in enc.encode(av.VideoFrame.from_ndarray(frame, format="rgb24"))]
    packets += enc.encode(None)
    dec = av.CodecContext.create("h264", "r")
    decoded = [f for p in packets for f in dec.decode(p)] + list(dec.decode(None))
    return np.stack([f.to_ndarray(format="rgb24") for f in decoded])


def benchmark_reuse(up: SequenceUpscaler, name: str, clip: np.ndarray, scale: float) -> ReuseRow:
    """Frames per second of a clip upscaled one frame at a time, in full and reusing what did not change,
    the two timed frame by frame in turns (so both see the same load on a shared machine), after the
    first frame; and whether every output byte agrees."""
    previous = Previous(clip[0], up.upscale_batch(clip[:1], scale)[0])
    seconds = {False: 0.0, True: 0.0}
    copied = total = 0
    identical = True
    for k, frame in enumerate(clip[1:]):
        outputs = {}
        for reuse in (True, False) if k % 2 else (False, True):
            start = time.perf_counter()
            outputs[reuse] = up.upscale_sequence(frame[None], scale, previous=previous) if reuse else \
                (up.upscale_batch(frame[None], scale), 0)
            seconds[reuse] += time.perf_counter() - start
        (full, _), (reused, count) = outputs[False], outputs[True]
        identical &= bool(np.array_equal(full, reused))
        copied, total = copied + count, total + full[0, ..., 0].size
        previous = Previous(frame, reused[0])
    n = len(clip) - 1
    return ReuseRow(name, n, copied / total, n / seconds[False], n / seconds[True], identical)


# The paper's headline (He et al., CVPR 2024): LM-CiaoSR against CiaoSR on the same encoder.
PAPER_MACS_SAVED = 0.999
PAPER_SPEEDUP = 57.0


def ciaosr_pair(device: torch.device) -> tuple[ImplicitSR, ImplicitSR]:
    """CiaoSR and LM-CiaoSR in their official configurations on one EDSR-baseline encoder module
    (random weights: only their cost is measured)."""
    from lmf_cli import models as registry

    torch.manual_seed(0)
    lm = registry.make(registry.lmciaosr_spec()).to(device).eval()
    ciao = registry.make(registry.ciaosr_spec()).to(device).eval()
    ciao.encoder = lm.encoder
    return ciao, lm


def benchmark_extrapolated(name: str, model: ImplicitSR, inp: torch.Tensor, scale: float, repeats: int,
                           warmup: int, window: int = 64) -> Row:
    """A model too slow to render whole outputs here: the encoder and latent stage timed on the
    whole input, the render on a window x window output crop in the engine's blocks, scaled to the
    whole output (its cost is linear in output pixels); MACs for the whole output."""
    from lmf_cli.engine.budget import render_block

    device = inp.device
    in_hw = tuple(inp.shape[-2:])
    out_hw = (round(in_hw[0] * scale), round(in_hw[1] * scale))
    crop = (min(window, out_hw[0]), min(window, out_hw[1]))
    factor = out_hw[0] * out_hw[1] / (crop[0] * crop[1])
    block_h, block_w = render_block(model.capabilities, None, device=device)
    with torch.inference_mode():
        enc = _time(lambda: model.run_encoder(inp), device, repeats, warmup)
        both = _time(lambda: encode_image(model, inp, out_hw), device, repeats, warmup)
        g = encode_image(model, inp, out_hw)

        def render() -> None:
            for r in range(0, crop[0], block_h):
                for c in range(0, crop[1], block_w):
                    render_region(model, g, out_hw, (r, min(crop[0], r + block_h)), (c, min(crop[1], c + block_w)))

        part = _time(render, device, repeats, warmup)
    latent = [max(0.0, b - e) for b, e in zip(both, enc, strict=True)]
    rendered = [p * factor for p in part]
    total = [b + r for b, r in zip(both, rendered, strict=True)]
    note = f"render timed on a {crop[1]}x{crop[0]} crop, scaled x{factor:.1f}" if factor > 1 else ""
    return Row(name, scale, Timing.of(enc), Timing.of(latent), Timing.of(rendered), Timing.of(total),
               model_macs(model, in_hw, out_hw), out_hw[0] * out_hw[1] / 1e6 / statistics.median(total),
               peak_memory_mb(device), note=note)


def ciaosr_rows(inputs: list[torch.Tensor], scale: float, repeats: int, warmup: int, window: int = 64,
                pair: tuple[ImplicitSR, ImplicitSR] | None = None) -> list[Row]:
    """LM-CiaoSR (whole upscales, as LMF's rows) and CiaoSR (`benchmark_extrapolated`) at one scale."""
    ciao, lm = pair or ciaosr_pair(inputs[0].device)
    return [benchmark_model("LM-CiaoSR (random weights)", lm, inputs, scale, repeats, warmup),
            benchmark_extrapolated("CiaoSR (random weights)", ciao, inputs[0], scale, repeats, warmup, window)]


def ciaosr_claim(lm: Row, ciao: Row) -> str:
    """One line per scale: decoder MACs saved and whole-upscale speed-up, beside the paper's."""
    lm_dec = lm.macs["latent"] + lm.macs["render"]
    ciao_dec = ciao.macs["latent"] + ciao.macs["render"]
    return (f"x{lm.scale:g}: decoder {ciao_dec / 1e9:,.0f} vs {lm_dec / 1e9:,.0f} GMACs, {1 - lm_dec / ciao_dec:.2%} "
            f"fewer (paper: up to {PAPER_MACS_SAVED:.1%}); whole upscale {ciao.total.median_s:.1f} vs "
            f"{lm.total.median_s:.1f} s, {ciao.total.median_s / lm.total.median_s:.1f}x faster (paper: up to "
            f"{PAPER_SPEEDUP:g}x)")
