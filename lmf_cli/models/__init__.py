"""Model registry: a name -> constructor map and spec dicts, in the official LIIF/LMF form.

A spec is `{"name": ..., "args": {...}}` exactly as in the official training YAMLs, so an
official checkpoint's `model` block and our own weights' metadata build the same way.
Unknown extra arguments (e.g. `mixed_le` in older files) are ignored.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from lmf_cli.errors import UnsupportedModelError
from lmf_cli.models.base import ImplicitSR
from lmf_cli.models.diif import DIIF
from lmf_cli.models.encoders import EDSR, RDN
from lmf_cli.models.liif import LIIF, LTE
from lmf_cli.models.lmf import LMLIIF, LMLTE

Spec = dict[str, Any]


def _edsr_baseline(n_resblocks: int = 16, n_feats: int = 64, res_scale: float = 1,
                   no_upsampling: bool = True, **_: Any) -> EDSR:
    _need_no_upsampling(no_upsampling)
    return EDSR(n_resblocks, n_feats, res_scale)


def _edsr(n_resblocks: int = 32, n_feats: int = 256, res_scale: float = 0.1,
          no_upsampling: bool = True, **_: Any) -> EDSR:
    _need_no_upsampling(no_upsampling)
    return EDSR(n_resblocks, n_feats, res_scale)


def _rdn(G0: int = 64, RDNkSize: int = 3, RDNconfig: str = "B", no_upsampling: bool = True,
         **_: Any) -> RDN:
    _need_no_upsampling(no_upsampling)
    if RDNkSize != 3 or RDNconfig not in ("A", "B"):
        raise UnsupportedModelError(f"RDN config {RDNconfig!r} with kernel {RDNkSize} is not supported")
    d, c, g = {"A": (20, 6, 32), "B": (16, 8, 64)}[RDNconfig]
    return RDN(G0, d, c, g)


def _need_no_upsampling(flag: bool) -> None:
    if not flag:
        raise UnsupportedModelError("encoders with their own upsampler are not implicit models")


ENCODERS: dict[str, Callable[..., nn.Module]] = {
    "edsr-baseline": _edsr_baseline,
    "edsr": _edsr,
    "rdn": _rdn,
}


def make_encoder(spec: Spec) -> nn.Module:
    name = spec.get("name")
    if name not in ENCODERS:
        raise UnsupportedModelError(f"encoder {name!r} is not supported (known: {', '.join(ENCODERS)})")
    return ENCODERS[name](**spec.get("args", {}))


def _mlp_hidden(spec: Spec | None, default: list[int]) -> list[int]:
    return list((spec or {}).get("args", {}).get("hidden_list", default))


def _render_args(imnet_spec: Spec, depth: int) -> dict[str, int]:
    args = imnet_spec.get("args", {})
    if not (args.get("mod_scale", True) and args.get("mod_shift", True)):
        raise UnsupportedModelError("LMF render MLPs without both scale and shift modulation are not supported")
    return {"hidden_dim": int(args.get("hidden_dim", 16)), "hidden_depth": int(args.get("hidden_depth", depth))}


def _liif(encoder_spec: Spec, imnet_spec: Spec | None = None, local_ensemble: bool = True,
          feat_unfold: bool = True, cell_decode: bool = True, **_: Any) -> LIIF:
    return LIIF(make_encoder(encoder_spec), _mlp_hidden(imnet_spec, [256] * 4),
                local_ensemble, feat_unfold, cell_decode)


def _lte(encoder_spec: Spec, imnet_spec: Spec | None = None, hidden_dim: int = 256, **_: Any) -> LTE:
    return LTE(make_encoder(encoder_spec), _mlp_hidden(imnet_spec, [256] * 3), hidden_dim)


def _lmliif(encoder_spec: Spec, imnet_spec: Spec, hypernet_spec: Spec, local_ensemble: bool = True,
            feat_unfold: bool = True, cell_decode: bool = True, mod_input: bool = False,
            bilinear_skip: bool = False, **_: Any) -> LMLIIF:
    return LMLIIF(make_encoder(encoder_spec), **_render_args(imnet_spec, 6),
                  latent_hidden=_mlp_hidden(hypernet_spec, [208])[0], local_ensemble=local_ensemble,
                  feat_unfold=feat_unfold, cell_decode=cell_decode, mod_input=mod_input,
                  bilinear_skip=bilinear_skip)


def _lmlte(encoder_spec: Spec, imnet_spec: Spec, hypernet_spec: Spec, hidden_dim: int = 128,
           local_ensemble: bool = True, cell_decode: bool = True, mod_input: bool = False,
           **_: Any) -> LMLTE:
    return LMLTE(make_encoder(encoder_spec), **_render_args(imnet_spec, 8),
                 latent_hidden=_mlp_hidden(hypernet_spec, [288])[0], lte_dim=hidden_dim,
                 local_ensemble=local_ensemble, cell_decode=cell_decode, mod_input=mod_input)


def _diif(encoder_spec: Spec, imnet_spec: Spec | None = None, single_slice: bool = False,
          local_ensemble: bool = True, ensemble_num: int | None = 2, feat_unfold: bool = True,
          unfold_num: int = 3, coarse_cell_decode: bool = True, fine_cell_decode: bool = False,
          fixed_area: bool = True, bilinear_skip: bool = False, **_: Any) -> DIIF:
    """The authors' DIIF arguments (`batch_unit` and other testing knobs are ignored)."""
    if unfold_num != 3:
        raise UnsupportedModelError(f"DIIF with a {unfold_num}x{unfold_num} unfold is not supported (3x3 only)")
    if local_ensemble and ensemble_num not in (None, 2):
        raise UnsupportedModelError(f"DIIF's corner ensemble reads 2x2 blocks (ensemble_num 2), not {ensemble_num}")
    if local_ensemble and not feat_unfold:
        raise UnsupportedModelError("DIIF's corner ensemble needs feat_unfold")
    args = (imnet_spec or {}).get("args", {})
    return DIIF(make_encoder(encoder_spec), list(args.get("head_hidden_list", [256, 256])),
                list(args.get("tail_hidden_list", [256, 256])), single_slice=single_slice,
                ensemble=local_ensemble, feat_unfold=feat_unfold, coarse_cell_decode=coarse_cell_decode,
                fine_cell_decode=fine_cell_decode, fixed_area=fixed_area, bilinear_skip=bilinear_skip)


MODELS: dict[str, Callable[..., ImplicitSR]] = {
    "liif": _liif,
    "lte": _lte,
    "lmliif": _lmliif,
    "lmlte": _lmlte,
    "diif": _diif,
}


def make(spec: Spec) -> ImplicitSR:
    """Build a model from its spec; unknown architectures raise UnsupportedModelError."""
    name = spec.get("name")
    if name not in MODELS:
        raise UnsupportedModelError(
            f"architecture {name!r} is not supported (supported: {', '.join(MODELS)})")
    try:
        return MODELS[name](**spec.get("args", {}))
    except TypeError as exc:
        raise UnsupportedModelError(f"architecture {name!r} has arguments lmf cannot use: {exc}") from exc


def _edsr_spec(n_resblocks: int = 16, n_feats: int = 64) -> Spec:
    return {"name": "edsr-baseline",
            "args": {"n_resblocks": n_resblocks, "n_feats": n_feats, "no_upsampling": True}}


def lmliif_spec(encoder: Spec | None = None, bilinear_skip: bool = False, latent_hidden: int = 208,
                render_depth: int = 6) -> Spec:
    """LM-LIIF; the defaults are the paper's (render MLP 16 x 6, latent MLP 578 -> 208 -> 208)."""
    mod_out = 2 * 16 * render_depth + 16
    return {"name": "lmliif", "args": {
        "encoder_spec": encoder or _edsr_spec(),
        "imnet_spec": {"name": "lmmlp", "args": {"out_dim": 3, "hidden_dim": 16, "hidden_depth": render_depth,
                                                  "mod_scale": True, "mod_shift": True}},
        "hypernet_spec": {"name": "mlp", "args": {"out_dim": mod_out, "hidden_list": [latent_hidden]}},
        "local_ensemble": True, "feat_unfold": True, "cell_decode": True, "mod_input": True,
        "bilinear_skip": bilinear_skip}}


def lmlte_spec(encoder: Spec | None = None) -> Spec:
    return {"name": "lmlte", "args": {
        "encoder_spec": encoder or _edsr_spec(),
        "imnet_spec": {"name": "lmmlp", "args": {"out_dim": 3, "hidden_dim": 16, "hidden_depth": 8,
                                                  "mod_scale": True, "mod_shift": True}},
        "hypernet_spec": {"name": "mlp", "args": {"out_dim": 288, "hidden_list": [288]}},
        "hidden_dim": 128, "local_ensemble": True, "cell_decode": True, "mod_input": True}}


def liif_spec(encoder: Spec | None = None) -> Spec:
    return {"name": "liif", "args": {
        "encoder_spec": encoder or _edsr_spec(),
        "imnet_spec": {"name": "mlp", "args": {"out_dim": 3, "hidden_list": [256] * 4}}}}


def lte_spec(encoder: Spec | None = None) -> Spec:
    return {"name": "lte", "args": {
        "encoder_spec": encoder or _edsr_spec(),
        "imnet_spec": {"name": "mlp", "args": {"out_dim": 3, "hidden_list": [256] * 3}},
        "hidden_dim": 256}}


def diif_spec(encoder: Spec | None = None, single_slice: bool = False, head_hidden: list[int] | None = None,
              tail_hidden: list[int] | None = None, bilinear_skip: bool = False) -> Spec:
    """DIIF; the defaults are the authors' (C2F-MLP head and tail 256 x 2, slices by rows,
    corner ensemble, cell in the head, clipped above x4). See docs/diif.md."""
    return {"name": "diif", "args": {
        "encoder_spec": encoder or _edsr_spec(),
        "imnet_spec": {"name": "c2fmlp", "args": {"out_dim": 3, "head_hidden_list": list(head_hidden or [256, 256]),
                                                  "tail_hidden_list": list(tail_hidden or [256, 256])}},
        "single_slice": single_slice, "local_ensemble": True, "ensemble_num": 2, "feat_unfold": True,
        "unfold_num": 3, "coarse_cell_decode": True, "fine_cell_decode": False, "fixed_area": True,
        "bilinear_skip": bilinear_skip}}


ARCHITECTURES: dict[str, Callable[..., Spec]] = {
    "lmliif": lmliif_spec, "lmlte": lmlte_spec, "liif": liif_spec, "lte": lte_spec, "diif": diif_spec}


def edsr_spec(n_resblocks: int = 16, n_feats: int = 64) -> Spec:
    return _edsr_spec(n_resblocks, n_feats)


def rdn_spec() -> Spec:
    return {"name": "rdn", "args": {"no_upsampling": True}}
