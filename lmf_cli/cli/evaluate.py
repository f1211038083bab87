"""`lmf eval` (the SR protocol, optionally on degraded inputs) and `lmf benchmark` (where the time goes)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.table import Table

from lmf_cli.cli.arguments import parse_scales, parse_wxh
from lmf_cli.cli.common import (
    MaxMemory,
    checked,
    console,
    fail,
    open_upscaler,
    parse_amount,
    require_matplotlib,
    stdout,
    write_file,
    write_text,
)
from lmf_cli.errors import LmfError
from lmf_cli.options import EngineOptions

if TYPE_CHECKING:
    from lmf_cli.api import Upscaler


def evaluate_cmd(
    folders: list[Path] = typer.Argument(..., help="HR image folders or files (e.g. data/Set5/HR)."),
    model: str = typer.Option("lmf-edsr", "--model", "-m"),
    scales: str = typer.Option("2,3,4", "--scales", help="Comma-separated, e.g. 2,3,4,6,8,12."),
    protocol: str = typer.Option("benchmark", "--protocol", help="benchmark (Y, shave=s) or div2k (RGB, s+6)."),
    device: str = typer.Option("auto", "--device"),
    precision: str = typer.Option("fp32", "--precision", help="fp32: the card's figures, alike on every machine; "
                                  "auto, bf16 or fp16 to score what lmf upscale runs here."),
    no_bicubic: bool = typer.Option(False, "--no-bicubic", help="Skip the bicubic row."),
    json_out: Path | None = typer.Option(None, "--json", help="Write the results as JSON here (- for stdout)."),
    record: bool = typer.Option(False, "--record", help="Store the PSNRs in the model's .safetensors card."),
    degrade: str | None = typer.Option(None, "--degrade", help="Degrade the bicubic LR first, as real files are: "
                                       "jpeg:75, noise:5, h264:28, blur:0.8, or a chain such as noise:3+jpeg:60."),
    self_ensemble: bool = typer.Option(False, "--self-ensemble", help="Score the geometric self-ensemble (the 8 "
                                       "flips and rotations averaged, 8x the time) instead of one pass."),
) -> None:
    """PSNR / SSIM of a model (and bicubic) with the standard SR protocol.

    With --degrade, the model and bicubic get the same degraded LR and are scored against the clean HR.
    """
    from lmf_cli.evaluation.protocol import bicubic_method, evaluate, model_method, record_results
    from lmf_cli.imaging.degradations import parse_degradation
    from lmf_cli.io.images import list_images

    if protocol not in ("benchmark", "div2k"):
        fail("--protocol must be benchmark or div2k")
    if record and self_ensemble:
        fail("--record keeps the card's one-pass figures: leave out --self-ensemble")
    if record and precision != "fp32":
        fail("--record keeps the card's float32 figures: leave out --precision")
    try:
        degradation = parse_degradation(degrade) if degrade else None
    except ValueError as exc:
        fail(f"--degrade {exc}")
    scale_list = checked(parse_scales, scales, "--scales")
    try:
        up = open_upscaler(model, checked(EngineOptions, device, precision))
    except LmfError as exc:
        fail(str(exc))
    rows = []
    for folder in folders:
        images = list_images(folder)
        if not images:
            fail(f"{folder}: no images found")
        methods = {up.name + (" (self-ensemble)" if self_ensemble else ""):
                   model_method(up.model, str(up.device), ensemble=self_ensemble)}
        if not no_bicubic:
            methods["bicubic"] = bicubic_method
        set_name = folder.parent.name if folder.name == "HR" else folder.name
        try:
            results = evaluate(methods, images, scale_list, protocol, degradation=degradation)
        except LmfError as exc:
            fail(str(exc))
        for r in results:
            rows.append({"set": set_name, "method": r.method, "scale": r.scale, "psnr": round(r.psnr, 3),
                         "ssim": round(r.ssim, 4), "images": r.images,
                         "per_image": {name: round(v, 3) for name, v in r.per_image.items()}})
    inputs = f", LR degraded by {degradation.name}" if degradation else ""
    table = Table("set", "method", *[f"x{s:g}" for s in scale_list],
                  title=f"PSNR (dB) / SSIM, {protocol} protocol{inputs}")
    for set_name in dict.fromkeys(r["set"] for r in rows):
        for method in dict.fromkeys(r["method"] for r in rows):
            cells = [f"{r['psnr']:.2f} / {r['ssim']:.4f}" for r in rows
                     if r["set"] == set_name and r["method"] == method]
            table.add_row(set_name, method, *cells)
    stdout.print(table)
    if record:
        try:
            source = record_results(up.loaded, up.model, up.name, rows, protocol,
                                    degradation.name if degradation else None)
        except LmfError as exc:
            fail(str(exc))
        console.print(f"recorded in {source}", highlight=False)
    if json_out is not None:
        text = json.dumps({"model": up.name, "protocol": protocol, "precision": up.precision,
                           "degradation": degradation.name if degradation else None, "results": rows}, indent=2)
        if str(json_out) == "-":
            print(text)
        else:
            write_text(json_out, text)


DEFAULT_DIIF = "diif-edsr"


def benchmark(
    size: str = typer.Option("320x180", "--size", help="Input size WxH."),
    scales: str | None = typer.Option(None, "--scales", help="Comma-separated factors (default 2,3,4,8,12,30; "
                                      "with --video, 2)."),
    model: str = typer.Option("lmf-edsr", "--model", "-m"),
    device: str = typer.Option("auto", "--device"),
    precision: str = typer.Option("auto", "--precision", help="Encoder precision: auto (as lmf upscale: fp16 on "
                                  "CUDA, bf16 on CPUs with native bf16, else fp32), fp32, bf16 or fp16."),
    repeats: int = typer.Option(3, "--repeats", help="Timed runs per measurement (median and spread). The "
                                "photos take turns: 9 times 3 photos three times each, and CMSR's cost per pixel "
                                "drawn then takes each photo's median run."),
    warmup: int = typer.Option(1, "--warmup"),
    liif: bool = typer.Option(True, "--liif/--no-liif", help="Time LIIF on the same encoder."),
    psnr: bool = typer.Option(False, "--psnr", help="Add Set5 PSNR (standard protocol) beside the time."),
    quick: bool = typer.Option(False, "--quick", help="96x64 input, x2/x4/x8, one repeat, no DIIF unless "
                               "--diif names one: a smoke test of a minute or two."),
    json_out: Path | None = typer.Option(None, "--json", help="Write every figure and the machine here."),
    plot: Path | None = typer.Option(None, "--plot", help="Time and PSNR against scale as an image (PNG; .svg "
                                     "or .pdf by the name)."),
    images: list[Path] = typer.Option(None, "--image", help="Time on this photo (repeatable), cropped and "
                                      "downscaled to --size; default: 3 B100 photos, else a synthetic card."),
    diif: str | None = typer.Option(DEFAULT_DIIF, "--diif", help="DIIF model timed beside LMF and LIIF "
                                    "(a name or file; skipped if it has no weights); --diif '' to leave it out."),
    video: bool = typer.Option(False, "--video", help="Time video frames instead, with and without reusing what "
                               "did not change (lmf video --no-reuse), on clips made here: a screen recording, an "
                               "animation in twos, a camera pan, and the screen recording through H.264 CRF 18."),
    frames: int = typer.Option(12, "--frames", min=2, help="With --video: frames per clip (the first, which a "
                               "segment computes whole, is not timed)."),
    max_memory: MaxMemory = None,
    large: str | None = typer.Option(None, "--large", help="Time tiling instead: a photo resized to this WxH "
                                     "(e.g. 2000x1500) upscaled at the memory budget (--max-memory) in streamed tiles "
                                     "(the default) and in tiles with margins, against an untiled --size crop, "
                                     "per output pixel, each with its peak memory."),
    ciaosr: bool = typer.Option(False, "--ciaosr", help="Add CiaoSR and LM-CiaoSR (official configurations, random "
                                "weights, one EDSR-baseline encoder): decoder MACs and whole-upscale time beside "
                                "the paper's 'up to 99.9% fewer MACs, 57x faster'. CiaoSR renders a crop, scaled."),
) -> None:
    """Time the encoder, latent MLP and rendering of LMF (with and without CMSR) beside LIIF
    and bicubic, with MACs from the architecture; or, with --video, video frames with and
    without reuse."""
    import torch

    from lmf_cli.engine.cmsr import DEFAULT_THRESHOLD
    from lmf_cli.evaluation import benchmark as bench
    from lmf_cli.io.images import list_images

    plot_format = None if plot is None else (plot.suffix.lstrip(".").lower() or "png")
    if plot is not None:
        require_matplotlib("--plot")
        if plot_format not in bench.PLOT_FORMATS:
            fail(f"--plot {plot}: name a .png, .svg or .pdf file")
    if quick:
        size, repeats, warmup, frames = "96x64", 1, 1, 4
        scales = scales or ("2" if video else "2,4,8")
        diif = None if diif == DEFAULT_DIIF else diif  # a named one is still timed
    scales = scales or ("2" if video else "2,3,4,8,12,30")
    in_h, in_w = checked(parse_wxh, size, "--size")
    scale_list = checked(parse_scales, scales, "--scales")
    budget = parse_amount(max_memory, "--max-memory", 1024) if max_memory else None
    try:
        up = open_upscaler(model, checked(EngineOptions, device, precision, None, budget))
    except LmfError as exc:
        fail(str(exc))
    photos = list(images or [])
    for photo in photos:
        if not photo.is_file():
            fail(f"--image {photo}: no such file")
    data = Path(os.environ.get("LMF_DATA", "")) if os.environ.get("LMF_DATA") else None
    if not photos and data is not None and (data / "B100" / "HR").is_dir():
        photos = list_images(data / "B100" / "HR")[:3]
    if video:
        _video_benchmark(up, in_h, in_w, scale_list, frames, photos, json_out)
        return
    if large is not None:
        _tiling_benchmark(up, checked(parse_wxh, large, "--large"), (in_h, in_w), scale_list[0], repeats, photos,
                          json_out)
        return
    try:
        pictures, source = bench.benchmark_inputs(in_h, in_w, photos)
    except OSError as exc:
        fail(f"--image: {exc}")
    inputs = [torch.tensor(p).permute(2, 0, 1)[None].float().div(127.5).sub(1).to(up.device) for p in pictures]
    diif_up = _optional_model(diif, up.options) if diif else None
    info = {**bench.machine_info(up.device), "precision": up.precision}
    console.print(f"{up.name} on {info['device']} ({info.get('gpu', info['cpu'])}, {info['threads']} threads), "
                  f"{_precision_words(up)}, rendering by {info['renderer']}, input {in_w} x {in_h}; freed memory "
                  f"{info['freed memory']}, GOMP_SPINCOUNT {info['GOMP_SPINCOUNT']}", highlight=False)
    tables = up.loaded.cmsr_tables or {}
    key = f"{DEFAULT_THRESHOLD:g}"
    rows = []
    pair = bench.ciaosr_pair(up.device) if ciaosr else None
    for scale in scale_list:
        if pair is not None:
            rows.extend(bench.ciaosr_rows(inputs, scale, repeats, warmup, 32 if quick else 64, pair))
        rows.extend(bench.benchmark_scale((f"LMF ({up.name})", f"LMF + CMSR ({up.name})"), up.model, inputs, scale,
                                          repeats, warmup, tables, key))
        if liif:
            rows.append(bench.liif_extrapolated(up.model, inputs[0], scale, repeats, warmup,
                                                window=96 if quick else 192))
        if diif_up is not None:
            rows.append(bench.benchmark_model(f"DIIF ({diif_up.name})", diif_up.model, inputs, scale, repeats, warmup))
        rows.append(bench.benchmark_bicubic(pictures, scale, repeats, warmup))
        console.print(f"x{scale:g} done", highlight=False)
    scores = {}
    if psnr:
        set5 = list_images(data / "Set5" / "HR") if data is not None and (data / "Set5" / "HR").is_dir() else []
        if set5:
            others = {"DIIF": diif_up.model} if diif_up is not None else {}
            scores = bench.psnr_by_scale(up.model, up.device, set5, scale_list, tables, key, others)
        else:
            console.print("no Set5 images (set LMF_DATA to the folder holding Set5/HR); skipping PSNR",
                          highlight=False)
    table = Table("method", "scale", "encoder", "latent", "render", "total", "GMACs enc/lat/rend", "MP/s",
                  "peak MB", "drawn", "PSNR", title=f"lmf benchmark, {in_w} x {in_h} input from {source}, "
                  f"median of {repeats}")
    for row in rows:
        stages = [f"{t.median_s * 1e3:.0f} ms" if t else "" for t in (row.encoder, row.latent, row.render)]
        macs = "/".join(f"{row.macs.get(k, 0) / 1e9:.1f}" for k in ("encoder", "latent", "render"))
        score = scores.get((row.method.split(" (")[0], row.scale))
        table.add_row(row.method, f"x{row.scale:g}", *stages,
                      f"{row.total.median_s * 1e3:.0f} ± {row.total.spread_s * 1e3:.0f} ms", macs,
                      f"{row.megapixels_per_s:.3g}", f"{row.peak_memory_mb:.0f}", f"{row.rendered_fraction:.0%}",
                      f"{score:.2f}" if score else "")
    stdout.print(table)
    for row in rows:
        if row.note:
            console.print(f"{row.method} x{row.scale:g}: {row.note}", highlight=False)
    for scale in scale_list:
        lmf_row = next(r for r in rows if r.scale == scale and r.method.startswith("LMF ("))
        liif_row = next((r for r in rows if r.scale == scale and r.method.startswith("LIIF")), None)
        if liif_row:
            lmf_dec = lmf_row.macs["latent"] + lmf_row.macs["render"]
            lmf_time = lmf_row.latent.median_s + lmf_row.render.median_s
            stdout.print(f"x{scale:g}: decoder {lmf_dec / 1e9:.1f} vs LIIF {liif_row.macs['render'] / 1e9:.0f} "
                            f"GMACs ({liif_row.macs['render'] / lmf_dec:.0f}x fewer); decoder time "
                            f"{lmf_time:.2f} vs {liif_row.render.median_s:.2f} s "
                            f"({liif_row.render.median_s / max(lmf_time, 1e-9):.0f}x faster); whole upscale "
                            f"{liif_row.total.median_s / lmf_row.total.median_s:.1f}x faster", highlight=False)
    for lm_row, ciao_row in zip(rows[::1], rows[1:], strict=False):
        if lm_row.method.startswith("LM-CiaoSR") and ciao_row.method.startswith("CiaoSR"):
            stdout.print(bench.ciaosr_claim(lm_row, ciao_row), highlight=False)
    if json_out is not None:
        payload = {"machine": info, "input_wh": [in_w, in_h], "input": source, "model": up.name, "repeats": repeats,
                   "rows": [r.as_dict() for r in rows],
                   "psnr": [{"method": m, "scale": s, "psnr": v} for (m, s), v in scores.items()]}
        write_text(json_out, json.dumps(payload, indent=2))
    if plot is not None:
        title = f"{up.name}, {in_w} x {in_h}, {info.get('gpu', info['cpu'])}"
        write_file(plot, lambda tmp: bench.plot(tmp, rows, scores, title, plot_format))


def _video_benchmark(up, in_h: int, in_w: int, scales: list[float], frames: int, photos: list[Path],
                     json_out: Path | None) -> None:
    """Frames per second on the benchmark's clips, in full and with reuse, and the share reused."""
    from lmf_cli.evaluation import benchmark as bench

    try:  # one picture large enough for the pan's last frame
        (picture, *_), source = bench.benchmark_inputs(in_h + frames, in_w + 2 * frames, photos[:1])
    except OSError as exc:
        fail(f"--image: {exc}")
    clips = bench.video_clips(in_h, in_w, frames, picture)
    clips["screen recording, H.264 CRF 18"] = bench.h264_round_trip(clips["screen recording"])
    info = {**bench.machine_info(up.device), "precision": up.precision}
    console.print(f"{up.name} on {info['device']} ({info.get('gpu', info['cpu'])}, {info['threads']} threads), "
                  f"{_precision_words(up)}, input {in_w} x {in_h} from {source}; each clip {frames} frames, "
                  "the first not timed; full and reuse timed in turns, frame by frame", highlight=False)
    rows = []
    for scale in scales:
        table = Table("clip", "reused", "fps full", "fps reuse", "speed-up", "same bytes",
                      title=f"lmf benchmark --video, {up.name} x{scale:g}, {in_w} x {in_h}")
        for name, clip in clips.items():
            row = bench.benchmark_reuse(up, name, clip, scale)
            rows.append({"scale": scale, **row.as_dict()})
            table.add_row(name, f"{row.reused:.1%}", f"{row.plain_fps:.3g}", f"{row.reuse_fps:.3g}",
                          f"{row.speedup:.2f}x", "yes" if row.identical else "NO")
        stdout.print(table)
    if json_out is not None:
        write_text(json_out, json.dumps({"machine": info, "model": up.name, "input_wh": [in_w, in_h],
                                         "input": source, "frames": frames, "video": rows}, indent=2))


def _tiling_benchmark(up, large_hw: tuple[int, int], crop_hw: tuple[int, int], scale: float, repeats: int,
                      photos: list[Path], json_out: Path | None) -> None:
    """Per output pixel: streamed tiles and tiles with margins on a large photo, against an untiled crop."""
    from dataclasses import asdict

    from lmf_cli.evaluation import benchmark as bench
    from lmf_cli.evaluation.large import benchmark_tiling, large_picture
    from lmf_cli.io.images import load_rgb

    try:
        (photo, *_), source = bench.benchmark_inputs(*crop_hw, photos[:1])
        if photos:
            photo = load_rgb(photos[0])
    except OSError as exc:
        fail(f"--image: {exc}")
    picture = large_picture(photo, *large_hw)
    info = {**bench.machine_info(up.device), "precision": up.precision}
    console.print(f"{up.name} on {info['device']} ({info.get('gpu', info['cpu'])}, {info['threads']} threads), "
                  f"{_precision_words(up)}, x{scale:g}; {large_hw[1]} x {large_hw[0]} from {source}; each way in "
                  "a process of its own", highlight=False)
    rows = benchmark_tiling(up.model, up.options, picture, crop_hw, scale, repeats)
    untiled = rows[0].us_per_pixel
    table = Table("way", "input", "tiles", "time", "us / output px", "vs untiled", "peak MB",
                  title=f"lmf benchmark --large, {up.name} x{scale:g}, median of {repeats}")
    for row in rows:
        table.add_row(row.way, f"{row.in_hw[1]} x {row.in_hw[0]}", str(row.tiles), f"{row.median_s:.2f} s",
                      f"{row.us_per_pixel:.2f}", f"{row.us_per_pixel / untiled:.3f}x", f"{row.peak_mb:.0f}")
    stdout.print(table)
    if json_out is not None:
        write_text(json_out, json.dumps({"machine": info, "model": up.name, "scale": scale, "input": source,
                                         "tiling": [{**asdict(row), "us_per_pixel": row.us_per_pixel}
                                                    for row in rows]}, indent=2))


def _precision_words(up: Upscaler) -> str:
    """What runs in reduced precision, for the benchmark's header."""
    return f"encoder{' and latent MLP' if up.model.latent_dtype is not None else ''} in {up.precision}"


def _optional_model(name: str, options: EngineOptions) -> Upscaler | None:
    """A second model for the benchmark under the first one's options, or None (with a note) when it has
    no weights."""
    try:
        return open_upscaler(name, options)
    except LmfError as exc:
        console.print(f"DIIF not timed: {exc}", highlight=False)
        return None
