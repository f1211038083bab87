"""Training batches: HR crops at a random scale, their (optionally degraded) LR, sampled HR
pixels as targets; prepared on a background thread with a checkpointable RNG."""

from __future__ import annotations

import collections
import math
import queue
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from lmf_cli.imaging.degradations import degrade_for_training, training_preset
from lmf_cli.io.images import list_images, load_rgb
from lmf_cli.training.config import TrainConfig

DEFAULT_TRAIN_SETS = ("T91", "BSD200", "BSDS500test")
EVAL_ONLY_SETS = ("Set5", "Set14", "B100", "Urban100")


class PatchSampler:
    """Draws training batches from images held in memory; its RNG state is checkpointed."""

    def __init__(self, images: list[np.ndarray], cfg: TrainConfig, seed: int, whole_cells: bool = False) -> None:
        min_side = math.ceil(cfg.patch * cfg.scale_max)
        self.images = [im for im in images if min(im.shape[:2]) >= min_side]
        if not self.images:
            raise ValueError(f"no training image is at least {min_side} px on its short side")
        self.cfg = cfg
        self.preset = training_preset(cfg.degrade)
        self.rng = np.random.default_rng(seed)
        # Decoders that decode whole slices (DIIF) learn from every pixel of sampled LR cells
        # (about `queries` pixels per patch), not from scattered single pixels.
        self.whole_cells = whole_cells

    def batch(self) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        cfg, rng = self.cfg, self.rng
        inps, coords, cells, gts, hrs, lr_cells = [], [], [], [], [], []
        for _ in range(cfg.batch):
            img = self.images[rng.integers(len(self.images))]
            s = rng.uniform(1, cfg.scale_max)
            hr_size = round(cfg.patch * s)
            y0 = rng.integers(img.shape[0] - hr_size + 1)
            x0 = rng.integers(img.shape[1] - hr_size + 1)
            hr = img[y0:y0 + hr_size, x0:x0 + hr_size]
            lr = degrade_for_training(hr, (cfg.patch, cfg.patch), self.preset, rng)
            flips = rng.random(3) < 0.5
            hr, lr = _augment(hr, flips), _augment(lr, flips)
            inps.append(lr)
            if self.whole_cells:
                count = min(cfg.patch * cfg.patch, max(1, math.ceil(cfg.queries / s ** 2)))
                pick = rng.choice(cfg.patch * cfg.patch, count, replace=False)
                lr_cells.append(torch.from_numpy(np.stack(np.divmod(pick, cfg.patch), -1))[None])
                hrs.append(torch.from_numpy(hr).permute(2, 0, 1).float().div_(127.5).sub_(1))
                continue
            pick = rng.choice(hr_size * hr_size, cfg.queries, replace=False)
            ys, xs = np.divmod(pick, hr_size)
            coords.append(np.stack([(2 * ys + 1) / hr_size - 1, (2 * xs + 1) / hr_size - 1], -1))
            gts.append(hr[ys, xs])
            cells.append(np.full((cfg.queries, 2), 2 / hr_size))
        inp = torch.from_numpy(np.stack(inps)).permute(0, 3, 1, 2).float().div_(127.5).sub_(1)
        if self.whole_cells:
            return {"inp": inp.contiguous(memory_format=torch.channels_last), "hr": hrs, "cells": lr_cells}
        return {
            "inp": inp.contiguous(memory_format=torch.channels_last),
            "coord": torch.from_numpy(np.stack(coords)).float(),
            "cell": torch.from_numpy(np.stack(cells)).float(),
            "gt": torch.from_numpy(np.stack(gts)).float().div_(127.5).sub_(1),
        }


def _augment(img: np.ndarray, flips: np.ndarray) -> np.ndarray:
    if flips[0]:
        img = img[:, ::-1]
    if flips[1]:
        img = img[::-1]
    if flips[2]:
        img = img.transpose(1, 0, 2)
    return np.ascontiguousarray(img)


class Prefetcher:
    """Prepares the next batches on a thread, remembering the sampler state before each
    one, so a checkpoint resumes exactly at the first batch not yet trained on."""

    def __init__(self, sampler: PatchSampler, depth: int = 3) -> None:
        self.sampler = sampler
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.states: collections.deque = collections.deque()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            with self.lock:
                self.states.append(self.sampler.rng.bit_generator.state)
            batch = self.sampler.batch()
            while not self.stop.is_set():
                try:
                    self.queue.put(batch, timeout=0.2)
                    break
                except queue.Full:
                    continue

    def next(self) -> dict[str, torch.Tensor]:
        batch = self.queue.get()
        with self.lock:
            self.states.popleft()
        return batch

    def resume_state(self) -> dict:
        """Sampler state that regenerates the next unconsumed batch."""
        with self.lock:
            return self.states[0] if self.states else self.sampler.rng.bit_generator.state

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)


def load_training_images(folders: list[str], log: Callable[[str], None]) -> list[np.ndarray]:
    images = []
    for folder in folders:
        if set(Path(folder).resolve().parts) & set(EVAL_ONLY_SETS):
            raise ValueError(f"{folder}: evaluation sets are never used for training")
        paths = list_images(folder)
        if not paths:
            raise ValueError(f"{folder}: no images found")
        images += [load_rgb(p) for p in paths]
        log(f"loaded {len(paths)} images from {folder}")
    return images
