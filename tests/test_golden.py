"""Golden outputs: what a fixed set of `lmf upscale` and `lmf video` jobs writes, recorded once, kept in git.

Why: a change meant to leave behaviour alone (a refactor of how options travel from the command line to
the engine, say) must not change one output byte. Each job below runs through the CLI (CliRunner, the
tiny random-weight LM-LIIF of conftest, --device cpu) on a small input stored in tests/golden/inputs/,
and what it writes is compared with tests/golden/outputs/. Its printed report (paths and timings masked)
and the input shapes of its encoder calls must be the recorded ones too: --tile, --max-memory and --batch
change no pixel by design, so only those calls show that they still reach the engine.

manifest.json keeps each output's sha256 and the signature of the environment it was recorded in (CPU
model and flags, C compiler, render path, and the versions of torch and of every codec library: see
`environment`). In that environment the bytes must be identical (for a video: every stream header and
packet, since Matroska writes random UIDs on every run). In another one, floats may differ in the last bit
and encoders may choose otherwise, so both files are decoded and must agree in frame count, size, dtype,
timing and metadata (ICC profile, EXIF); lossless pixels within 1 LSB, lossy ones (JPEG, WebP, HEIC, AVIF,
JPEG XL, GIF palettes, bf16) at PSNR >= 40 dB; videos in streams, tags, chapters and timestamps, with
byte-identical audio and subtitle packets, and frames within 2 LSB (FFV1) or at PSNR >= 40 dB (x264).
LMF_GOLDEN_TOLERANT=1 forces that decoded comparison, to try it where the bytes match (LMF_NATIVE=0, whose
PyTorch renderer differs from the compiled kernel in the last float bits, also gives another signature).

Recording (with the code whose outputs are the reference, before the change):

    LMF_RECORD_GOLDEN=1 python -m pytest -q tests/test_golden.py

makes the inputs from Set5 crops (first time only), calibrates the CMSR tables with `lmf calibrate`, runs
every job and rewrites tests/golden/. Inputs already recorded are kept, so that a new recording is of the
same inputs; delete tests/golden/ to make everything anew. A job whose codec the recording machine lacks
is listed in the manifest as skipped, and is skipped when comparing.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import platform
import re
import shutil
import struct
import subprocess
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from importlib import metadata
from pathlib import Path
from typing import Any

import av
import cv2
import numpy as np
import PIL
import pytest
import torch
from PIL import Image, ImageCms, features
from typer.testing import CliRunner

from lmf_cli.cli import app
from lmf_cli.hardware import cpu_flags, cpu_name
from lmf_cli.models.base import FeatureRows
from tests.conftest import DATA

GOLDEN = Path(__file__).with_name("golden")
INPUTS, OUTPUTS, MANIFEST = GOLDEN / "inputs", GOLDEN / "outputs", GOLDEN / "manifest.json"
RECORD = os.environ.get("LMF_RECORD_GOLDEN") == "1"
TOLERANT = os.environ.get("LMF_GOLDEN_TOLERANT") == "1"
MIN_PSNR = 40.0
CMSR_THRESHOLD = "2e-05"  # the table key of --quality balanced


# What this machine can encode and decode ----------------------------------------------------------------

def _importable(name: str) -> bool:
    try:
        __import__(name)
    except ImportError:
        return False
    return True


def _heic_encoder() -> bool:
    if not _importable("pillow_heif"):
        return False
    import pillow_heif

    return bool(pillow_heif.libheif_info().get("HEIF"))


CAPABILITIES: dict[str, Callable[[], bool]] = {
    "webp": lambda: bool(features.check("webp")),
    "avif": lambda: bool(features.check("avif")),
    "deep_avif": lambda: hasattr(cv2, "imencodeWithMetadata") and bool(cv2.haveImageWriter("x.avif")),
    "heic": _heic_encoder,
    "jxl": lambda: _importable("pyjpegxl"),
    "x264": lambda: "libx264" in av.codecs_available,
    "ffv1": lambda: "ffv1" in av.codecs_available,
}


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "absent"


def render_path() -> str:
    """The compiled kernel or PyTorch: they render the same pixels to the last float bit, not to the bit."""
    try:
        from lmf_cli.engine import native

        return native.status()
    except (ImportError, AttributeError):
        return f"LMF_NATIVE={os.environ.get('LMF_NATIVE', '1')}"


def environment() -> dict[str, str]:
    """Everything besides lmf's code that the output bytes depend on.

    Not `hardware.cpu_signature()`: that one names the host and its kernel (a build-cache key), which
    change nothing here, and lacks the library versions (an encoder update changes the bytes). Thread
    counts are left out: 1 and 2 threads (torch, and `taskset` for the codecs) wrote the same bytes.
    """
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    try:
        cc = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
        cc = cc.splitlines()[0] if cc else "unknown"
    except (TypeError, OSError, subprocess.SubprocessError):
        cc = "none"
    heif = "absent"
    if _importable("pillow_heif"):
        import pillow_heif

        heif = json.dumps(pillow_heif.libheif_info(), sort_keys=True)
    return {
        "machine": platform.machine(), "cpu": cpu_name(), "cpu_flags": " ".join(sorted(cpu_flags())),
        "compiler": cc, "render": render_path(), "LMF_CPU_BF16": os.environ.get("LMF_CPU_BF16", ""),
        "torch": torch.__version__, "numpy": np.__version__, "pillow": PIL.__version__,
        "pillow_libs": " ".join(f"{lib}={features.version(lib)}" for lib in
                                ("jpg", "zlib", "libtiff", "webp", "avif", "littlecms2")),
        "opencv": cv2.__version__, "av": av.__version__, "ffmpeg": json.dumps(av.library_versions, sort_keys=True),
        "libheif": heif, "pyjpegxl": _version("pyjpegxl"),
    }


def signature(env: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(env, sort_keys=True).encode()).hexdigest()[:16]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def content_digest(job: Job, path: Path) -> str:
    """What must be the same bytes where the environment is: the file; for a video, every stream's
    parameters and headers and every packet's timing, flags and bytes, that is the file but for the random
    segment and track UIDs Matroska writes anew on every run."""
    if job.command != "video":
        return sha256(path)
    digest = hashlib.sha256()
    with av.open(str(path)) as c:
        layout = video_streams(c)
        layout["extradata"] = [bytes(s.codec_context.extradata or b"").hex() if s.codec_context else ""
                               for s in c.streams]
        digest.update(json.dumps(layout, sort_keys=True, default=str).encode())
        for p in c.demux():
            digest.update(repr((p.stream.index, p.pts, p.dts, p.duration, p.is_keyframe)).encode() + bytes(p))
    return digest.hexdigest()


# Inputs: small crops of Set5, every one made here with the codec libraries ------------------------------

def crop(h: int, w: int, top: int = 96, left: int = 80, name: str = "butterfly") -> np.ndarray:
    """A real photo crop (8-bit RGB): texture and edges, as a user's image has."""
    with Image.open(DATA / "Set5" / "HR" / f"{name}.png") as img:
        return np.asarray(img.convert("RGB"))[top:top + h, left:left + w].copy()


def moving(h: int, w: int, n: int = 3) -> list[np.ndarray]:
    """n different frames (the crop slides sideways), so order and skipped frames show."""
    return [crop(h, w, left=80 + 7 * i) for i in range(n)]


ICC = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def camera_exif(orientation: int = 1) -> bytes:
    exif = Image.Exif()
    exif[0x010F] = "LMF Golden"
    exif[0x0112] = orientation
    exif.get_ifd(0x8769).update({0x9003: "2026:01:02 03:04:05"})
    return exif.tobytes()


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def sixteen_bit(rgb: np.ndarray) -> np.ndarray:
    """Real 16-bit samples (not 8-bit ones widened): the photo plus a ramp in the low byte."""
    ramp = np.arange(rgb.shape[1])[None, :, None] * 97 % 256 - 128
    return np.clip(rgb.astype(np.int64) * 257 + ramp, 0, 65535).astype(np.uint16)


def make_png16(path: Path) -> None:
    ok, buf = cv2.imencode(".png", sixteen_bit(crop(20, 24))[..., ::-1])
    assert ok
    data = buf.tobytes()
    extra = _chunk(b"iCCP", b"sRGB\x00\x00" + zlib.compress(ICC)) + _chunk(b"eXIf", camera_exif()[6:])
    path.write_bytes(data[:33] + extra + data[33:])  # after IHDR


def make_rgba(path: Path) -> None:
    rgb = crop(24, 32)
    alpha = np.tile(np.linspace(0, 255, 32).astype(np.uint8), (24, 1))
    alpha[8:14, 10:20] = 0  # a hole
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(path)


def gray(rgb: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(rgb).convert("L"))


def make_gray_alpha(path: Path) -> None:
    g = gray(crop(24, 32))
    Image.fromarray(np.dstack([g, 255 - g]), "LA").save(path)


def make_jpeg(path: Path) -> None:
    stored = crop(20, 24)
    stored[:4, :4] = 255  # a mark in the stored corner: a wrong turn shows
    Image.fromarray(stored).save(path, quality=95, exif=camera_exif(6), icc_profile=ICC)


def make_tiff16(path: Path) -> None:
    rgba = np.dstack([sixteen_bit(crop(20, 24)), np.full((20, 24), 50000, np.uint16)])
    ok, buf = cv2.imencode(".tiff", cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA))
    assert ok
    path.write_bytes(buf.tobytes())


def make_gif(path: Path) -> None:
    frames = []
    for index, rgb in enumerate(moving(20, 24)):
        pal = Image.fromarray(rgb).quantize(255)
        if index == 0:  # a transparent corner in frame 1
            idx = np.asarray(pal).copy()
            idx[:6, :8] = 255
            palette = pal.getpalette()[:765] + [0, 0, 0]
            pal = Image.fromarray(idx, "P")
            pal.putpalette(palette)
            pal.info["transparency"] = 255
        frames.append(pal)
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=[80, 120, 200], loop=0,
                   disposal=[2, 1, 1])


def make_apng(path: Path) -> None:
    alpha = np.tile(np.linspace(40, 255, 24).astype(np.uint8), (20, 1))
    images = [Image.fromarray(np.dstack([f, alpha if i != 1 else np.full_like(alpha, 255)]))
              for i, f in enumerate(moving(20, 24))]
    images[0].save(path, save_all=True, append_images=images[1:], duration=[50, 100, 150], loop=3,
                   disposal=[0, 1, 2], blend=[0, 1, 0])


def make_webp_animation(path: Path) -> None:
    images = [Image.fromarray(f) for f in moving(20, 24)]
    images[0].save(path, save_all=True, append_images=images[1:], duration=[70, 140, 210], loop=2, lossless=True)


def make_pages(path: Path) -> None:
    rgb = crop(20, 24)
    pages = [Image.fromarray(rgb), Image.fromarray(gray(rgb[::-1])), Image.fromarray(rgb[::2, ::2].copy())]
    pages[0].save(path, save_all=True, append_images=pages[1:])


def make_heic(path: Path) -> None:
    """A 10-bit HEIC as a phone writes it: lossy 4:2:0, a profile, EXIF orientation 6."""
    import pillow_heif

    raw = (crop(20, 24).astype(np.uint16) * 1023 // 255) << 6
    buf = io.BytesIO()
    pillow_heif.encode("RGB;16", (24, 20), np.ascontiguousarray(raw.astype("<u2")).tobytes(), buf, quality=90,
                       bit_depth=10, icc_profile=ICC, exif=camera_exif(6))
    path.write_bytes(buf.getvalue())


def make_deep_avif(path: Path) -> None:
    """A lossless 10-bit AVIF with a profile and EXIF (OpenCV's libavif)."""
    raw = crop(20, 24).astype(np.uint16) * 1023 // 255
    raw[:, :, 0] += np.arange(24, dtype=np.uint16)[None, :] % 4  # 10-bit detail
    ok, buf = cv2.imencodeWithMetadata(".avif", cv2.cvtColor(raw, cv2.COLOR_RGB2BGR),
                                       [cv2.IMAGE_METADATA_ICCP, cv2.IMAGE_METADATA_EXIF],
                                       [np.frombuffer(ICC, np.uint8), np.frombuffer(camera_exif()[6:], np.uint8)],
                                       [cv2.IMWRITE_AVIF_DEPTH, 10, cv2.IMWRITE_AVIF_QUALITY, 100])
    assert ok
    path.write_bytes(buf.tobytes())


def make_phone_avif(path: Path) -> None:
    """An 8-bit AVIF with alpha and orientation 6 (irot/imir), as Pillow writes it."""
    rgba = np.dstack([crop(20, 24), np.tile(np.linspace(60, 255, 24).astype(np.uint8), (20, 1))])
    Image.fromarray(rgba).save(path, exif=camera_exif(6), icc_profile=ICC, quality=90)


def make_jxl(path: Path) -> None:
    import pyjpegxl

    box = b"\0\0\0\0" + camera_exif()[6:]  # a JPEG XL Exif box: offset to the TIFF header, then the EXIF
    path.write_bytes(pyjpegxl.encode_from_numpy(sixteen_bit(crop(20, 24)), lossless=True, icc=ICC, exif=box))


def make_calm(path: Path) -> None:
    """Half flat, half texture: CMSR draws the flat half coarse and the rest in full."""
    image = crop(12, 16)
    image[:, :7] = (120, 130, 140)
    Image.fromarray(image).save(path)


SRT = "1\n00:00:00,050 --> 00:00:00,150\nhello\n\n2\n00:00:00,160 --> 00:00:00,240\nworld\n"


def make_clip(path: Path) -> None:
    """Six frames of H.264 (BT.709 tags), AAC stereo, SRT subtitles, a title and two chapters."""
    tb, durations = Fraction(1, 1000), [42] * 6
    srt = path.with_suffix(".srt")
    srt.write_text(SRT)
    with av.open(str(srt)) as sub_in, av.open(str(path), "w") as out:
        video = out.add_stream("libx264", rate=24)
        video.width, video.height, video.pix_fmt = 32, 24, "yuv420p"
        video.time_base = video.codec_context.time_base = tb
        video.color_primaries = video.color_trc = video.colorspace = 1
        video.color_range = 1
        video.codec_context.options = {"threads": "1"}
        sound = out.add_stream("aac", rate=48000)
        sound.layout = "stereo"
        sound.metadata["language"] = "fra"
        out.metadata["title"] = "lmf golden"
        text = out.add_stream_from_template(sub_in.streams.subtitles[0])
        out.set_chapters([{"id": i + 1, "start": lo, "end": hi, "time_base": tb, "metadata": {"title": name}}
                          for i, (lo, hi, name) in enumerate([(0, 120, "one"), (120, sum(durations), "two")])])
        pts = 0
        for i, ms in enumerate(durations):
            frame = av.VideoFrame.from_ndarray(crop(24, 32, left=80 + 5 * i), format="rgb24")
            frame = frame.reformat(format="yuv420p", dst_colorspace="ITU709", dst_color_range="MPEG")
            frame.pts, frame.time_base, frame.duration = pts, tb, ms
            out.mux(video.encode(frame))
            pts += ms
        out.mux(video.encode(None))
        samples, done = 48 * pts, 0
        t = np.arange(samples, dtype=np.float32) / 48000
        wave = np.stack([0.2 * np.sin(2 * np.pi * 440 * t), 0.1 * np.sin(2 * np.pi * 660 * t)]).astype(np.float32)
        while done < samples:
            n = min(1024, samples - done)
            chunk = av.AudioFrame.from_ndarray(np.ascontiguousarray(wave[:, done:done + n]), format="fltp",
                                               layout="stereo")
            chunk.sample_rate, chunk.pts = 48000, done
            out.mux(sound.encode(chunk))
            done += n
        out.mux(sound.encode(None))
        for packet in sub_in.demux(sub_in.streams.subtitles[0]):
            if packet.dts is not None:
                packet.stream = text
                out.mux(packet)
    srt.unlink()


def _png(pixels: Callable[[], np.ndarray]) -> Callable[[Path], None]:
    return lambda path: Image.fromarray(pixels()).save(path)


# name -> (maker, capability it needs or None)
INPUT_MAKERS: dict[str, tuple[Callable[[Path], None], str | None]] = {
    "rgb.png": (_png(lambda: crop(24, 32)), None),
    "small.png": (_png(lambda: crop(16, 20, top=120, left=100)), None),
    "deep.png": (make_png16, None),
    "rgba.png": (make_rgba, None),
    "gray.png": (_png(lambda: gray(crop(24, 32))), None),
    "gray16.png": (lambda p: cv2.imwrite(str(p), gray(crop(20, 24)).astype(np.uint16) * 257 + 100), None),
    "gray_alpha.png": (make_gray_alpha, None),
    "camera.jpg": (make_jpeg, None),
    "photo.webp": (lambda p: Image.fromarray(crop(24, 32, name="bird", top=100, left=100)).save(p, quality=90),
                   "webp"),
    "deep.tiff": (make_tiff16, None),
    "anim.gif": (make_gif, None),
    "anim.png": (make_apng, None),
    "anim.webp": (make_webp_animation, "webp"),
    "pages.tiff": (make_pages, None),
    "camera.heic": (make_heic, "heic"),
    "deep.avif": (make_deep_avif, "deep_avif"),
    "phone.avif": (make_phone_avif, "avif"),
    "deep.jxl": (make_jxl, "jxl"),
    "tiles.png": (_png(lambda: crop(32, 40, name="bird", top=90, left=90)), None),
    "large.png": (_png(lambda: crop(64, 72, name="head", top=100, left=100)), None),
    "calm.png": (make_calm, None),
    "calibration.png": (_png(lambda: crop(72, 72, name="baby", top=200, left=200)), None),
    "clip.mkv": (make_clip, "x264"),
}


# The jobs -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Job:
    """One CLI run: `lmf <command> inputs/<source> <args> -o <name>.<suffix>`."""

    name: str
    source: str
    args: tuple[str, ...]
    suffix: str
    lossy: bool = False  # how far a decoded output may move on another machine
    needs: tuple[str, ...] = ()
    command: str = "upscale"
    cmsr: bool = False  # the tiny model with calibrated CMSR tables

    @property
    def output(self) -> str:
        return f"{self.name}.{self.suffix}"


JOBS = [
    Job("png_rgb_x2", "rgb.png", ("--scale", "2"), "png"),
    Job("png_rgb_x3.7", "small.png", ("--scale", "3.7"), "png"),
    Job("png_rgb_size_61x45", "rgb.png", ("--size", "61x45"), "png"),
    Job("png_rgb_fit_50x50", "rgb.png", ("--fit", "50x50"), "png"),
    Job("png_to_tiff_scale_x2_y3", "small.png", ("--scale-x", "2", "--scale-y", "3", "--format", "tiff"), "tiff"),
    Job("png16_icc_exif_x2", "deep.png", ("--scale", "2"), "png"),
    Job("png_rgba_alpha_model_x2", "rgba.png", ("--scale", "2", "--alpha", "model"), "png"),
    Job("png_rgba_alpha_bicubic_x2", "rgba.png", ("--scale", "2", "--alpha", "bicubic"), "png"),
    Job("png_gray_x2", "gray.png", ("--scale", "2"), "png"),
    Job("png_gray16_x2", "gray16.png", ("--scale", "2"), "png"),
    Job("png_gray_alpha_x2", "gray_alpha.png", ("--scale", "2"), "png"),
    Job("jpeg_exif6_icc_x2", "camera.jpg", ("--scale", "2"), "jpg", lossy=True),
    Job("jpeg_strip_q60_x2", "camera.jpg", ("--scale", "2", "--strip-metadata", "--jpeg-quality", "60"), "jpg",
        lossy=True),
    Job("webp_x2", "photo.webp", ("--scale", "2"), "webp", lossy=True, needs=("webp",)),
    Job("tiff16_rgba_x2", "deep.tiff", ("--scale", "2"), "tiff"),
    Job("gif_animated_x2", "anim.gif", ("--scale", "2"), "gif", lossy=True),  # a palette per frame
    Job("apng_animated_x2", "anim.png", ("--scale", "2"), "png"),
    Job("webp_animated_x2", "anim.webp", ("--scale", "2"), "webp", lossy=True, needs=("webp",)),
    Job("tiff_pages_x2", "pages.tiff", ("--scale", "2"), "tiff"),
    Job("heic_10bit_exif6_x2", "camera.heic", ("--scale", "2"), "heic", lossy=True, needs=("heic",)),
    Job("avif_10bit_lossless_x2", "deep.avif", ("--scale", "2", "--jpeg-quality", "100"), "avif",
        needs=("deep_avif",)),
    Job("avif_8bit_alpha_exif6_x2", "phone.avif", ("--scale", "2"), "avif", lossy=True, needs=("avif", "deep_avif")),
    Job("jxl_16bit_x2", "deep.jxl", ("--scale", "2"), "jxl", lossy=True, needs=("jxl",)),
    Job("png_tile16_fp32_x2", "tiles.png", ("--scale", "2", "--tile", "16", "--precision", "fp32"), "png"),
    Job("png_max_memory_1M_x1.25", "large.png", ("--scale", "1.25", "--max-memory", "1M"), "png"),
    Job("png_bf16_x2", "rgb.png", ("--scale", "2", "--precision", "bf16"), "png", lossy=True),  # CPUs round bf16 apart
    Job("png_cmsr_balanced_x6", "calm.png", ("--scale", "6", "--quality", "balanced"), "png", cmsr=True),
    Job("png_cmsr_balanced_x6_tile8", "calm.png", ("--scale", "6", "--quality", "balanced", "--tile", "8"), "png",
        cmsr=True),
    # No --batch: frames are grouped as the decoder thread delivers them, so its encoder calls vary run to run.
    Job("video_mkv_ffv1_tile16_x2", "clip.mkv", ("--scale", "2", "--codec", "ffv1", "--tile", "16",
                                                 "--segment-frames", "4"), "mkv", needs=("x264", "ffv1"),
        command="video"),
    Job("video_mp4_x264_x1.5", "clip.mkv", ("--scale", "1.5", "--codec", "libx264", "--crf", "20",
                                              "--start", "0.04", "--end", "0.2"), "mp4",
        lossy=True, needs=("x264",), command="video"),
]


# Recording and reading the manifest ---------------------------------------------------------------------

def load_manifest() -> dict[str, Any]:
    if MANIFEST.exists():
        return json.loads(MANIFEST.read_text())
    return {"environments": {}, "inputs": {}, "jobs": {}, "skipped": {}, "cmsr_tables": None, "weights": None}


@pytest.fixture(scope="module")
def manifest() -> Iterator[dict[str, Any]]:
    """The manifest; when recording, written back (with stale files removed) once the module's tests ran."""
    data = load_manifest()
    if not RECORD:
        if not data["jobs"]:
            pytest.fail(f"no golden data in {GOLDEN}: record it with LMF_RECORD_GOLDEN=1")
        yield data
        return
    if not MANIFEST.exists():
        for folder in (INPUTS, OUTPUTS):
            shutil.rmtree(folder, ignore_errors=True)
    INPUTS.mkdir(parents=True, exist_ok=True)
    OUTPUTS.mkdir(parents=True, exist_ok=True)
    yield data
    names = {job.name for job in JOBS}
    data["jobs"] = {k: v for k, v in sorted(data["jobs"].items()) if k in names}
    data["skipped"] = {k: v for k, v in sorted(data["skipped"].items()) if k in names}
    used = {data["jobs"][k]["source"] for k in data["jobs"]} | {"calibration.png"}
    data["inputs"] = {k: v for k, v in sorted(data["inputs"].items()) if k in used}
    used_envs = {v["environment"] for v in data["jobs"].values()}
    data["environments"] = {k: v for k, v in data["environments"].items() if k in used_envs}
    for folder, keep in ((INPUTS, set(data["inputs"])), (OUTPUTS, {v["output"] for v in data["jobs"].values()})):
        for path in folder.iterdir():
            if path.name not in keep:
                path.unlink()
    MANIFEST.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


def golden_input(name: str, manifest: dict[str, Any]) -> Path:
    """The stored input (made when recording); checked against its hash, so an edited input is named."""
    path = INPUTS / name
    if RECORD and name not in manifest["inputs"]:
        maker, _ = INPUT_MAKERS[name]
        maker(path)
        manifest["inputs"][name] = sha256(path)
    assert path.exists(), f"{path} is missing: record the golden data again (LMF_RECORD_GOLDEN=1)"
    assert sha256(path) == manifest["inputs"][name], f"{path} differs from the recorded input"
    return path


def weights_digest(path: Path) -> str:
    """The tiny model's tensors, so that a change of the test model is told apart from a change of outputs."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode() + state[key].to(torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def model(weights: Path, manifest: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """conftest's tiny LM-LIIF (fixed seeds), the same tensors as when the golden data was recorded."""
    digest = weights_digest(weights)
    if RECORD:
        manifest["weights"] = digest
    assert digest == manifest["weights"], "conftest's tiny model changed: the golden outputs must be recorded again"
    path = tmp_path_factory.mktemp("golden") / "tiny.safetensors"  # the report names the model by its file
    shutil.copyfile(weights, path)
    return path


def calibrate(weights: Path, tmp: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """`lmf calibrate` of the tiny model on the stored HR crop: its CMSR tables."""
    from lmf_cli.models.checkpoints import read_metadata

    folder = tmp / "hr"
    folder.mkdir()
    shutil.copyfile(golden_input("calibration.png", manifest), folder / "calibration.png")
    out = tmp / "calibrated.safetensors"
    result = CliRunner().invoke(app, ["calibrate", str(weights), "-o", str(out), "--data", str(folder),
                                      "--images", "1", "--targets", "6", "--threshold", "2e-5", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    return json.loads(read_metadata(out)["cmsr"])


@pytest.fixture(scope="module")
def cmsr_model(model: Path, manifest: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with the recorded CMSR tables (calibrated once, when recording): the same tables on any
    CPU, so CMSR draws the same regions coarse everywhere."""
    from lmf_cli.models.checkpoints import load_weights, save_weights

    tmp = tmp_path_factory.mktemp("cmsr")
    if RECORD:
        tables = calibrate(model, tmp, manifest)
        assert max(tables[CMSR_THRESHOLD]["6"].values()) > 0, f"nothing is calm enough for CMSR: {tables}"
        manifest["cmsr_tables"] = tables
    loaded = load_weights(model)
    path = tmp / "cmsr.safetensors"
    save_weights(path, loaded.model, loaded.spec, {"steps": 0}, manifest["cmsr_tables"])
    return path


def exact_environment(recorded: str) -> bool:
    return signature(environment()) == recorded and not TOLERANT


# Running a job ------------------------------------------------------------------------------------------

def clean_log(text: str, tmp: Path, model: Path) -> list[str]:
    """The report a user reads, without what changes from run to run (paths, timings, speeds, sizes)."""
    text = text.replace(str(tmp), "<tmp>").replace(str(model), "<model>")
    text = re.sub(r"\d+\.\d+ (s|fps|MB|kB|KB|MP/s)\b", r"<n> \1", text)
    return [line.rstrip() for line in text.splitlines() if line.strip()]


@contextlib.contextmanager
def encoder_calls() -> Iterator[list[str]]:
    """The input of every encoder call (the tiles and frame batches the engine made), through a global torch
    hook: --tile, --max-memory and --batch leave every output pixel as it is by design; only this shows them."""
    calls: list[str] = []

    def seen(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        if hasattr(module, "receptive_radius") and args and isinstance(args[0], torch.Tensor):
            calls.append(f"{'x'.join(map(str, args[0].shape))} {str(args[0].dtype).removeprefix('torch.')}")

    push = FeatureRows.push

    def streamed(self: FeatureRows, rows: torch.Tensor) -> torch.Tensor:  # row chunks of a streamed encoder
        calls.append(f"rows {'x'.join(map(str, rows.shape))} {str(rows.dtype).removeprefix('torch.')}")
        return push(self, rows)

    handle = torch.nn.modules.module.register_module_forward_pre_hook(seen)
    FeatureRows.push = streamed
    try:
        yield calls
    finally:
        handle.remove()
        FeatureRows.push = push


def run_job(job: Job, tmp: Path, model: Path, manifest: dict[str, Any]) -> tuple[Path, list[str], list[str]]:
    """Run the job on a copy of its stored input: (its output, its report, its encoder calls)."""
    source = tmp / "in" / job.source
    source.parent.mkdir(parents=True)
    shutil.copyfile(golden_input(job.source, manifest), source)
    out = tmp / "out" / job.output
    out.parent.mkdir()
    args = [job.command, str(source), *job.args, "-o", str(out), "--model", str(model), "--device", "cpu"]
    with encoder_calls() as calls:
        result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert out.is_file(), result.output
    return out, clean_log(result.output, tmp, model), calls


@pytest.mark.parametrize("job", JOBS, ids=[job.name for job in JOBS])
def test_golden_output(job: Job, manifest: dict[str, Any], model: Path, cmsr_model: Path, tmp_path: Path) -> None:
    """The job writes the recorded file: the same bytes here, the same picture and metadata elsewhere."""
    missing = [need for need in job.needs if not CAPABILITIES[need]()]
    if RECORD:
        if missing:
            manifest["skipped"][job.name] = f"not recorded: no {', '.join(missing)} where it was recorded"
            manifest["jobs"].pop(job.name, None)
            pytest.skip(manifest["skipped"][job.name])
        out, log, calls = run_job(job, tmp_path, cmsr_model if job.cmsr else model, manifest)
        if job.cmsr:  # the tables must make CMSR draw something coarse, or the job tests nothing of it
            args = list(job.args)
            args[args.index("--quality") + 1] = "exact"
            exact = Job(job.name, job.source, tuple(args), job.suffix)
            assert sha256(run_job(exact, tmp_path / "exact", model, manifest)[0]) != sha256(out)
        shutil.copyfile(out, OUTPUTS / job.output)
        env = environment()
        manifest["environments"][signature(env)] = env
        manifest["jobs"][job.name] = {"source": job.source, "args": list(job.args), "command": job.command,
                                      "output": job.output, "sha256": sha256(out), "digest": content_digest(job, out),
                                      "environment": signature(env), "log": log, "encoder_calls": calls}
        manifest["skipped"].pop(job.name, None)
        return
    if job.name in manifest["skipped"]:
        pytest.skip(manifest["skipped"][job.name])
    assert job.name in manifest["jobs"], f"{job.name} was never recorded: record again (LMF_RECORD_GOLDEN=1)"
    if missing:
        pytest.skip(f"this machine has no {', '.join(missing)}")
    entry = manifest["jobs"][job.name]
    assert (entry["source"], entry["args"], entry["command"]) == (job.source, list(job.args), job.command), \
        f"{job.name} is not the job that was recorded: record again"
    golden = OUTPUTS / entry["output"]
    assert sha256(golden) == entry["sha256"], f"{golden} is not the recorded file (edited or damaged)"
    out, log, calls = run_job(job, tmp_path, cmsr_model if job.cmsr else model, manifest)
    assert log == entry["log"], "the printed report changed"
    assert calls == entry["encoder_calls"], "the engine cut the work into other tiles or frame batches"
    if exact_environment(entry["environment"]):
        if content_digest(job, out) != entry["digest"]:
            try:
                compare(job, golden, out)
                how = "though it decodes to the same picture within the tolerances"
            except AssertionError as exc:
                how = f"and it decodes differently: {exc}"
            pytest.fail(f"{job.output}: not the recorded bytes in the environment it was recorded in, {how}")
    else:
        compare(job, golden, out)


def test_cmsr_calibration_is_unchanged(model: Path, manifest: dict[str, Any], tmp_path: Path) -> None:
    """`lmf calibrate` still makes the recorded tables (exactly where the bytes of the jobs must match)."""
    if RECORD:
        pytest.skip("recording: the tables are the ones just calibrated")
    tables = calibrate(model, tmp_path, manifest)
    recorded = manifest["cmsr_tables"]
    envs = {entry["environment"] for entry in manifest["jobs"].values()}
    if len(envs) == 1 and exact_environment(envs.pop()):
        assert tables == recorded
    else:  # a bin's MSE can land on the other side of the threshold with other float rounding
        assert {k: {t: set(v) for t, v in by.items()} for k, by in tables.items()} == \
            {k: {t: set(v) for t, v in by.items()} for k, by in recorded.items()}


# Decoding, for the comparison across machines -----------------------------------------------------------

@dataclass
class Decoded:
    """An image file as a viewer gets it: every frame's samples, the largest sample value, the metadata."""

    frames: list[np.ndarray]
    peak: int
    meta: dict[str, Any]


# A TIFF's strip and tile offsets and byte counts say where its compressed pixels lie in the file:
# layout, not metadata; a pixel's last bit can change them.
TIFF_LAYOUT_TAGS = {273, 279, 324, 325}


def exif_tags(data: bytes | None) -> dict[str, Any]:
    """EXIF as tags (with the Exif and GPS IFDs), not bytes: another Pillow may lay them out otherwise."""
    if not data:
        return {}
    exif = Image.Exif()
    exif.load(data)
    tags = {f"{k}": repr(v) for k, v in exif.items() if k not in TIFF_LAYOUT_TAGS}
    for ifd in (0x8769, 0x8825):
        tags.update({f"{ifd}.{k}": repr(v) for k, v in exif.get_ifd(ifd).items()})
    return tags


def _png_depth(data: bytes) -> int:
    return data[24] if data[:8] == b"\x89PNG\r\n\x1a\n" else 8


def _avif_depth(data: bytes) -> int:
    at = data.find(b"pixi")
    return data[at + 9] if at >= 0 else 8


def decode(path: Path) -> Decoded:
    data = path.read_bytes()
    suffix = path.suffix.lower()
    if suffix == ".heic":
        import pillow_heif

        heif = pillow_heif.open_heif(path, convert_hdr_to_8bit=False)
        bits = heif.info["bit_depth"]
        return Decoded([np.asarray(heif)], 65535 if bits > 8 else 255,
                       {"bits": bits, "mode": heif.mode, "icc": heif.info.get("icc_profile"),
                        "exif": exif_tags(heif.info.get("exif"))})
    if suffix == ".jxl":
        import pyjpegxl

        meta, pixels = pyjpegxl.decode_to_numpy(data)
        exif = meta.exif[4 + struct.unpack(">I", meta.exif[:4])[0]:] if meta.exif else None
        return Decoded([np.asarray(pixels)], (1 << meta.bits_per_sample) - 1,
                       {"bits": meta.bits_per_sample, "alpha": bool(meta.has_alpha), "icc": meta.icc,
                        "exif": exif_tags(exif)})
    with Image.open(path) as img:
        meta: dict[str, Any] = {"format": img.format, "size": img.size, "frames": getattr(img, "n_frames", 1),
                                "icc": img.info.get("icc_profile"), "exif": exif_tags(img.getexif().tobytes()),
                                "loop": img.info.get("loop"), "timing": []}
        deep = suffix == ".avif" or (img.format == "PNG" and _png_depth(data) == 16)
        frames = []
        for index in range(meta["frames"]):
            img.seek(index)
            deep = deep or (img.format == "TIFF" and max(img.tag_v2.get(258, (8,))) > 8)
            if not deep:
                img.load()  # WebP sets a frame's duration when it decodes it
            meta["timing"].append((img.mode, img.size, img.info.get("duration"), img.info.get("disposal"),
                                   img.info.get("blend"), getattr(img, "disposal_method", None)))
            if not deep:
                frames.append(np.asarray(img.convert("RGBA") if img.mode in ("P", "PA") else img))
    peak = 255
    if suffix == ".avif":  # Pillow's AVIF is 8-bit: OpenCV gives the samples as stored
        bits = _avif_depth(data)
        raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED | cv2.IMREAD_IGNORE_ORIENTATION)
        frames, peak, meta["bits"] = [raw], (1 << bits) - 1, bits
    elif deep:  # Pillow gives 8 bits of 16-bit colour
        ok, mats = cv2.imdecodemulti(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        assert ok, path
        frames, peak = list(mats), 65535
    return Decoded(frames, peak, meta)


def psnr(a: np.ndarray, b: np.ndarray, peak: int) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(peak ** 2 / mse)


def close(a: np.ndarray, b: np.ndarray, peak: int, lossy: bool, lsb: int, what: str) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype, f"{what}: {a.shape} {a.dtype} != {b.shape} {b.dtype}"
    if lossy:
        value = psnr(a, b, peak)
        assert value >= MIN_PSNR, f"{what}: PSNR {value:.1f} dB < {MIN_PSNR} dB against the golden output"
    else:
        diff = int(np.abs(a.astype(np.int64) - b.astype(np.int64)).max())
        assert diff <= lsb, f"{what}: samples differ by up to {diff} (> {lsb}) from the golden output"


def compare(job: Job, golden: Path, out: Path) -> None:
    """Decoded comparison, for machines whose float rounding or encoders differ from the recording one."""
    if job.command == "video":
        compare_video(job, golden, out)
        return
    want, got = decode(golden), decode(out)
    assert got.meta == want.meta, f"{job.output}: metadata {got.meta} != golden {want.meta}"
    assert len(got.frames) == len(want.frames) and got.peak == want.peak
    for index, (a, b) in enumerate(zip(got.frames, want.frames, strict=True)):
        close(a, b, want.peak, job.lossy, 1, f"{job.output} frame {index + 1}")


def video_streams(c: av.container.InputContainer) -> dict[str, Any]:
    """The container's tags and chapters, and each stream's codec, timing, size or sample layout and tags."""
    layout: dict[str, Any] = {
        "format": c.format.name, "metadata": dict(c.metadata),
        "chapters": [(ch["start"], ch["end"], str(ch["time_base"]), dict(ch["metadata"])) for ch in c.chapters()],
        "streams": []}
    for s in c.streams:
        ctx = s.codec_context  # None for MP4's chapter track
        item = {"type": s.type, "codec": ctx.name if ctx else None, "time_base": str(s.time_base),
                "metadata": dict(s.metadata), "disposition": int(s.disposition)}
        if s.type == "video":
            item.update(size=(ctx.width, ctx.height), pix_fmt=ctx.pix_fmt)
        elif s.type == "audio":
            item.update(rate=ctx.sample_rate, layout=ctx.layout.name, extradata=bytes(ctx.extradata or b"").hex())
        layout["streams"].append(item)
    return layout


def video_layout(path: Path) -> tuple[dict[str, Any], dict[int, list[tuple]], list[np.ndarray]]:
    """(container and streams, every packet but the video's with its bytes, decoded video planes)."""
    with av.open(str(path)) as c:
        layout = video_streams(c)
        packets: dict[int, list[tuple]] = {}
        for p in c.demux():
            if p.pts is None and p.dts is None:
                continue
            kind = p.stream.type
            packets.setdefault(p.stream.index, []).append(
                (p.pts,) if kind == "video" else (p.pts, p.dts, p.duration, bytes(p)))
        for index, items in packets.items():
            if c.streams[index].type == "video":  # presentation times: B-frame order may change with the encoder
                packets[index] = sorted(items)
        c.seek(0)
        frames = [f.to_ndarray() for f in c.decode(video=0)]
    return layout, packets, frames


def compare_video(job: Job, golden: Path, out: Path) -> None:
    want, got = video_layout(golden), video_layout(out)
    assert got[0] == want[0], f"{job.output}: streams {got[0]} != golden {want[0]}"
    assert got[1] == want[1], f"{job.output}: packets (timestamps, audio or subtitle bytes) differ from golden"
    assert len(got[2]) == len(want[2]), f"{job.output}: {len(got[2])} frames, golden {len(want[2])}"
    for index, (a, b) in enumerate(zip(got[2], want[2], strict=True)):
        close(a, b, 255, job.lossy, 2, f"{job.output} frame {index + 1}")
