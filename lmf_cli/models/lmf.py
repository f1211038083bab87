"""Latent Modulated Functions: LM-LIIF and LM-LTE (He et al., CVPR 2024).

The latent MLP runs once per LR pixel and emits, per latent, the scale and shift of every
render layer plus a compressed code; the tiny render MLP then runs per output pixel.
In `decode_slots` the modulation is folded per latent, `(W h + b)(1 + s) + t =
(W h)(1 + s) + (b (1 + s) + t)`, so a hidden layer costs one shared 16x16 matmul and one
broadcast multiply-add, with no per-pixel gather.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
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
    linear_macs,
    rows_linear,
    slot_rel_pairs,
    slot_window,
)
from lmf_cli.models.mlp import AFFINE, FOURIER, MLP, FusedMLP, ModulatedMLP, table_linear

# Slots per latent from which each latent's gain is folded into its own copy of the weights (one
# batched matmul a layer); below it (CMSR's coarse levels: 4-25 slots a latent) those matmuls are
# too small to pay, and one shared matmul followed by the gain and shift is 1.5-7x faster (one
# AMD EPYC thread, 400k slots of width 16).
FOLD_MIN_SLOTS = 32


def modulated_layer(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, gain: torch.Tensor,
                    shift: torch.Tensor) -> torch.Tensor:
    """relu((W x + b)(1 + s) + t) over latent-major slots x (L, S, in); `gain` = 1 + s and the
    shift t are per latent (L, out), `bias` is shared (out,) or per latent (L, out). Folded,
    (W diag(1 + s)) x + (b (1 + s) + t), where a latent has enough slots to fill a matmul."""
    if x.shape[1] >= FOLD_MIN_SLOTS:
        folded = weight.t().unsqueeze(0) * gain.unsqueeze(1)
        return torch.baddbmm(torch.addcmul(shift, bias, gain).unsqueeze(1), x, folded).relu_()
    y = rows_linear(x, weight, bias) if bias.dim() == 1 else rows_linear(x, weight).add_(bias.unsqueeze(1))
    return torch.addcmul(shift.unsqueeze(1), y, gain.unsqueeze(1)).relu_()


def _folded_layers(render: ModulatedMLP, x: torch.Tensor, mod: torch.Tensor, first: int) -> torch.Tensor:
    """Modulated layers first..depth-1 and the output layer over latent-major slots.

    x: (L, S, width), the S slots of each of L latents; mod: (L, mod_dim), each latent's gains
    and shifts (see modulated_layer)."""
    d, n = render.hidden_dim, render.hidden_depth
    linears = render.linears
    for k in range(first, n):
        layer = linears[k]
        x = modulated_layer(x, layer.weight, layer.bias, 1 + mod[:, k * d:(k + 1) * d],
                            mod[:, (n + k) * d:(n + k + 1) * d])
    return rows_linear(x, linears[-1].weight, linears[-1].bias)


def _fused(render: ModulatedMLP, kind: int, table: torch.Tensor, base: torch.Tensor | None, code: int,
           first: int) -> FusedMLP:
    """Pack the render MLP for the compiled kernel; the latent table is passed as it is. The
    grid's `extra` vector is added per grid (fused_extra)."""
    linears = render.linears[first:render.hidden_depth]
    last = render.linears[-1]
    d = render.hidden_dim
    weights = torch.stack([layer.weight.t() for layer in linears]) if linears else last.weight.new_empty(0, d, d)
    biases = torch.stack([layer.bias for layer in linears]) if linears else last.weight.new_empty(0, d)
    return FusedMLP(kind, table.contiguous(), render.hidden_depth, base, None, code,
                    weights.contiguous(), biases.contiguous(), last.weight.t().contiguous(), last.bias.contiguous())


def _latent_rows(table: torch.Tensor, window: RenderWindow) -> torch.Tensor:
    """(B * nr * nc, C): the window's latents, one row each."""
    t = slot_window(table, window)
    return t.reshape(-1, t.shape[-1])


class LMLIIF(ImplicitSR):
    """LM-LIIF. Options beyond the official ones: `bilinear_skip` adds a bilinear upsample
    of the input to the output (as LTE does), so training starts from a sensible image."""

    def __init__(self, encoder: nn.Module, hidden_dim: int = 16, hidden_depth: int = 6,
                 latent_hidden: int = 208, local_ensemble: bool = True, feat_unfold: bool = True,
                 cell_decode: bool = True, mod_input: bool = True, bilinear_skip: bool = False) -> None:
        super().__init__()
        self.encoder = encoder
        self.local_ensemble = local_ensemble
        self.feat_unfold = feat_unfold
        self.cell_decode = cell_decode
        self.mod_input = mod_input
        self.bilinear_skip = bilinear_skip
        code_dim = hidden_dim if mod_input else encoder.out_dim
        render_in = code_dim + 2 + (2 if cell_decode else 0)
        self.imnet = ModulatedMLP(render_in, 3, hidden_dim, hidden_depth)
        latent_in = encoder.out_dim * (9 if feat_unfold else 1) + (2 if cell_decode else 0)
        latent_out = self.imnet.mod_dim + (hidden_dim if mod_input else 0)
        self.hypernet = MLP(latent_in, latent_out, [latent_hidden])

    def latents(self, feat: torch.Tensor, rel_cell: torch.Tensor) -> Latents:
        first, second = self.hypernet.linears
        c = feat.shape[1]
        # Linear on the 3x3-unfolded feature == a 3x3 convolution with the same weights
        # (F.unfold orders channels c * 9 + ky * 3 + kx): same numbers, no 576-wide copy.
        if self.feat_unfold:
            hidden = F.conv2d(feat, first.weight[:, :9 * c].reshape(-1, c, 3, 3), first.bias, padding=1)
        else:
            hidden = F.conv2d(feat, first.weight[:, :c, None, None], first.bias)
        hidden = channels_last_table(hidden)  # the conv's own output: cell term and ReLU go in place
        if self.cell_decode:
            hidden.add_((rel_cell @ first.weight[:, -2:].t())[:, None, None, :])
        latents = {"mod": table_linear(hidden.relu_(), second)}
        if not self.mod_input:
            latents["code"] = channels_last_table(feat)
        return latents

    def decode_points(self, latents: Latents, index: torch.Tensor, rel: torch.Tensor,
                      rel_cell: torch.Tensor) -> torch.Tensor:
        pieces = self.imnet.split(gather(latents["mod"], index))
        code = pieces[-1] if self.mod_input else gather(latents["code"], index)
        parts = [code, rel]
        if self.cell_decode:
            parts.append(rel_cell.unsqueeze(1).expand(*rel.shape))
        return self.imnet(torch.cat(parts, -1), pieces)

    def decode_slots(self, latents: Latents, window: RenderWindow) -> torch.Tensor:
        mod = _latent_rows(latents["mod"], window)
        code = mod[:, self.imnet.mod_dim:] if self.mod_input else _latent_rows(latents["code"], window)
        first = self.imnet.linears[0]
        c = code.shape[-1]
        per_latent = rows_linear(code, first.weight[:, :c], first.bias)
        if self.cell_decode:
            per_latent = per_latent + window.rel_cell @ first.weight[:, c + 2:c + 4].t()
        d, n = self.imnet.hidden_dim, self.imnet.hidden_depth
        # layer 0 is affine in the slot's (rel_y, rel_x), with a bias of each latent's own
        rel = slot_rel_pairs(window, latents["mod"].shape[0], per_latent.dtype)
        x = modulated_layer(rel, first.weight[:, c:c + 2], per_latent, 1 + mod[:, :d], mod[:, n * d:(n + 1) * d])
        out = _folded_layers(self.imnet, x, mod, 1)
        return out.view(*_slot_shape(latents["mod"], window), 3)

    @property
    def capabilities(self) -> Capabilities:
        return _modulated_capabilities(self, "lmliif", kernel=True)

    def stage_macs(self, in_hw: tuple[int, int], out_hw: tuple[int, int]) -> dict[str, float]:
        return ensemble_stages(self, linear_macs(self.hypernet.linears), in_hw, out_hw)

    def modulation_intensity(self, latents: Latents) -> torch.Tensor:
        return _shift_intensity(self.imnet, latents)

    def fused_mlp(self, latents: Latents) -> FusedMLP | None:
        """Layer 0 is affine in (rel_y, rel_x) and the cell: its code part is one GEMM per latent,
        made once per tile; the cell's part is one vector per grid (fused_extra)."""
        mod = latents["mod"][0]
        code = mod[..., self.imnet.mod_dim:] if self.mod_input else latents["code"][0]
        first = self.imnet.linears[0]
        base = F.linear(code, first.weight[:, :code.shape[-1]], first.bias)
        return _fused(self.imnet, AFFINE, mod, base.contiguous(), 0, 1)

    def fused_extra(self, rel_cell: torch.Tensor) -> torch.Tensor:
        """Layer 0's weights of (rel_y, rel_x), then the cell's term, (3, hidden)."""
        first = self.imnet.linears[0]
        c = first.in_features - (4 if self.cell_decode else 2)
        cell = rel_cell[0] @ first.weight[:, c + 2:c + 4].t() if self.cell_decode else first.bias.new_zeros(
            first.out_features)
        return torch.cat([first.weight[:, c:c + 2].t(), cell[None]]).contiguous()


def _slot_shape(table: torch.Tensor, window: RenderWindow) -> tuple[int, ...]:
    if window.pairs is not None:
        return table.shape[0], window.pairs.numel(), 1, window.rows.rel.shape[1], window.cols.rel.shape[1]
    return (table.shape[0], window.rows.n_rows, window.cols.n_rows,
            window.rows.rel.shape[1], window.cols.rel.shape[1])


class LMLTE(ImplicitSR):
    """LM-LTE: LTE's Fourier features feed the latent MLP; the render MLP sees the code's
    own (coef, freq) pair and adds a bilinear upsample of the input."""

    def __init__(self, encoder: nn.Module, hidden_dim: int = 16, hidden_depth: int = 8,
                 latent_hidden: int = 288, lte_dim: int = 128, local_ensemble: bool = True,
                 cell_decode: bool = True, mod_input: bool = True) -> None:
        super().__init__()
        if not cell_decode:
            raise ValueError("LM-LTE needs cell_decode")
        self.encoder = encoder
        self.local_ensemble = local_ensemble
        self.mod_input = mod_input
        self.bilinear_skip = True
        self.coef = nn.Conv2d(encoder.out_dim, lte_dim, 3, padding=1)
        self.freq = nn.Conv2d(encoder.out_dim, lte_dim, 3, padding=1)
        self.phase = nn.Linear(2, lte_dim // 2, bias=False)
        render_in = hidden_dim if mod_input else lte_dim
        self.imnet = ModulatedMLP(render_in, 3, hidden_dim, hidden_depth)
        latent_out = self.imnet.mod_dim + (2 * hidden_dim if mod_input else 0)
        self.hypernet = MLP(lte_dim, latent_out, [latent_hidden])
        if mod_input:
            self.imphase = nn.Linear(2, hidden_dim // 2, bias=False)

    def latents(self, feat: torch.Tensor, rel_cell: torch.Tensor) -> Latents:
        coef = channels_last_table(self.coef(feat))
        freq = channels_last_table(self.freq(feat))
        b, h, w, c = freq.shape
        phase = freq.view(b, h, w, c // 2, 2).sum(-1) + self.phase(rel_cell).view(b, 1, 1, c // 2)
        mod = self.hypernet.on_table(coef * torch.cat([torch.cos(math.pi * phase), torch.sin(math.pi * phase)], -1))
        if self.mod_input:
            return {"mod": mod}
        return {"mod": mod, "coef": coef, "freq": freq}

    def _phase_layer(self) -> nn.Linear:
        return self.imphase if self.mod_input else self.phase

    def decode_points(self, latents: Latents, index: torch.Tensor, rel: torch.Tensor,
                      rel_cell: torch.Tensor) -> torch.Tensor:
        pieces = self.imnet.split(gather(latents["mod"], index))
        if self.mod_input:
            coef, freq = pieces[-2], pieces[-1]
        else:
            coef, freq = gather(latents["coef"], index), gather(latents["freq"], index)
        z = freq[..., 0::2] * rel[..., :1] + freq[..., 1::2] * rel[..., 1:]
        z = z + self._phase_layer()(rel_cell).unsqueeze(1)
        x = coef * torch.cat([torch.cos(math.pi * z), torch.sin(math.pi * z)], -1)
        return self.imnet(x, pieces)

    def decode_slots(self, latents: Latents, window: RenderWindow) -> torch.Tensor:
        mod = _latent_rows(latents["mod"], window)
        if self.mod_input:
            m, d = self.imnet.mod_dim, self.imnet.hidden_dim
            coef, freq = mod[:, m:m + d], mod[:, m + d:m + 2 * d]
        else:
            coef, freq = _latent_rows(latents["coef"], window), _latent_rows(latents["freq"], window)
        # phase of every slot: (freq_y, freq_x) . rel + phase(cell), one batched matmul
        freq_pairs = torch.stack([freq[:, 0::2], freq[:, 1::2]], 1)
        phase = self._phase_layer()(window.rel_cell).expand(freq.shape[0], -1).unsqueeze(1)
        rel = slot_rel_pairs(window, latents["mod"].shape[0], freq.dtype)
        z = torch.baddbmm(phase, rel, freq_pairs).mul_(math.pi)
        x = coef.unsqueeze(1) * torch.cat([torch.cos(z), torch.sin(z)], -1)
        out = _folded_layers(self.imnet, x, mod, 0)
        return out.view(*_slot_shape(latents["mod"], window), 3)

    @property
    def capabilities(self) -> Capabilities:
        # The kernel's Fourier stage is hidden_dim wide: only with mod_input.
        return _modulated_capabilities(self, "lmlte", kernel=self.mod_input)

    def stage_macs(self, in_hw: tuple[int, int], out_hw: tuple[int, int]) -> dict[str, float]:
        latent = conv3x3_macs(self.coef, self.freq) + linear_macs(self.hypernet.linears)
        return ensemble_stages(self, latent, in_hw, out_hw)

    def modulation_intensity(self, latents: Latents) -> torch.Tensor:
        return _shift_intensity(self.imnet, latents)

    def fused_mlp(self, latents: Latents) -> FusedMLP | None:
        """The Fourier input stage reads coef and freq from the latent table. Only with
        mod_input, where the render MLP is hidden_dim wide."""
        if not self.mod_input:
            return None
        return _fused(self.imnet, FOURIER, latents["mod"][0], None, self.imnet.mod_dim, 0)

    def fused_extra(self, rel_cell: torch.Tensor) -> torch.Tensor:
        """The phase of the grid's cell, one vector."""
        return self._phase_layer()(rel_cell[0]).contiguous()


def _modulated_capabilities(model: LMLIIF | LMLTE, family: str, kernel: bool) -> Capabilities:
    return Capabilities(family, encoder_margin(model.encoder), model.encoder.out_dim,
                        model.hypernet.linears[-1].out_features,
                        max(layer.out_features for layer in model.imnet.linears), cmsr=True,
                        kernel_width=model.imnet.hidden_dim if kernel else None, renders_pairs=True,
                        streams_rows=model.encoder.streams_rows, decoder_margin=DECODER_MARGIN,
                        tile_grid=model.encoder.tile_grid)



# Floats of |shift| made at once by _shift_intensity (1 MB): a whole tile's (22 MB at 320 x 180) was a
# fresh allocation whose page faults cost more than the arithmetic (13 ms against 2 in an x8 upscale).
INTENSITY_CHUNK = 1 << 18


def _shift_intensity(imnet: ModulatedMLP, latents: Latents) -> torch.Tensor:
    """CMSR's detail measure: mean |shift modulation| of every latent, (B, h, w), a few rows at a
    time (each latent's mean is its own, so the values do not depend on the rows per chunk)."""
    n, d = imnet.hidden_depth, imnet.hidden_dim
    shifts = latents["mod"][..., n * d:2 * n * d]
    out = shifts.new_empty(shifts.shape[:-1])
    rows = max(1, INTENSITY_CHUNK // (shifts.shape[0] * shifts.shape[2] * shifts.shape[3]))
    for r in range(0, shifts.shape[1], rows):
        torch.mean(shifts[:, r:r + rows].abs(), -1, out=out[:, r:r + rows])
    return out
