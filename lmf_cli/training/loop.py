"""Training: the official LMF recipe, made fast on a CPU and resumable.

Recipe (DESIGN.md §1): per sample s ~ U(1, 4), a round(48 s) HR crop, antialiased bicubic
LR 48x48, flips and transpose, 2304 random HR pixels as targets, L1 in normalised space,
Adam. What we change, measured in weights/README.md: the encoder and the latent MLP run in
bfloat16 under autocast with channels-last memory (3x faster on CPUs with AMX/AVX-512 BF16),
the render MLP stays float32; batches are prepared on a background thread; optional warm-up + cosine
learning rate and a bilinear input skip for LM-LIIF.

Devices: the model, the optimizer state and the batches live on `cfg.device` (cpu, cuda,
cuda:N, mps; auto = CUDA where available, else the CPU). On CUDA the encoder runs under bf16
autocast (the same `encoder_dtype` mechanism), batches come as uint8 in pinned memory and are
copied asynchronously and normalised on the GPU. State files hold CPU tensors only: a run saved
on a GPU resumes on a CPU and back.
"""

from __future__ import annotations

import json
import math
import signal
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lmf_cli import models
from lmf_cli.errors import option_name
from lmf_cli.files import atomic_write
from lmf_cli.models.base import ImplicitSR
from lmf_cli.models.checkpoints import load_weights, read_metadata, save_weights
from lmf_cli.training.config import FFT_WEIGHT, TrainConfig, learning_rate
from lmf_cli.training.data import (
    PatchSampler,
    Prefetcher,
    batch_to,
    is_pack,
    load_training_images,
    normalize_batch,
    pack_manifest,
)

FIT_FROM, FIT_AT = 5, 30  # --fit-schedule: time steps FIT_FROM..FIT_AT of a sitting (not cuDNN's first tuning)
# A step counts at most STALL_FACTOR times the median of the last STALL_WINDOW steps towards the time budget
# and the fitted schedule: a process stopped for a while (SIGSTOP to time something else, a suspended
# laptop) is not training. A pause of 2.5 min within a 0.25 s step once shrank a 120-minute lmf-lite
# schedule from 31,014 steps to 8,635 and ate the budget it paused for. A run slowed by other work counts
# in full once the median has caught up with its new pace (within STALL_WINDOW / 2 steps). The first
# FIT_FROM steps of a sitting count in full, as they do not enter the fit either: no median yet.
STALL_FACTOR, STALL_WINDOW = 10.0, 50


def resolve_device(name: str) -> torch.device:
    """auto: CUDA where available, else the CPU (MPS only when asked for by name)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: no CUDA GPU is available here")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {name!r}: only {torch.cuda.device_count()} CUDA GPU(s) here")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"device {name!r}: MPS is not available here")
    return device


def _optimizer_state(opt: torch.optim.Adam, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for p, st in opt.state.items():
        for key, value in st.items():
            out[f"opt.{key}.{names[id(p)]}"] = torch.as_tensor(value).detach().float().cpu().contiguous().clone()
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


def batch_loss(model: ImplicitSR, batch: dict, loss: str = "l1") -> torch.Tensor:
    """L1 in normalised units: on sampled pixels, or on every pixel of sampled LR cells for
    decoders that decode whole slices (DIIF), one patch at a time as each has its own scale.
    "l1+fft" adds the L1 distance of the windows' orthonormal 2D spectra (FFT_WEIGHT)."""
    if "cells" not in batch:
        pred, gt = model(batch["inp"], batch["coord"], batch["cell"]), batch["gt"]
        value = (pred - gt).abs().mean()
        if loss == "l1+fft":
            side = math.isqrt(gt.shape[1])
            spectra = [torch.fft.rfft2(t.float().unflatten(1, (side, side)), dim=(1, 2), norm="ortho")
                       for t in (pred, gt)]
            value = value + FFT_WEIGHT * (spectra[0] - spectra[1]).abs().mean()
        return value
    inp = batch["inp"]
    # split, not sliced per sample: a slice's backward writes a zero gradient of the whole batch's
    # latents for every sample (one fill and add of the full tensor each); split's backward is one cat
    latents = model.encode(inp, None)
    samples = [dict(zip(latents, parts, strict=True))
               for parts in zip(*(v.split(1) for v in latents.values()), strict=True)]
    losses = [model.decode_cells(inp[b:b + 1], samples[b], tuple(hr.shape[-2:]), cells).l1(hr[None])
              for b, (hr, cells) in enumerate(zip(batch["hr"], batch["cells"], strict=True))]
    return torch.stack(losses).mean()


class WeightAverage:
    """An exponential moving average of the model's floating-point state (`--ema DECAY`).

    Averaging the last few hundred steps' weights smooths out the noise of small batches at no
    training cost. The decay ramps up as (1 + n) / (10 + n) over the first steps of a sitting's
    average so that it is not dominated by where it started.
    """

    def __init__(self, model: torch.nn.Module, decay: float, saved: dict[str, torch.Tensor] | None = None) -> None:
        self.decay, self.updates = decay, 0
        self.live = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
        self.shadow = {k: (saved[f"ema.{k}"].to(v) if saved and f"ema.{k}" in saved else v.detach().clone())
                       for k, v in self.live.items()}
        if saved and "ema.updates" in saved:
            self.updates = int(saved["ema.updates"].item())

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(list(self.shadow.values()), list(self.live.values()), 1 - decay)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {f"ema.{k}": v.detach().float().cpu().contiguous() for k, v in self.shadow.items()}
        out["ema.updates"] = torch.tensor([self.updates], dtype=torch.float64)
        return out

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The averaged weights in the model for the duration (validation), the live ones after."""
        live = {k: v.detach().clone() for k, v in self.live.items()}
        with torch.no_grad():
            for k, v in self.live.items():
                v.copy_(self.shadow[k])
        try:
            yield
        finally:
            with torch.no_grad():
                for k, v in self.live.items():
                    v.copy_(live[k])

    def copy_into(self, model: torch.nn.Module) -> None:
        """The average into `model`, wherever its tensors live now (after `.cpu()` for export)."""
        model.load_state_dict(self.shadow, strict=False)


def save_state(path: Path, model: ImplicitSR, opt: torch.optim.Adam, cfg: TrainConfig, step: int,
               rng_state: dict, elapsed: float, history: list[dict], average: WeightAverage | None = None) -> None:
    tensors = {f"model.{k}": v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    tensors.update(_optimizer_state(opt, model))
    if average is not None:
        tensors.update(average.tensors())
    meta = {"format": "lmf-train-1", "config": json.dumps(asdict(cfg)), "step": str(step),
            "rng": json.dumps(rng_state), "elapsed": str(elapsed), "history": json.dumps(history)}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def _data_names(folders: list[str]) -> list[str]:
    """What the weights card records as the training data: folder names, packs with their sets."""
    names = []
    for folder in folders:
        if is_pack(folder):
            sources = dict.fromkeys(entry["source"] for entry in pack_manifest(folder)["images"])
            names.append(f"{Path(folder).name} ({', '.join(sources)})")
        else:
            names.append(Path(folder).name)
    return names


def _best_scores(history: list[dict]) -> dict[str, float]:
    """The best validation score of each kind so far (a checkpoint is the best when it beats all of them)."""
    best: dict[str, float] = {}
    for entry in history:
        for key, value in entry.items():
            if key not in ("step", "elapsed_s"):
                best[key] = max(best.get(key, value), value)
    return best


def train(cfg: TrainConfig, resume: bool = False, max_steps: int | None = None,
          time_budget: float | None = None, log: Callable[[str], None] = print,
          on_step: Callable[[int, float, float], None] | None = None,
          validate: Callable[[ImplicitSR], dict[str, float]] | None = None,
          fit_schedule: bool = False) -> Path:
    """Run (or continue) training; returns the path of the exported model weights.

    Stops at cfg.steps, after `max_steps` more steps, when the run's training time (its step
    times, over every sitting it resumes) reaches `time_budget` seconds, or on Ctrl-C; in every
    case the state is saved first, so `resume=True` continues the run. fit_schedule (with a time
    budget): set cfg.steps so the schedule ends with the budget, from the speed of steps 5..30 of
    this sitting, refitted at each checkpoint. The budget is the run's, not the sitting's, so an
    interrupted run resumed with the same budget keeps its schedule instead of stretching it.
    """
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / "state.safetensors"
    device = resolve_device(cfg.device)
    cfg.device = str(device)
    torch.manual_seed(cfg.seed)
    model = models.make(cfg.spec).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    step, elapsed, history, rng_state, tensors = 0, 0.0, [], None, None
    if resume and state_path.exists():
        meta = read_metadata(state_path)
        tensors = load_file(str(state_path))
        saved_cfg = json.loads(meta["config"])
        if saved_cfg.get("degrade", "none") != cfg.degrade:
            raise ValueError(f"{state_path}: the saved run used {option_name('degrade')} "
                             f"{saved_cfg.get('degrade', 'none')}")
        if saved_cfg["spec"] != cfg.spec:
            raise ValueError(f"{state_path}: the saved run trains another architecture")
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        _restore_optimizer(opt, model, tensors)
        step, elapsed = int(meta["step"]), float(meta["elapsed"])
        history, rng_state = json.loads(meta["history"]), json.loads(meta["rng"])
        log(f"resumed {state_path} at step {step}")
    elif cfg.init:
        model.load_state_dict(load_weights(cfg.init).model.state_dict())
        log(f"started from the weights in {cfg.init}")
    elif cfg.init_encoder:
        model.encoder.load_state_dict(load_weights(cfg.init_encoder).model.encoder.state_dict())
        log(f"started from the encoder of {cfg.init_encoder}")
    if cfg.bf16:
        model.encoder_dtype = torch.bfloat16  # the latent MLP follows it (ImplicitSR.latent_dtype)
    model.use_channels_last()
    average = WeightAverage(model, cfg.ema, tensors) if cfg.ema else None
    model.train()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed patch shapes: let cuDNN pick its fastest kernels
        log(f"training on {torch.cuda.get_device_name(device)} ({device}), encoder in "
            f"{'bfloat16' if cfg.bf16 else 'float32'}, latent MLP likewise")

    sampler = PatchSampler(load_training_images(cfg.data, log), cfg, cfg.seed,
                           whole_cells=model.capabilities.whole_cells, threads=cfg.loader_threads)
    if rng_state is not None:
        sampler.rng.bit_generator.state = rng_state
    on_cpu = device.type == "cpu"
    prefetch = Prefetcher(sampler, raw=not on_cpu, pin=device.type == "cuda")
    stop_requested = threading.Event()
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, lambda *_: stop_requested.set())
    last_save = time.monotonic()
    recent: deque[float] = deque(maxlen=STALL_WINDOW)
    start_step = step
    fitting = fit_schedule and time_budget is not None
    fit_start = None

    def fit() -> None:
        rate = (elapsed - fit_start) / (step - start_step - FIT_FROM)  # step time, as the budget counts
        left = time_budget - elapsed
        cfg.steps = step + max(1, int(0.98 * left / rate))
        log(f"schedule fitted to the time budget: {cfg.steps} steps ({rate:.3f} s/step, {left / 60:.1f} min left)")

    try:
        while step < cfg.steps and not stop_requested.is_set():
            if max_steps is not None and step - start_step >= max_steps:
                break
            if time_budget is not None and elapsed >= time_budget:
                break
            t0 = time.monotonic()
            for group in opt.param_groups:
                group["lr"] = learning_rate(cfg, step)
            opt.zero_grad(set_to_none=True)
            for _ in range(cfg.accumulate):
                batch = prefetch.next()
                if not on_cpu:
                    batch = normalize_batch(batch_to(batch, device))
                loss = batch_loss(model, batch, cfg.loss) / cfg.accumulate
                loss.backward()
            opt.step()
            if average is not None:
                average.update()
            step += 1
            loss_value = loss.item() * cfg.accumulate  # waits for the step on a GPU, so dt is its real time
            dt = time.monotonic() - t0
            if len(recent) >= FIT_FROM:
                dt = min(dt, STALL_FACTOR * statistics.median(recent))
            recent.append(dt)
            elapsed += dt
            if fitting and step - start_step == FIT_FROM:
                fit_start = elapsed
            elif fitting and step - start_step == FIT_AT:
                fit()
            if on_step:
                on_step(step, loss_value, dt)
            if validate and cfg.val_every and step % cfg.val_every == 0:
                model.eval()
                with average.applied() if average is not None else nullcontext():
                    scores = validate(model)
                    if all(scores.get(k, -1.0) > v for k, v in _best_scores(history).items()) or not history:
                        save_weights(out / "best.safetensors", model, cfg.spec,
                                     {"steps": step, "weights": "best by validation", "validation": scores})
                        log(f"best so far: step {step} -> {out / 'best.safetensors'}")
                model.train()
                history.append({"step": step, "elapsed_s": round(elapsed), **scores})
                log(f"step {step}: " + ", ".join(f"{k} {v:.2f}" for k, v in scores.items()))
            if time.monotonic() - last_save > cfg.save_minutes * 60:
                if fitting and step - start_step > FIT_AT:
                    fit()
                save_state(state_path, model, opt, cfg, step, prefetch.resume_state(), elapsed, history, average)
                log(f"checkpoint: step {step} ({elapsed / 60:.1f} min of training) in {state_path}")
                last_save = time.monotonic()
        resume_at = prefetch.resume_state()
    finally:
        prefetch.close()
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, previous)
    save_state(state_path, model, opt, cfg, step, resume_at, elapsed, history, average)
    log(f"saved {state_path} at step {step} ({elapsed / 60:.1f} min of training)")
    model.encoder_dtype = None
    model.channels_last = False
    model.encoder.to(memory_format=torch.contiguous_format)
    model.cpu()
    weights = out / "model.safetensors"
    info = {"steps": step, "train_seconds": round(elapsed), "data": _data_names(cfg.data),
            "recipe": {k: v for k, v in asdict(cfg).items() if k not in ("spec", "data", "out_dir")},
            "history": history}
    if average is not None:  # the live weights beside the average, so the lever is measured, not assumed
        save_weights(out / "model-live.safetensors", model.eval(), cfg.spec, {**info, "weights": "live"})
        average.copy_into(model)
        info["weights"] = f"exponential moving average, decay {cfg.ema}"
    save_weights(weights, model.eval(), cfg.spec, info)
    return weights
