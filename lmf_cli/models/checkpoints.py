"""Weights files: our `.safetensors` (config as JSON metadata) and official LIIF/LTE/LMF `.pth`.

Neither path unpickles arbitrary objects: safetensors holds only tensors and strings, and
official files go through `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import math
import pickle
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from lmf_cli import models
from lmf_cli.errors import CheckpointError, UnsupportedModelError
from lmf_cli.files import atomic_write
from lmf_cli.models.base import Capabilities, ImplicitSR

FORMAT = "lmf-1"
# Weights files store their floats in one of these; a model is always built in float32. Half
# precision halves a file (and what each shipped update adds to the repository's history) and
# changed no card row by more than 0.001 dB (lmf-edsr and lmf-lite, Set5 and B100 at x2 and x4).
STORAGE_TYPES = (torch.float32, torch.float16)


@dataclass
class LoadedModel:
    """A model and what its file says about it (spandrel-style descriptor)."""

    model: ImplicitSR
    spec: dict[str, Any]
    source: str
    info: dict[str, Any] = field(default_factory=dict)
    cmsr_tables: dict[str, dict[str, float]] | None = None
    storage: torch.dtype = torch.float32  # the float type of the file's weights, kept when it is written again

    @property
    def architecture(self) -> str:
        return self.spec["name"]

    @property
    def capabilities(self) -> Capabilities:
        """What this model can do (its family's declaration), e.g. `.cmsr`, `.tile_margin`."""
        return self.model.capabilities

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def save_weights(path: str | Path, model: ImplicitSR, spec: dict[str, Any],
                 info: dict[str, Any] | None = None,
                 cmsr_tables: dict[str, dict[str, float]] | None = None,
                 storage: torch.dtype = torch.float32) -> None:
    """Write weights atomically (temp file + rename) with the spec and provenance as metadata, their
    floats as `storage` (STORAGE_TYPES); a weight beyond float16's range is refused, not clipped."""
    if storage not in STORAGE_TYPES:
        raise ValueError(f"weights are stored as {' or '.join(map(str, STORAGE_TYPES))}, not {storage}")
    path = Path(path)
    state = {}
    for name, value in model.state_dict().items():
        value = value.detach().to("cpu", torch.float32)
        if storage == torch.float16 and bool(value.abs().max() > torch.finfo(torch.float16).max):
            raise CheckpointError(f"{path}: {name} holds values beyond float16's range; store it as float32")
        state[name] = value.to(storage).contiguous()
    meta = {"format": FORMAT, "spec": json.dumps(spec), "info": json.dumps(info or {})}
    if cmsr_tables is not None:
        meta["cmsr"] = json.dumps(cmsr_tables)
    atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata=meta))


def read_metadata(path: str | Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({_short(exc)})") from exc


def load_weights(path: str | Path) -> LoadedModel:
    """Load our `.safetensors` or an official `.pth`; every failure is a one-line CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such weights file")
    if path.suffix == ".safetensors":
        return _load_safetensors(path)
    return _load_official(path)


def _load_safetensors(path: Path) -> LoadedModel:
    meta = read_metadata(path)
    if meta.get("format") != FORMAT or "spec" not in meta:
        raise CheckpointError(f"{path}: safetensors file without an lmf model config")
    try:
        spec = json.loads(meta["spec"])
        info = json.loads(meta.get("info", "{}"))
        tables = json.loads(meta["cmsr"]) if "cmsr" in meta else None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: damaged model config ({exc.msg})") from exc
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: damaged or truncated weights ({_short(exc)})") from exc
    model = _build(path, spec, state)
    half = all(t.dtype == torch.float16 for t in state.values() if t.is_floating_point())
    return LoadedModel(model, spec, str(path), info, tables, torch.float16 if half else torch.float32)


def _load_official(path: Path) -> LoadedModel:
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": noise before our own message
            warnings.simplefilter("ignore")
            ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # weights_only met a class or function: never unpickle code
        raise CheckpointError(f"{path}: holds Python objects other than tensors ({_refused_object(exc)}); "
                              "lmf loads only LIIF/LTE/LMF checkpoints of plain tensors and will not unpickle "
                              "it") from exc
    except Exception as exc:  # torch raises many types for corrupt/truncated files
        raise CheckpointError(f"{path}: not a LIIF/LTE/LMF checkpoint ({_short(exc)})") from exc
    block = ckpt.get("model") if isinstance(ckpt, dict) else None
    if not isinstance(block, dict) or not {"name", "args", "sd"} <= block.keys():
        raise CheckpointError(f"{path}: not an official LIIF/LTE/LMF checkpoint (no model name/args/sd)")
    spec = {"name": block["name"], "args": block["args"]}
    model = _build(path, spec, block["sd"])
    info = {"origin": "official", "epoch": ckpt.get("epoch")}
    return LoadedModel(model, spec, str(path), info)


def _build(path: Path, spec: dict[str, Any], state: dict[str, torch.Tensor]) -> ImplicitSR:
    try:
        model = models.make(spec)
    except UnsupportedModelError as exc:
        raise UnsupportedModelError(f"{path}: {exc}") from exc
    except (KeyError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"{path}: model config is incomplete ({_short(exc)})") from exc
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not match the {spec['name']!r} architecture "
                              f"({_short(exc)})") from exc
    return model.eval()


def _refused_object(exc: BaseException) -> str:
    """The global that weights_only refused (e.g. `builtins.print`), from PyTorch's long message."""
    found = re.search(r"(?:GLOBAL|global) ([\w.]+)", str(exc))
    return f"it references {found[1]}" if found else "not a plain tensor file"


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 160 else text[:157] + "..."


def card_facts(path: str | Path) -> tuple[str, str, str, str]:
    """Encoder, parameters, training and Set5 PSNR from the weights' header, without building the model."""
    meta = read_metadata(path)
    try:
        spec, info = json.loads(meta.get("spec", "{}")), json.loads(meta.get("info", "{}"))
        with safe_open(str(path), framework="pt") as f:
            parameters = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    except (json.JSONDecodeError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: damaged ({exc})") from exc
    enc = spec.get("args", {}).get("encoder_spec", {}) if isinstance(spec, dict) else {}
    enc_args = enc.get("args", {})
    encoder = f"{spec.get('name', '?')} / {enc.get('name', '?')}"
    if "n_resblocks" in enc_args:
        encoder += f" {enc_args['n_resblocks']}x{enc_args.get('n_feats', '?')}"
    info = info if isinstance(info, dict) else {}
    training = f"{info['steps']:,} steps" if isinstance(info.get("steps"), int) else "?"
    if isinstance(info.get("train_seconds"), (int, float)):
        training += f", {info['train_seconds'] / 3600:.1f} h"
    evals = info.get("eval")
    set5 = evals.get("Set5") if isinstance(evals, dict) else None
    psnr = "not evaluated"
    if isinstance(set5, dict):
        by_scale = {f"{float(k):g}": v for k, v in set5.items() if re.fullmatch(r"\d+(\.\d+)?", str(k))}
        psnr = " / ".join(f"{by_scale[s]:.2f}" if isinstance(by_scale.get(s), (int, float)) else "-"
                          for s in ("2", "3", "4"))
    return encoder, f"{parameters / 1e6:.2f} M", training, psnr
