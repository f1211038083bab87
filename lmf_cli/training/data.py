"""Training batches: HR crops at a random scale, their (optionally degraded) LR, sampled HR
pixels as targets; prepared on a background thread with a checkpointable RNG. Training images
come from folders or from a pack (one .npz of lossless images, made to travel to a GPU machine).

A batch is made as uint8 pixels plus float coordinates (`raw_batch`) and normalised to [-1, 1]
by `normalize_batch`, on the CPU thread for CPU training, on the GPU after the copy for CUDA
(a quarter of the bytes to copy, and no float work on the thread that feeds the GPU)."""

from __future__ import annotations

import collections
import io
import json
import math
import os
import queue
import threading
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from lmf_cli.files import atomic_write
from lmf_cli.imaging.degradations import degrade_for_training, training_preset
from lmf_cli.io.images import list_images, load_rgb
from lmf_cli.training.config import TrainConfig

DEFAULT_TRAIN_SETS = ("T91", "BSD200", "BSDS500test")
EVAL_ONLY_SETS = ("Set5", "Set14", "B100", "Urban100")
# What `lmf pack-data` packs by default: T91 + BSD200 in lossless WebP is 39.3 MiB (37.1 MiB with
# --min-side 192); with BSDS500test it is 72.4 MiB, over the 60 MiB a pack may take to a GPU machine.
DEFAULT_PACK_SETS = ("T91", "BSD200")


class PatchSampler:
    """Draws training batches from images held in memory; its RNG state is checkpointed.

    threads=0 draws every sample from the one checkpointed stream, in order (the batches of
    all runs so far). threads>=1 draws one seed per sample from that stream and makes the
    samples on that many threads, each from its own seed: the batches are the same for any
    number of threads (so a resume may change it), but differ from threads=0.
    """

    def __init__(self, images: list[np.ndarray], cfg: TrainConfig, seed: int, whole_cells: bool = False,
                 threads: int = 0) -> None:
        min_side = math.ceil(cfg.patch * cfg.scale_max)
        self.images = [im for im in images if min(im.shape[:2]) >= min_side]
        if not self.images:
            raise ValueError(f"no training image is at least {min_side} px on its short side")
        if cfg.loss == "l1+fft" and (whole_cells or math.isqrt(cfg.queries) ** 2 != cfg.queries
                                     or cfg.queries > cfg.patch ** 2):
            raise ValueError("the l1+fft loss takes a square window of queries (a square number, at most "
                             "patch x patch) from decoders that render single pixels")
        self.cfg = cfg
        self.preset = training_preset(cfg.degrade)
        self.rng = np.random.default_rng(seed)
        # Decoders that decode whole slices (DIIF) learn from every pixel of sampled LR cells
        # (about `queries` pixels per patch), not from scattered single pixels.
        self.whole_cells = whole_cells
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="lmf-sample") if threads > 0 else None

    def batch(self) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        """A batch normalised to [-1, 1] on the CPU."""
        return normalize_batch(self.raw_batch())

    def raw_batch(self) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        """A batch with its pixels still uint8: `inp_u8` (B, h, w, 3), `gt_u8` (B, Q, 3) or
        `hr_u8` [(H, W, 3)], and float32 `coord`/`cell` or int `cells`."""
        cfg = self.cfg
        if self.pool is None:
            samples = [self._sample(self.rng) for _ in range(cfg.batch)]
        else:
            seeds = self.rng.integers(2 ** 63, size=cfg.batch)
            samples = list(self.pool.map(lambda seed: self._sample(np.random.default_rng(seed)), seeds))
        inp = torch.from_numpy(np.stack([s[0] for s in samples]))
        if self.whole_cells:
            return {"inp_u8": inp, "hr_u8": [torch.from_numpy(s[1]) for s in samples],
                    "cells": [s[2] for s in samples]}
        return {
            "inp_u8": inp,
            "coord": torch.from_numpy(np.stack([s[1] for s in samples])).float(),
            "cell": torch.from_numpy(np.stack([s[2] for s in samples])).float(),
            "gt_u8": torch.from_numpy(np.stack([s[3] for s in samples])),
        }

    def _sample(self, rng: np.random.Generator) -> tuple:
        cfg = self.cfg
        img = self.images[rng.integers(len(self.images))]
        s = rng.uniform(cfg.scale_min, cfg.scale_max)
        hr_size = round(cfg.patch * s)
        y0 = rng.integers(img.shape[0] - hr_size + 1)
        x0 = rng.integers(img.shape[1] - hr_size + 1)
        hr = img[y0:y0 + hr_size, x0:x0 + hr_size]
        lr = degrade_for_training(hr, (cfg.patch, cfg.patch), self.preset, rng)
        flips = rng.random(3) < 0.5
        hr, lr = _augment(hr, flips), _augment(lr, flips)
        if self.whole_cells:
            count = min(cfg.patch * cfg.patch, max(1, math.ceil(cfg.queries / s ** 2)))
            pick = rng.choice(cfg.patch * cfg.patch, count, replace=False)
            return lr, hr, torch.from_numpy(np.stack(np.divmod(pick, cfg.patch), -1))[None]
        if cfg.loss == "l1+fft":  # a square window in row order, so the loss can take its spectrum
            side = math.isqrt(cfg.queries)
            wy, wx = rng.integers(hr_size - side + 1, size=2)
            ys, xs = (a.ravel() for a in np.mgrid[wy:wy + side, wx:wx + side])
        else:
            pick = rng.choice(hr_size * hr_size, cfg.queries, replace=False)
            ys, xs = np.divmod(pick, hr_size)
        coord = np.stack([(2 * ys + 1) / hr_size - 1, (2 * xs + 1) / hr_size - 1], -1)
        return lr, coord, np.full((cfg.queries, 2), 2 / hr_size), hr[ys, xs]

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)


def normalize_batch(raw: dict) -> dict[str, torch.Tensor | list[torch.Tensor]]:
    """uint8 pixels to float32 in [-1, 1] (LR input channels-last), on the batch's device."""
    out = {k: v for k, v in raw.items() if not k.endswith("_u8")}
    inp = raw["inp_u8"].permute(0, 3, 1, 2).float().div_(127.5).sub_(1)
    out["inp"] = inp.contiguous(memory_format=torch.channels_last)
    if "gt_u8" in raw:
        out["gt"] = raw["gt_u8"].float().div_(127.5).sub_(1)
    if "hr_u8" in raw:
        out["hr"] = [hr.permute(2, 0, 1).float().div_(127.5).sub_(1) for hr in raw["hr_u8"]]
    return out


def batch_to(batch: dict, device: torch.device) -> dict:
    """Every tensor of a batch (lists too) on `device`; asynchronous from pinned memory."""
    non_blocking = device.type == "cuda"

    def move(t: torch.Tensor) -> torch.Tensor:
        return t.to(device, non_blocking=non_blocking)

    return {k: [move(t) for t in v] if isinstance(v, list) else move(v) for k, v in batch.items()}


def _pinned(batch: dict) -> dict:
    return {k: [t.pin_memory() for t in v] if isinstance(v, list) else v.pin_memory() for k, v in batch.items()}


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
    one, so a checkpoint resumes exactly at the first batch not yet trained on.

    raw=True queues uint8 batches (`PatchSampler.raw_batch`), pin=True in pinned memory,
    for a GPU to copy asynchronously and normalise itself."""

    def __init__(self, sampler: PatchSampler, depth: int = 3, raw: bool = False, pin: bool = False) -> None:
        self.sampler = sampler
        self.make = sampler.raw_batch if raw else sampler.batch
        self.pin = pin
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.states: collections.deque = collections.deque()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while not self.stop.is_set():
                with self.lock:
                    self.states.append(self.sampler.rng.bit_generator.state)
                batch = self.make()
                if self.pin:
                    batch = _pinned(batch)
                while not self.stop.is_set():
                    try:
                        self.queue.put(batch, timeout=0.2)
                        break
                    except queue.Full:
                        continue
        except BaseException as exc:  # handed to the training thread instead of hanging it
            self.error = exc
            self.queue.put(None)

    def next(self) -> dict[str, torch.Tensor]:
        batch = self.queue.get()
        if batch is None:
            raise RuntimeError(f"preparing a training batch failed: {self.error}") from self.error
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
        self.sampler.close()


def _refuse_eval_sets(parts: tuple[str, ...] | list[str], what: str) -> None:
    if set(parts) & set(EVAL_ONLY_SETS):
        raise ValueError(f"{what}: evaluation sets are never used for training")


def load_training_images(folders: list[str], log: Callable[[str], None]) -> list[np.ndarray]:
    """HR images from folders and packs (`.npz` files written by `write_pack`)."""
    images = []
    for folder in folders:
        if is_pack(folder):
            entries = read_pack(folder)
            images += [im for im, _ in entries]
            counts = collections.Counter(source for _, source in entries)
            log(f"loaded {len(entries)} images from the pack {folder} ("
                + ", ".join(f"{n} {source}" for source, n in counts.items()) + ")")
            continue
        _refuse_eval_sets(Path(folder).resolve().parts, folder)
        paths = list_images(folder)
        if not paths:
            raise ValueError(f"{folder}: no images found")
        images += [load_rgb(p) for p in paths]
        log(f"loaded {len(paths)} images from {folder}")
    return images


# --------------------------------------------------------------------------- packs

PACK_FORMAT = "lmf-pack-1"
PACK_CODECS = ("webp", "raw")


def is_pack(path: str | Path) -> bool:
    return Path(path).suffix.lower() == ".npz" and Path(path).is_file()


def _source_name(folder: Path) -> str:
    """The folder's last three path parts (e.g. data/T91/HR): what the pack records and the
    trainer checks against the evaluation sets."""
    return "/".join(folder.resolve().parts[-3:])


def _crc(img: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(img).data)


def _encode(img: np.ndarray, codec: str) -> np.ndarray:
    if codec == "raw":
        return img
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "WEBP", lossless=True, quality=100, method=4, exact=True)
    return np.frombuffer(buf.getvalue(), np.uint8)


def _decode(data: np.ndarray, entry: dict) -> np.ndarray:
    if entry["codec"] == "raw":
        img = data
    else:
        from PIL import Image

        with Image.open(io.BytesIO(data.tobytes())) as im:
            img = np.asarray(im.convert("RGB"))
    if list(img.shape) != entry["shape"] or img.dtype != np.uint8 or _crc(img) != entry["crc32"]:
        raise ValueError(f"pack image {entry['name']} ({entry['source']}) does not decode to the pixels packed")
    return img


def write_pack(out: str | Path, folders: list[str | Path], codec: str = "webp", min_side: int = 0,
               log: Callable[[str], None] = print, threads: int | None = None) -> dict:
    """Pack the HR images of `folders` into one .npz of uint8 images (losslessly: raw arrays,
    or WebP lossless bytes), with a manifest naming each image's source folder. Images whose
    short side is under `min_side` (which training would skip) are left out. Returns the
    manifest, with the file's size in bytes under "bytes"."""
    if codec not in PACK_CODECS:
        raise ValueError(f"codec {codec!r}: choose one of {', '.join(PACK_CODECS)}")
    out = Path(out)
    if out.suffix.lower() != ".npz":
        raise ValueError(f"{out}: a pack is a .npz file")
    todo: list[tuple[Path, str]] = []
    for folder in map(Path, folders):
        _refuse_eval_sets(folder.resolve().parts, str(folder))
        paths = list_images(folder)
        if not paths:
            raise ValueError(f"{folder}: no images found")
        todo += [(p, _source_name(folder)) for p in paths]

    def pack_one(item: tuple[Path, str]) -> tuple[dict, np.ndarray] | None:
        path, source = item
        img = load_rgb(path)
        if min(img.shape[:2]) < min_side:
            return None
        data = _encode(img, codec)
        entry = {"name": path.name, "source": source, "shape": list(img.shape), "codec": codec, "crc32": _crc(img)}
        _decode(data, entry)  # what is packed decodes to the pixels, here already
        return entry, data

    with ThreadPoolExecutor(threads or os.cpu_count() or 1) as pool:
        packed = [r for r in pool.map(pack_one, todo) if r is not None]
    if not packed:
        raise ValueError(f"no image is at least {min_side} px on its short side")
    manifest = {"format": PACK_FORMAT, "images": [entry for entry, _ in packed]}
    arrays = {f"img{i:05d}": data for i, (_, data) in enumerate(packed)}
    arrays["manifest"] = np.frombuffer(json.dumps(manifest).encode(), np.uint8)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            (np.savez_compressed if codec == "raw" else np.savez)(f, **arrays)

    atomic_write(out, write)
    manifest["bytes"] = out.stat().st_size
    counts = collections.Counter(entry["source"] for entry, _ in packed)
    log(f"packed {len(packed)} of {len(todo)} images (" + ", ".join(f"{n} {s}" for s, n in counts.items())
        + f") into {out}: {manifest['bytes'] / 2 ** 20:.1f} MiB")
    return manifest


def pack_manifest(path: str | Path) -> dict:
    with np.load(path, allow_pickle=False) as npz:
        if "manifest" not in npz.files:
            raise ValueError(f"{path}: not an lmf training pack (no manifest)")
        manifest = json.loads(npz["manifest"].tobytes().decode())
    if manifest.get("format") != PACK_FORMAT:
        raise ValueError(f"{path}: unknown pack format {manifest.get('format')!r}")
    return manifest


def read_pack(path: str | Path) -> list[tuple[np.ndarray, str]]:
    """(image, source folder) for each image of a pack; refuses packs that hold an
    evaluation set and images that do not decode to the pixels packed."""
    manifest = pack_manifest(path)
    for entry in manifest["images"]:
        _refuse_eval_sets(entry["source"].split("/"), f"{path} ({entry['source']})")
    with np.load(path, allow_pickle=False) as npz:
        blobs = [npz[f"img{i:05d}"] for i in range(len(manifest["images"]))]
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        images = list(pool.map(_decode, blobs, manifest["images"]))
    return [(img, entry["source"]) for img, entry in zip(images, manifest["images"], strict=True)]
