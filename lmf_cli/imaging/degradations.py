"""Degradations of real files: blur, resampling kernels, sensor noise, JPEG and video codecs.

Two users:
- training (`lmf train --degrade PRESET`): each HR crop becomes an LR patch through a random
  chain (blur on the HR crop, a random resize kernel down to the LR size, then noise and
  compression in random order), so the model learns to undo what phones, the web and video
  encoders do; the HR target stays clean.
- evaluation (`lmf eval --degrade jpeg:75`): a fixed chain applied to the protocol's bicubic
  LR, so robust and clean models are compared on the same degraded inputs.

Every operation takes and returns uint8 RGB (H, W, 3), as the files people have are 8-bit,
and draws from a numpy Generator it is given: a seeded run is reproducible.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from PIL import Image

RESIZE_KERNELS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
                  "area": Image.Resampling.BOX}
VIDEO_CODECS = {"h264": ("libx264", "h264"), "h265": ("libx265", "hevc")}  # encoder, decoder


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def gaussian_kernel(sigma_y: float, sigma_x: float, angle: float, size: int) -> np.ndarray:
    """An (anisotropic) Gaussian rotated by `angle` radians, normalised to sum 1."""
    r = np.arange(size) - (size - 1) / 2
    yy, xx = np.meshgrid(r, r, indexing="ij")
    c, s = math.cos(angle), math.sin(angle)
    u, v = c * xx + s * yy, -s * xx + c * yy
    k = np.exp(-0.5 * ((u / sigma_x) ** 2 + (v / sigma_y) ** 2))
    return k / k.sum()


def sinc_kernel(cutoff: float, size: int) -> np.ndarray:
    """A circular low-pass (2D sinc, Bessel J1): the ringing of sharpened and resized files.

    `cutoff` is the angular cut-off frequency in radians per pixel (pi = no filtering).
    """
    r = np.arange(size) - (size - 1) / 2
    dist = np.hypot(*np.meshgrid(r, r, indexing="ij"))
    safe = np.where(dist == 0, 1.0, dist)
    j1 = torch.special.bessel_j1(torch.from_numpy(cutoff * safe)).numpy()
    k = np.where(dist == 0, cutoff ** 2 / (4 * math.pi), cutoff * j1 / (2 * math.pi * safe))
    return k / k.sum()


def blur(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    out = cv2.filter2D(img.astype(np.float32), -1, kernel.astype(np.float32), borderType=cv2.BORDER_REFLECT_101)
    return _to_uint8(out)


def resize(img: np.ndarray, size_hw: tuple[int, int], kernel: str = "bicubic") -> np.ndarray:
    """Antialiased resize with Pillow's kernels: all keep pixel centres aligned, so the HR
    target's geometry does not depend on the kernel drawn."""
    out = Image.fromarray(img).resize((size_hw[1], size_hw[0]), RESIZE_KERNELS[kernel])
    return np.asarray(out)


def gaussian_noise(img: np.ndarray, sigma: float, gray: bool, rng: np.random.Generator) -> np.ndarray:
    """Additive white noise of standard deviation `sigma` (0..255 scale); gray = same on R, G, B."""
    shape = (*img.shape[:2], 1) if gray else img.shape
    return _to_uint8(img + rng.normal(0.0, sigma, shape))


def poisson_noise(img: np.ndarray, scale: float, gray: bool, rng: np.random.Generator) -> np.ndarray:
    """Shot noise: photon counts ~ Poisson(value), scaled so its strength is `scale` times
    that of an image whose brightest value is 255 photons (the sensor's gain)."""
    base = img.astype(np.float64) / 255.0
    if gray:
        lum = base @ np.array([0.299, 0.587, 0.114])
        photons = 255.0 / scale
        noisy = rng.poisson(lum * photons) / photons - lum
        return _to_uint8((base + noisy[..., None]) * 255)
    photons = 255.0 / scale
    return _to_uint8(rng.poisson(base * photons) / photons * 255)


def jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    """A JPEG round trip at `quality` (Pillow/libjpeg, 4:2:0 chroma as cameras and the web)."""
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=int(quality))
    buf.seek(0)
    with Image.open(buf) as out:
        return np.asarray(out.convert("RGB"))


def video(img: np.ndarray, codec: str, crf: int) -> np.ndarray:
    """An intra-coded H.264/H.265 round trip in 4:2:0 at `crf`, as a keyframe of a stream.

    Odd sizes, and sizes under x265's minimum of 32, are padded by edge replication for the
    encoder and cut back after decoding.
    """
    import av

    h, w = img.shape[:2]
    padded = np.pad(img, ((0, max(h + h % 2, 32) - h), (0, max(w + w % 2, 32) - w), (0, 0)), mode="edge")
    encoder, decoder = VIDEO_CODECS[codec]
    enc = av.CodecContext.create(encoder, "w")
    enc.width, enc.height = padded.shape[1], padded.shape[0]
    enc.pix_fmt = "yuv420p"
    enc.options = {"crf": str(int(crf)), "preset": "veryfast"}
    if codec == "h265":
        enc.options = {**enc.options, "x265-params": "log-level=none"}
    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(padded), format="rgb24")
    packets = [*enc.encode(frame), *enc.encode(None)]
    dec = av.CodecContext.create(decoder, "r")
    frames = [f for p in packets for f in dec.decode(p)] + list(dec.decode(None))
    return frames[0].to_ndarray(format="rgb24")[:h, :w].copy()


# --------------------------------------------------------------------------- training


@dataclass(frozen=True)
class Preset:
    """Probabilities and ranges of one training preset (see `PRESETS` for why each)."""

    clean_share: float  # patches made by plain bicubic, as the clean protocol
    blur_p: float
    blur_sigma: tuple[float, float]  # in LR pixels, so the blur means the same at every scale
    anisotropic_p: float
    sinc_p: float
    kernels: tuple[tuple[str, float], ...]  # resize kernel and its probability
    noise_p: float
    gaussian_sigma: tuple[float, float]  # 0..255
    poisson_scale: tuple[float, float]
    poisson_p: float  # share of noisy patches whose noise is Poisson rather than Gaussian
    gray_noise_p: float
    jpeg_p: float
    jpeg_quality: tuple[int, int]
    jpeg_common_p: float  # share of JPEG draws taken from `jpeg_common_quality` instead
    jpeg_common_quality: tuple[int, int]
    video_p: float
    video_crf: tuple[int, int]


PRESETS: dict[str, Preset | None] = {
    # The papers' clean bicubic LR: best on clean inputs, sharpens compression artefacts.
    "none": None,
    # Good web images and phone photos: mild blur, faint noise, JPEG 70..95.
    "light": Preset(clean_share=0.3, blur_p=0.2, blur_sigma=(0.2, 0.8), anisotropic_p=0.2, sinc_p=0.0,
                    kernels=(("bicubic", 0.6), ("bilinear", 0.2), ("area", 0.2)),
                    noise_p=0.3, gaussian_sigma=(1.0, 5.0), poisson_scale=(0.05, 0.5), poisson_p=0.3,
                    gray_noise_p=0.3, jpeg_p=0.5, jpeg_quality=(70, 95),
                    jpeg_common_p=0.0, jpeg_common_quality=(70, 95), video_p=0.0, video_crf=(18, 28)),
    # What people actually bring: re-saved JPEGs down to quality 30, sensor noise up to sigma
    # 12, soft focus, ringing from earlier resizes, frames of H.264/H.265 video up to CRF 35.
    # A third of the patches stays clean and blur is drawn less often, so the model does not
    # take every clean input for a soft one and over-sharpen or smooth it (with 20% clean and
    # blur at 0.4 it gave up 1.0-1.9 dB on clean inputs). Half the JPEG draws come from
    # quality 60-90, where most web and phone files sit: drawn uniformly over 30-95 alone,
    # the mild files that look nearly clean lost ground as the clean share grew.
    "real": Preset(clean_share=0.35, blur_p=0.25, blur_sigma=(0.2, 1.2), anisotropic_p=0.4, sinc_p=0.1,
                   kernels=(("bicubic", 0.5), ("bilinear", 0.25), ("area", 0.25)),
                   noise_p=0.4, gaussian_sigma=(1.0, 12.0), poisson_scale=(0.05, 1.5), poisson_p=0.3,
                   gray_noise_p=0.4, jpeg_p=0.7, jpeg_quality=(30, 95),
                   jpeg_common_p=0.5, jpeg_common_quality=(60, 90), video_p=0.15, video_crf=(18, 35)),
    # The same chain for the models `lmf video` runs: a frame of H.264/H.265 (CRF 18-35) is
    # drawn as often as a JPEG file. With video at 0.15, a longer lmf-real-lite cycle gained on
    # every other row and lost 0.01-0.03 dB on H.264 CRF 28 frames.
    "real-video": Preset(clean_share=0.35, blur_p=0.25, blur_sigma=(0.2, 1.2), anisotropic_p=0.4, sinc_p=0.1,
                         kernels=(("bicubic", 0.5), ("bilinear", 0.25), ("area", 0.25)),
                         noise_p=0.4, gaussian_sigma=(1.0, 12.0), poisson_scale=(0.05, 1.5), poisson_p=0.3,
                         gray_noise_p=0.4, jpeg_p=0.45, jpeg_quality=(30, 95),
                         jpeg_common_p=0.5, jpeg_common_quality=(60, 90), video_p=0.4, video_crf=(18, 35)),
    # The `real` chain leaning on plain JPEG files: a patch that is a bicubic resize saved as JPEG and
    # nothing else comes nearly twice as often (19% against 10%: blur in one degraded patch in ten,
    # noise in 35%, bicubic resizes in 70%), the clean share and the JPEG and video draws unchanged.
    # Through `real`, the JPEG rows of lmf-real's card moved by hundredths over its last two cycles;
    # with video in 5% of the patches instead of 15% it gained on them but lost H.264 frames.
    "real-jpeg": Preset(clean_share=0.35, blur_p=0.1, blur_sigma=(0.2, 1.2), anisotropic_p=0.4, sinc_p=0.05,
                        kernels=(("bicubic", 0.7), ("bilinear", 0.15), ("area", 0.15)),
                        noise_p=0.35, gaussian_sigma=(1.0, 12.0), poisson_scale=(0.05, 1.5), poisson_p=0.3,
                        gray_noise_p=0.4, jpeg_p=0.7, jpeg_quality=(30, 95),
                        jpeg_common_p=0.5, jpeg_common_quality=(60, 90), video_p=0.15, video_crf=(18, 35)),
    # For the clean models: nine patches in ten are the clean protocol, the tenth a frame of
    # H.264/H.265 video (CRF 18-35), nothing else. Trained on clean patches alone, every longer cycle
    # gained on clean inputs and lost 0.01 dB on H.264 CRF 28 frames (it sharpens the codec's blocks).
    "clean-video": Preset(clean_share=0.9, blur_p=0.0, blur_sigma=(0.2, 0.8), anisotropic_p=0.0, sinc_p=0.0,
                          kernels=(("bicubic", 1.0),), noise_p=0.0, gaussian_sigma=(1.0, 5.0),
                          poisson_scale=(0.05, 0.5), poisson_p=0.0, gray_noise_p=0.0, jpeg_p=0.0,
                          jpeg_quality=(70, 95), jpeg_common_p=0.0, jpeg_common_quality=(70, 95), video_p=1.0,
                          video_crf=(18, 35)),
}


def _blur_kernel(preset: Preset, scale: float, rng: np.random.Generator) -> np.ndarray:
    """A blur kernel for the HR crop; sigmas are drawn in LR pixels and scaled to HR."""
    if rng.random() < preset.sinc_p:
        size = 2 * int(rng.integers(3, 8)) + 1
        return sinc_kernel(rng.uniform(math.pi / 3, math.pi) / max(scale, 1.0), max(size, 2 * round(3 * scale) + 1))
    sy = rng.uniform(*preset.blur_sigma) * scale
    sx = rng.uniform(*preset.blur_sigma) * scale if rng.random() < preset.anisotropic_p else sy
    angle = rng.uniform(0, math.pi)
    size = 2 * math.ceil(3 * max(sy, sx)) + 1
    return gaussian_kernel(sy, sx, angle, size)


def _noise_and_compression(img: np.ndarray, preset: Preset, rng: np.random.Generator) -> np.ndarray:
    steps: list[Callable[[np.ndarray], np.ndarray]] = []
    if rng.random() < preset.noise_p:
        gray = bool(rng.random() < preset.gray_noise_p)
        if rng.random() < preset.poisson_p:
            scale = rng.uniform(*preset.poisson_scale)
            steps.append(lambda x: poisson_noise(x, scale, gray, rng))
        else:
            sigma = rng.uniform(*preset.gaussian_sigma)
            steps.append(lambda x: gaussian_noise(x, sigma, gray, rng))
    codec_draw = rng.random()
    if codec_draw < preset.video_p:
        codec = "h264" if rng.random() < 0.6 else "h265"
        crf = int(rng.integers(preset.video_crf[0], preset.video_crf[1] + 1))
        steps.append(lambda x: video(x, codec, crf))
    elif codec_draw < preset.video_p + preset.jpeg_p:
        low, high = preset.jpeg_common_quality if rng.random() < preset.jpeg_common_p else preset.jpeg_quality
        quality = int(rng.integers(low, high + 1))
        steps.append(lambda x: jpeg(x, quality))
    # Mostly noise then compression (a sensor, then a file), sometimes the other way round
    # (noise added by later processing of an already compressed file).
    if len(steps) == 2 and rng.random() < 0.25:
        steps.reverse()
    for step in steps:
        img = step(img)
    return img


def degrade_for_training(hr: np.ndarray, lr_hw: tuple[int, int], preset: Preset | None,
                         rng: np.random.Generator) -> np.ndarray:
    """The LR training input for an HR crop: clean bicubic, or a random chain of the preset."""
    if preset is None or rng.random() < preset.clean_share:
        return resize(hr, lr_hw, "bicubic")
    scale = hr.shape[0] / lr_hw[0]
    if rng.random() < preset.blur_p:
        hr = blur(hr, _blur_kernel(preset, scale, rng))
    names, probs = zip(*preset.kernels, strict=True)
    lr = resize(hr, lr_hw, names[int(rng.choice(len(names), p=np.array(probs) / sum(probs)))])
    return _noise_and_compression(lr, preset, rng)


def training_preset(name: str) -> Preset | None:
    if name not in PRESETS:
        raise ValueError(f"unknown degradation preset {name!r} (choose one of {', '.join(PRESETS)})")
    return PRESETS[name]


# --------------------------------------------------------------------------- evaluation

EVAL_OPS: dict[str, tuple[str, Callable[[np.ndarray, float, np.random.Generator], np.ndarray]]] = {
    "jpeg": ("quality 1..100", lambda x, v, rng: jpeg(x, int(v))),
    "noise": ("Gaussian sigma on 0..255", lambda x, v, rng: gaussian_noise(x, v, False, rng)),
    "graynoise": ("Gaussian sigma on 0..255, same on R, G, B", lambda x, v, rng: gaussian_noise(x, v, True, rng)),
    "poisson": ("shot-noise strength, 1 = 255 photons at white", lambda x, v, rng: poisson_noise(x, v, False, rng)),
    "blur": ("Gaussian sigma in LR pixels", lambda x, v, rng: blur(x, gaussian_kernel(v, v, 0.0,
                                                                                         2 * math.ceil(3 * v) + 1))),
    "h264": ("CRF 0..51", lambda x, v, rng: video(x, "h264", int(v))),
    "h265": ("CRF 0..51", lambda x, v, rng: video(x, "h265", int(v))),
}
_LIMITS = {"jpeg": (1, 100), "h264": (0, 51), "h265": (0, 51)}
EVAL_EXAMPLES = {"jpeg": "75", "noise": "5", "graynoise": "5", "poisson": "0.5", "blur": "0.8", "h264": "28",
                 "h265": "28"}



@dataclass(frozen=True)
class EvalDegradation:
    """A fixed chain such as `noise:5+jpeg:75`, applied left to right to the bicubic LR."""

    ops: tuple[tuple[str, float], ...]

    @property
    def name(self) -> str:
        return "+".join(f"{op}:{value:g}" for op, value in self.ops)

    def __call__(self, lr: np.ndarray, seed: int = 0) -> np.ndarray:
        rng = np.random.default_rng(seed)
        for op, value in self.ops:
            lr = EVAL_OPS[op][1](lr, value, rng)
        return lr


def parse_degradation(text: str) -> EvalDegradation:
    """`jpeg:75`, `noise:5`, `h264:28`, or a chain `blur:0.8+noise:3+jpeg:60`."""
    ops = []
    for part in text.split("+"):
        op, _, value = part.strip().partition(":")
        if op not in EVAL_OPS:
            known = ", ".join(f"{k}:N ({doc})" for k, (doc, _) in EVAL_OPS.items())
            raise ValueError(f"unknown degradation {part!r}: use {known}, joined with +")
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"{part!r}: give a number after the colon, e.g. {op}:{EVAL_EXAMPLES[op]}") from None
        if op in _LIMITS:
            low, high = _LIMITS[op]
            if not low <= number <= high:
                raise ValueError(f"{part!r}: the value must be within {low:g}..{high:g}")
        elif not 0 < number < math.inf:
            raise ValueError(f"{part!r}: the value must be above 0")
        ops.append((op, number))
    return EvalDegradation(tuple(ops))

