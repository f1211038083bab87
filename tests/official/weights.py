"""The random weights of the official test checkpoints, rebuilt from their layout.

The stored layout lists every state-dict key with its shape and gain, in order; parameters are
drawn from one seeded generator in that order (so the files stay a few KB instead of MBs), and
the few integer or structural buffers (SwinIR's relative position index and shift masks) are
stored as they are. The script that ran the authors' code used this same function."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent


def official_state(layout: list[list[Any]], buffers: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """State dict from (key, shape, gain) entries: weights ~ N(0, gain^2 / fan_in), biases
    N(0, 0.1^2), other vectors (LayerNorm scales, PReLU slopes) 1 + N(0, 0.1^2)."""
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for key, shape, gain in layout:
        if key in buffers:
            state[key] = buffers[key]
            continue
        t = torch.randn(*shape, generator=gen)
        if len(shape) >= 2:
            t = t * (gain / math.sqrt(math.prod(shape[1:])))
        elif key.endswith(".bias"):
            t = t * 0.1
        else:
            t = 1 + 0.1 * t
        state[key] = t
    return state


def load_case(name: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The official checkpoint `{"model": {"name", "args", "sd"}}` of a stored case, and its
    arrays: `input` (h, w, 3) uint8 and `out_<scale>` official outputs in [0, 1] (stored as
    16-bit levels, within 7.7e-6 of the float32 outputs: half the size, far inside the 1e-4 tests)."""
    meta = json.loads((HERE / f"{name}.json").read_text())
    arrays = dict(np.load(HERE / f"{name}.npz"))
    for key, value in arrays.items():
        if value.dtype == np.uint16:
            arrays[key] = value.astype(np.float32) / 65535
    buffers = {k[len("buffer:"):]: torch.from_numpy(v) for k, v in arrays.items() if k.startswith("buffer:")}
    sd = official_state(meta["layout"], buffers, meta["seed"])
    return {"model": {"name": meta["name"], "args": meta["args"], "sd": sd}}, arrays


def save_cases(folder: Path, names: list[str]) -> dict[str, tuple[Path, dict[str, np.ndarray]]]:
    """name -> (the case's official checkpoint saved as `folder/name.pth`, its arrays): what the
    fidelity tests load as a user would."""
    found = {}
    for name in names:
        ckpt, arrays = load_case(name)
        torch.save(ckpt, folder / f"{name}.pth")
        found[name] = (folder / f"{name}.pth", arrays)
    return found
