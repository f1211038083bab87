"""Training: the official LMF recipe, made fast on a CPU and resumable.

Recipe (DESIGN.md §1): per sample s ~ U(1, 4), a round(48 s) HR crop, antialiased bicubic
LR 48x48, flips and transpose, 2304 random HR pixels as targets, L1 in normalised space,
Adam. What we change, measured in weights/README.md: the encoder runs in bfloat16 under
autocast with channels-last memory (3x faster on CPUs with AMX/AVX-512 BF16), the MLPs
stay float32; batches are prepared on a background thread; optional warm-up + cosine
learning rate and a bilinear input skip for LM-LIIF.
"""

from __future__ import annotations

import collections
import json
import math
import queue
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from lmf_cli import models
from lmf_cli.checkpoints import atomic_write, read_metadata, save_weights
from lmf_cli.degradations import degrade_for_training, training_preset
from lmf_cli.evaluation import list_images, load_rgb
from lmf_cli.models.base import ImplicitSR

DEFAULT_TRAIN_SETS = ("T91", "BSD200", "BSDS500test")
EVAL_ONLY_SETS = ("Set5", "Set14", "B100", "Urban100")


@dataclass
class TrainConfig:
    spec: dict[str, Any]
    data: list[str]
    out_dir: str
    steps: int = 20000
    batch: int = 16
    patch: int = 48
    queries: int = 2304
    scale_max: float = 4.0
    lr: float = 1e-4
    warmup: int = 0
    schedule: str = "step"  # "step": halve at 1/6..5/6 of the run (official); "cosine"
    seed: int = 0
    bf16: bool = True
    val_every: int = 500
    val_data: str | None = None
    save_minutes: float = 5.0
    init: str | None = None  # weights file to start from (fine-tuning); its spec is `spec`
    degrade: str = "none"  # LR degradation preset (lmf_cli.degradations.PRESETS)


def learning_rate(cfg: TrainConfig, step: int) -> float:
    if cfg.warmup and step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if cfg.schedule == "cosine":
        t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return cfg.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))
    milestones = [cfg.steps * k // 6 for k in range(1, 6)]
    return cfg.lr * 0.5 ** sum(step >= m for m in milestones)


class PatchSampler:
    """Draws training batches from images held in memory; its RNG state is checkpointed."""

    def __init__(self, images: list[np.ndarray], cfg: TrainConfig, seed: int) -> None:
        min_side = math.ceil(cfg.patch * cfg.scale_max)
        self.images = [im for im in images if min(im.shape[:2]) >= min_side]
        if not self.images:
            raise ValueError(f"no training image is at least {min_side} px on its short side")
        self.cfg = cfg
        self.preset = training_preset(cfg.degrade)
        self.rng = np.random.default_rng(seed)

    def batch(self) -> dict[str, torch.Tensor]:
        cfg, rng = self.cfg, self.rng
        inps, coords, cells, gts = [], [], [], []
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
            pick = rng.choice(hr_size * hr_size, cfg.queries, replace=False)
            ys, xs = np.divmod(pick, hr_size)
            coords.append(np.stack([(2 * ys + 1) / hr_size - 1, (2 * xs + 1) / hr_size - 1], -1))
            gts.append(hr[ys, xs])
            inps.append(lr)
            cells.append(np.full((cfg.queries, 2), 2 / hr_size))
        inp = torch.from_numpy(np.stack(inps)).permute(0, 3, 1, 2).float().div_(127.5).sub_(1)
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


def _optimizer_state(opt: torch.optim.Adam, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for p, st in opt.state.items():
        for key, value in st.items():
            out[f"opt.{key}.{names[id(p)]}"] = torch.as_tensor(value).detach().float().contiguous().clone()
    return out


def _restore_optimizer(opt: torch.optim.Adam, model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    for name, p in model.named_parameters():
        if f"opt.exp_avg.{name}" not in tensors:
            continue
        opt.state[p] = {
            "step": tensors[f"opt.step.{name}"].reshape(()).clone(),
            "exp_avg": torch.empty_like(p).copy_(tensors[f"opt.exp_avg.{name}"].view_as(p)),
            "exp_avg_sq": torch.empty_like(p).copy_(tensors[f"opt.exp_avg_sq.{name}"].view_as(p)),
        }


def save_state(path: Path, model: ImplicitSR, opt: torch.optim.Adam, cfg: TrainConfig, step: int,
               rng_state: dict, elapsed: float, history: list[dict]) -> None:
    tensors = {f"model.{k}": v.detach().float().contiguous() for k, v in model.state_dict().items()}
    tensors.update(_optimizer_state(opt, model))
    meta = {"format": "lmf-train-1", "config": json.dumps(asdict(cfg)), "step": str(step),
            "rng": json.dumps(rng_state), "elapsed": str(elapsed), "history": json.dumps(history)}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def train(cfg: TrainConfig, resume: bool = False, max_steps: int | None = None,
          time_budget: float | None = None, log: Callable[[str], None] = print,
          on_step: Callable[[int, float, float], None] | None = None,
          validate: Callable[[ImplicitSR], dict[str, float]] | None = None) -> Path:
    """Run (or continue) training; returns the path of the exported model weights.

    Stops at cfg.steps, after `max_steps` more steps, at `time_budget` seconds, or on
    Ctrl-C; in every case the state is saved first, so `resume=True` continues the run.
    """
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / "state.safetensors"
    torch.manual_seed(cfg.seed)
    model = models.make(cfg.spec)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    step, elapsed, history, rng_state = 0, 0.0, [], None
    if resume and state_path.exists():
        meta = read_metadata(state_path)
        tensors = load_file(str(state_path))
        saved_cfg = json.loads(meta["config"])
        if saved_cfg.get("degrade", "none") != cfg.degrade:
            raise ValueError(f"{state_path}: the saved run used --degrade {saved_cfg.get('degrade', 'none')}")
        if saved_cfg["spec"] != cfg.spec:
            raise ValueError(f"{state_path}: the saved run trains another architecture")
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        _restore_optimizer(opt, model, tensors)
        step, elapsed = int(meta["step"]), float(meta["elapsed"])
        history, rng_state = json.loads(meta["history"]), json.loads(meta["rng"])
        log(f"resumed {state_path} at step {step}")
    elif cfg.init:
        from lmf_cli.checkpoints import load_weights

        model.load_state_dict(load_weights(cfg.init).model.state_dict())
        log(f"started from the weights in {cfg.init}")
    if cfg.bf16:
        model.encoder_dtype = torch.bfloat16
    model.use_channels_last()
    model.train()

    sampler = PatchSampler(load_training_images(cfg.data, log), cfg, cfg.seed)
    if rng_state is not None:
        sampler.rng.bit_generator.state = rng_state
    prefetch = Prefetcher(sampler)
    stop_requested = threading.Event()
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, lambda *_: stop_requested.set())
    last_save = time.monotonic()
    start_step, start_time = step, time.monotonic()
    try:
        while step < cfg.steps and not stop_requested.is_set():
            if max_steps is not None and step - start_step >= max_steps:
                break
            if time_budget is not None and time.monotonic() - start_time >= time_budget:
                break
            t0 = time.monotonic()
            batch = prefetch.next()
            for group in opt.param_groups:
                group["lr"] = learning_rate(cfg, step)
            pred = model(batch["inp"], batch["coord"], batch["cell"])
            loss = (pred - batch["gt"]).abs().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            dt = time.monotonic() - t0
            elapsed += dt
            if on_step:
                on_step(step, loss.item(), dt)
            if validate and cfg.val_every and step % cfg.val_every == 0:
                model.eval()
                scores = validate(model)
                model.train()
                history.append({"step": step, "elapsed_s": round(elapsed), **scores})
                log(f"step {step}: " + ", ".join(f"{k} {v:.2f}" for k, v in scores.items()))
            if time.monotonic() - last_save > cfg.save_minutes * 60:
                save_state(state_path, model, opt, cfg, step, prefetch.resume_state(), elapsed, history)
                last_save = time.monotonic()
        resume_at = prefetch.resume_state()
    finally:
        prefetch.close()
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, previous)
    save_state(state_path, model, opt, cfg, step, resume_at, elapsed, history)
    log(f"saved {state_path} at step {step} ({elapsed / 60:.1f} min of training)")
    model.encoder_dtype = None
    model.channels_last = False
    model.encoder.to(memory_format=torch.contiguous_format)
    weights = out / "model.safetensors"
    info = {"steps": step, "train_seconds": round(elapsed), "data": [Path(d).name for d in cfg.data],
            "recipe": {k: v for k, v in asdict(cfg).items() if k not in ("spec", "data", "out_dir")},
            "history": history}
    save_weights(weights, model.eval(), cfg.spec, info)
    return weights
