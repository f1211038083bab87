"""What a training run is: its recipe as a dataclass (stored in the state) and its schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass
class TrainConfig:
    spec: dict[str, Any]
    data: list[str]
    out_dir: str
    steps: int = 20000
    batch: int = 16
    patch: int = 48
    queries: int = 2304
    scale_min: float = 1.0  # scales drawn uniformly in [scale_min, scale_max]
    scale_max: float = 4.0
    lr: float = 1e-4
    warmup: int = 0
    schedule: str = "step"  # "step": halve at 1/6..5/6 of the run (official); "cosine"
    restarts: int = 0  # cosine only: the run is that many + 1 equal cycles, each from the peak (SGDR)
    loss: str = "l1"  # "l1", or "l1+fft": L1 plus FFT_WEIGHT x L1 of the 2D spectra of square query windows
    accumulate: int = 1  # batches whose gradients are summed into one optimizer step
    seed: int = 0
    bf16: bool = True
    val_every: int = 500
    val_data: str | None = None
    save_minutes: float = 5.0
    init: str | None = None  # weights file to start from (fine-tuning); its spec is `spec`
    init_encoder: str | None = None  # weights whose encoder starts this run (e.g. DIIF on lmf-edsr's encoder)
    degrade: str = "none"  # LR degradation preset (lmf_cli.degradations.PRESETS)
    device: str = "cpu"  # where the model, optimizer and batches live: cpu, cuda, cuda:N, mps, auto
    loader_threads: int = 0  # 0: samples drawn in order from one stream; N: one seed per sample, N threads
    ema: float = 0.0  # decay of an exponential moving average of the weights, validated and shipped (0: off)


LOSSES = ("l1", "l1+fft")
SCHEDULES = ("step", "cosine")
# The spectrum term's weight in "l1+fft", as in deblurring work that pairs the two (MIMO-UNet's
# 0.1): with orthonormal FFTs a coefficient's error is on the scale of a pixel's, so the spectrum
# nudges the high frequencies without outweighing the pixels.
FFT_WEIGHT = 0.1


def learning_rate(cfg: TrainConfig, step: int) -> float:
    if cfg.warmup and step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if cfg.schedule == "cosine":
        span, done = max(1, cfg.steps - cfg.warmup), step - cfg.warmup
        cycle = span / (cfg.restarts + 1)
        t = 1.0 if done >= span else (done % cycle) / cycle
        return cfg.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * t)))
    milestones = [cfg.steps * k // 6 for k in range(1, 6)]
    return cfg.lr * 0.5 ** sum(step >= m for m in milestones)
