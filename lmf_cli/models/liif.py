"""The baselines LMF is measured against: LIIF (Chen et al. 2021) and LTE (Lee & Jin 2022).

Both decode every output pixel with a 256-wide MLP. `decode_slots` still evaluates the
first layer's feature term once per latent (it does not depend on the query), which is
exact and only trims the cheaper part of their cost.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lmf_cli.models.base import (
    DECODER_MARGIN,
    Capabilities,
    ImplicitSR,
    Latents,
    RenderWindow,
    channels_last_table,
    conv3x3_macs,
    encoder_margin,
    ensemble_stages,
    gather,
    rows_linear,
    slot_rel,
    slot_window,
    unfold3x3,
)
from lmf_cli.models.mlp import MLP


def _run_rest(mlp: MLP, x: torch.Tensor) -> torch.Tensor:
    linears = mlp.linears
    for layer in linears[1:-1]:
        x = rows_linear(x.relu_(), layer.weight, layer.bias)
    return rows_linear(x.relu_(), linears[-1].weight, linears[-1].bias)


class LIIF(ImplicitSR):
    def __init__(self, encoder: nn.Module, hidden_list: list[int] | None = None,
                 local_ensemble: bool = True, feat_unfold: bool = True, cell_decode: bool = True) -> None:
        super().__init__()
        self.encoder = encoder
        self.local_ensemble = local_ensemble
        self.feat_unfold = feat_unfold
        self.cell_decode = cell_decode
        feat_dim = encoder.out_dim * (9 if feat_unfold else 1)
        self.feat_dim = feat_dim
        self.imnet = MLP(feat_dim + 2 + (2 if cell_decode else 0), 3, hidden_list or [256] * 4)

    @property
    def capabilities(self) -> Capabilities:
        return _plain_capabilities(self, "liif")

    def stage_macs(self, in_hw: tuple[int, int], out_hw: tuple[int, int]) -> dict[str, float]:
        return ensemble_stages(self, 0.0, in_hw, out_hw)

    def latents(self, feat: torch.Tensor, rel_cell: torch.Tensor) -> Latents:
        return {"feat": channels_last_table(unfold3x3(feat) if self.feat_unfold else feat)}

    def decode_points(self, latents: Latents, index: torch.Tensor, rel: torch.Tensor,
                      rel_cell: torch.Tensor) -> torch.Tensor:
        parts = [gather(latents["feat"], index), rel]
        if self.cell_decode:
            parts.append(rel_cell.unsqueeze(1).expand(*rel.shape))
        return self.imnet(torch.cat(parts, -1))

    def decode_slots(self, latents: Latents, window: RenderWindow) -> torch.Tensor:
        feat = slot_window(latents["feat"], window)
        first = self.imnet.linears[0]
        f = self.feat_dim
        per_latent = rows_linear(feat, first.weight[:, :f], first.bias)
        if self.cell_decode:
            w_cell = first.weight[:, f + 2:f + 4]
            per_latent = per_latent + (window.rel_cell @ w_cell.t()).view(-1, 1, 1, 1, 1, w_cell.shape[0])
        ry, rx = slot_rel(window, per_latent.dtype)
        x = (per_latent + ry * first.weight[:, f]) + rx * first.weight[:, f + 1]
        return _run_rest(self.imnet, x)


class LTE(ImplicitSR):
    def __init__(self, encoder: nn.Module, hidden_list: list[int] | None = None,
                 hidden_dim: int = 256, local_ensemble: bool = True) -> None:
        super().__init__()
        self.encoder = encoder
        self.local_ensemble = local_ensemble
        self.bilinear_skip = True
        self.coef = nn.Conv2d(encoder.out_dim, hidden_dim, 3, padding=1)
        self.freq = nn.Conv2d(encoder.out_dim, hidden_dim, 3, padding=1)
        self.phase = nn.Linear(2, hidden_dim // 2, bias=False)
        self.imnet = MLP(hidden_dim, 3, hidden_list or [256] * 3)

    @property
    def capabilities(self) -> Capabilities:
        return _plain_capabilities(self, "lte")

    def stage_macs(self, in_hw: tuple[int, int], out_hw: tuple[int, int]) -> dict[str, float]:
        return ensemble_stages(self, conv3x3_macs(self.coef, self.freq), in_hw, out_hw)

    def latents(self, feat: torch.Tensor, rel_cell: torch.Tensor) -> Latents:
        return {"coef": channels_last_table(self.coef(feat)), "freq": channels_last_table(self.freq(feat))}

    def _features(self, coef: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return coef * torch.cat([torch.cos(math.pi * z), torch.sin(math.pi * z)], -1)

    def decode_points(self, latents: Latents, index: torch.Tensor, rel: torch.Tensor,
                      rel_cell: torch.Tensor) -> torch.Tensor:
        coef, freq = gather(latents["coef"], index), gather(latents["freq"], index)
        z = freq[..., 0::2] * rel[..., :1] + freq[..., 1::2] * rel[..., 1:]
        z = z + self.phase(rel_cell).unsqueeze(1)
        return self.imnet(self._features(coef, z))

    def decode_slots(self, latents: Latents, window: RenderWindow) -> torch.Tensor:
        coef, freq = slot_window(latents["coef"], window), slot_window(latents["freq"], window)
        ry, rx = slot_rel(window, freq.dtype)
        phase = self.phase(window.rel_cell).view(-1, 1, 1, 1, 1, freq.shape[-1] // 2)
        z = freq[..., 0::2] * ry + (freq[..., 1::2] * rx + phase)
        x = self._features(coef, z)
        first = self.imnet.linears[0]
        return _run_rest(self.imnet, rows_linear(x, first.weight, first.bias))


def _plain_capabilities(model: LIIF | LTE, family: str) -> Capabilities:
    """An MLP without modulations: no CMSR, no compiled kernel. Its latent table is budgeted as
    a 3x3-unfolded feature (LIIF's), which also bounds LTE's coef and freq tables."""
    width = model.encoder.out_dim
    return Capabilities(family, encoder_margin(model.encoder), width, 9 * width,
                        max(layer.out_features for layer in model.imnet.linears),
                        streams_rows=model.encoder.streams_rows, decoder_margin=DECODER_MARGIN,
                        tile_grid=model.encoder.tile_grid)

