"""Resampling in one place: the protocol's LR maker, bicubic for alpha and for the bicubic baseline.

Pillow's antialiased bicubic is the reference the SR literature uses (as MATLAB's imresize);
every caller (API alpha, evaluation, calibration, training) goes through these.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def bicubic_resize_uint8(img: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """Antialiased bicubic resize of uint8 RGB, as PIL (the LR maker of the protocol)."""
    out = Image.fromarray(img).resize((size_hw[1], size_hw[0]), Image.Resampling.BICUBIC)
    return np.asarray(out)


def bicubic_resize_float(img: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """Bicubic resize of float images in [0, 1] per channel, unquantised (the bicubic row)."""
    planes = [np.asarray(Image.fromarray(np.ascontiguousarray(img[..., c], dtype=np.float32), mode="F")
                         .resize((size_hw[1], size_hw[0]), Image.Resampling.BICUBIC))
              for c in range(img.shape[-1])]
    return np.clip(np.stack(planes, -1), 0, 1)


def make_pair(hr: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """(cropped HR, LR) for one scale: LR has floor(H / s) rows, HR keeps round(h * s)."""
    h, w = hr.shape[:2]
    lh, lw = max(1, int(h / scale + 1e-9)), max(1, int(w / scale + 1e-9))
    hh, hw = round(lh * scale), round(lw * scale)
    hr = hr[:hh, :hw]
    return hr, bicubic_resize_uint8(hr, (lh, lw))
