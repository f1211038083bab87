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
from lmf_cli.models.ciaosr import CiaoSR, LMCiaoSR
from lmf_cli.models.diif import DIIF
from lmf_cli.models.encoders import EDSR, RDN
from lmf_cli.models.liif import LIIF, LTE
from lmf_cli.models.lmf import LMLIIF, LMLTE
from lmf_cli.models.swinir import SwinIR

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


def _swinir(no_upsampling: bool = True, img_size: int = 48, embed_dim: int = 180,
            depths: list[int] | None = None, num_heads: list[int] | None = None, window_size: int = 8,
            mlp_ratio: float = 2.0, patch_size: int = 1, ape: bool = False, patch_norm: bool = True,
            resi_connection: str = "1conv", upsampler: str = "none", **_: Any) -> SwinIR:
    """SwinIR as LMF's `swinir` encoder builds it (the official factory takes no arguments: these
    are the SwinIR class's, with its defaults, so smaller variants load too)."""
    _need_no_upsampling(no_upsampling)
    if (patch_size, ape, patch_norm, resi_connection, upsampler) != (1, False, True, "1conv", "none"):
        raise UnsupportedModelError("SwinIR encoders other than patch 1, no absolute position embedding, "
                                    "patch norm, '1conv' residual and no upsampler are not supported")
    return SwinIR(img_size, embed_dim, tuple(depths or (6,) * 6), tuple(num_heads or (6,) * 6), window_size,
                  mlp_ratio)


def _need_no_upsampling(flag: bool) -> None:
    if not flag:
        raise UnsupportedModelError("encoders with their own upsampler are not implicit models")


ENCODERS: dict[str, Callable[..., nn.Module]] = {
    "edsr-baseline": _edsr_baseline,
    "edsr": _edsr,
    "rdn": _rdn,
    "swinir": _swinir,
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


def _attention_args(local_size: int, feat_unfold: bool, multi_scale: list[int]) -> tuple[int, ...]:
    if local_size not in (1, 2):
        raise UnsupportedModelError(f"a local ensemble of size {local_size} is not supported (1 or 2)")
    if not feat_unfold:
        raise UnsupportedModelError("CiaoSR and LM-CiaoSR without feat_unfold are not supported "
                                    "(the official code does not run them)")
    if not set(multi_scale) <= {2, 3, 4}:
        raise UnsupportedModelError(f"cross-scale attention scales {multi_scale} are not supported (2, 3, 4)")
    return tuple(multi_scale)


def _lmciaosr(encoder: Spec, prenet_q: Spec, hypernet_q: Spec, imnet_q: Spec, imnet_k: Spec, imnet_v: Spec,
              local_size: int = 2, feat_unfold: bool = True, non_local_attn: bool = True,
              multi_scale: list[int] = (2,), softmax_scale: float = 1, mod_input: bool = False,
              **_: Any) -> LMCiaoSR:
    """The official `lmciaosr` arguments (`cmsr_spec`, the official code's test-time CMSR, is ignored:
    lmf calibrates its own tables)."""
    scales = _attention_args(local_size, feat_unfold, list(multi_scale))
    return LMCiaoSR(make_encoder(encoder), **_render_args(imnet_q, 8),
                    prenet_hidden=_mlp_hidden(prenet_q, [256]), hypernet_hidden=_mlp_hidden(hypernet_q, [288]),
                    key_hidden=_mlp_hidden(imnet_k, [256]), value_hidden=_mlp_hidden(imnet_v, [256]),
                    local_size=local_size, non_local_attn=non_local_attn, multi_scale=scales,
                    softmax_scale=float(softmax_scale), mod_input=mod_input)


def _ciaosr(encoder: Spec, imnet_q: Spec, imnet_k: Spec, imnet_v: Spec, local_size: int = 2,
            feat_unfold: bool = True, non_local_attn: bool = True, multi_scale: list[int] = (2,),
            softmax_scale: float = 1, **_: Any) -> CiaoSR:
    """The official `ciaosr` arguments (LMF's port of the CiaoSR authors' model)."""
    scales = _attention_args(local_size, feat_unfold, list(multi_scale))
    return CiaoSR(make_encoder(encoder), _mlp_hidden(imnet_q, [256] * 4), _mlp_hidden(imnet_k, [256] * 4),
                  _mlp_hidden(imnet_v, [256] * 4), local_size=local_size, non_local_attn=non_local_attn,
                  multi_scale=scales, softmax_scale=float(softmax_scale))


MODELS: dict[str, Callable[..., ImplicitSR]] = {
    "liif": _liif,
    "lte": _lte,
    "lmliif": _lmliif,
    "lmlte": _lmlte,
    "diif": _diif,
    "lmciaosr": _lmciaosr,
    "ciaosr": _ciaosr,
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


def swinir_spec() -> Spec:
    """SwinIR as LMF's configs use it (180 channels, 6 x 6 blocks, window 8)."""
    return {"name": "swinir", "args": {"no_upsampling": True}}


def lmciaosr_spec(encoder: Spec | None = None) -> Spec:
    """LM-CiaoSR as the official config (train_edsr-baseline-lmciaosr.yaml)."""
    return {"name": "lmciaosr", "args": {
        "encoder": encoder or _edsr_spec(),
        "prenet_q": {"name": "mlp", "args": {"out_dim": 256, "hidden_list": [256]}},
        "hypernet_q": {"name": "mlp", "args": {"out_dim": 288, "hidden_list": [288]}},
        "imnet_q": {"name": "lmmlp", "args": {"out_dim": 3, "hidden_dim": 16, "hidden_depth": 8,
                                               "mod_scale": True, "mod_shift": True}},
        "imnet_k": {"name": "mlp", "args": {"out_dim": 256, "hidden_list": [256]}},
        "imnet_v": {"name": "mlp", "args": {"out_dim": 256, "hidden_list": [256]}},
        "local_size": 2, "feat_unfold": True, "non_local_attn": True, "multi_scale": [2],
        "softmax_scale": 1, "mod_input": True}}


def ciaosr_spec(encoder: Spec | None = None) -> Spec:
    """CiaoSR as its authors configure it (query, key and value MLPs 256 x 4)."""
    mlp = {"name": "mlp", "args": {"hidden_list": [256] * 4}}
    return {"name": "ciaosr", "args": {
        "encoder": encoder or _edsr_spec(), "imnet_q": mlp, "imnet_k": mlp, "imnet_v": mlp,
        "local_size": 2, "feat_unfold": True, "non_local_attn": True, "multi_scale": [2], "softmax_scale": 1}}
