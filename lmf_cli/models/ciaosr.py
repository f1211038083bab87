"""CiaoSR (Cao et al., CVPR 2023) and its LMF version, LM-CiaoSR (He et al., CVPR 2024).

Both read the encoder's features through a cross-scale non-local attention (`CrossScaleAttention`:
each feature attends to 3x3 patches of a 2x-downscaled copy of the map) and a local attention
over a 2x2 ensemble of latents, whose keys and values are re-weighted by small MLPs (`imnet_k`,
`imnet_v`) fed the relative coordinate and cell.

- CiaoSR runs all of that per output pixel, then a 256-wide MLP (`imnet_q`): ~2.9 MMACs a pixel.
- LM-CiaoSR runs it once per LR pixel (query from `prenet_q`, keys and values at fixed offsets),
  turns the attended value into render modulations and a 32-d code (`hypernet_q`), and renders
  with LM-LIIF's modulated 16-wide MLP (no cell input) plus a bilinear skip: ~10 KMACs a pixel.
  The render stage *is* LM-LIIF's, so it shares LM-LIIF's window renderer, kernel and CMSR.

Reach: the official code runs the cross-scale attention over the whole feature map, or, above
48 x 48 features, over 48 x 48 blocks anchored at the top-left (the last block of each axis takes
the remainder) with one feature of context. What a feature sees therefore depends on the whole
map's size and where the blocks fall, and the keys' offsets depend on the map's size too: the
latents are not a local function of the input, and no tile margin makes tiles equal the whole
image. Both models declare that (`tile_grid=None`) and the engine renders them whole.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmf_cli.models.base import (
    Capabilities,
    ImplicitSR,
    Latents,
    RenderWindow,
    channels_last_table,
    encoder_margin,
    gather,
    linear_macs,
    rows_linear,
    unfold3x3,
)
from lmf_cli.models.geometry import bilinear_window_last
from lmf_cli.models.lmf import LMLIIF
from lmf_cli.models.mlp import MLP, ModulatedMLP

CROP = 48  # the official block side of the cross-scale attention on large feature maps
LATENT_ROWS = 1 << 14  # LR pixels per band of the latent stage: bounds its (large) intermediates
# The largest difference of a tiled run from the whole-image run, in 8-bit levels (the attention reads the
# whole feature map, so tiles cannot be exact), measured with the random-weight test checkpoints
# (tests/official; no trained weights of these exist here) on a 100 x 60 input in 48- and 64-pixel tiles at
# x2 and x4: LM-CiaoSR 0.8-1.5 (0.1-0.3% of pixels over half a level), CiaoSR 4.5-9.8 (11-16% over half a level).
LM_CIAOSR_TILE_DIFFERENCE = 1.5
CIAOSR_TILE_DIFFERENCE = 10.0


def _conv_prelu(cin: int, cout: int) -> nn.Sequential:
    """The official `BasicBlock`: a 1x1 convolution and a PReLU (keys `.0` and `.1`)."""
    return nn.Sequential(nn.Conv2d(cin, cout, 1), nn.PReLU())


class CrossScaleAttention(nn.Module):
    """Cross-scale non-local attention (Mei et al. 2020) as CiaoSR uses it: every feature is a
    softmax-weighted sum of 3s x 3s patches of the map, matched through 3 x 3 patches of the map
    downscaled s times; then a strided conv brings the result back to the map's size."""

    def __init__(self, channel: int = 64, scales: tuple[int, ...] = (2,), ksize: int = 3,
                 softmax_scale: float = 10.0, reduction: int = 2) -> None:
        super().__init__()
        self.scales = tuple(scales)
        self.ksize = ksize
        self.softmax_scale = softmax_scale
        self.register_buffer("escape_NaN", torch.tensor([1e-4]))
        self.conv_match_1 = _conv_prelu(channel, channel // reduction)
        self.conv_match_2 = _conv_prelu(channel, channel // reduction)
        self.conv_assembly = _conv_prelu(channel, channel)
        if 3 in self.scales:
            self.downx3 = nn.Conv2d(channel, channel, ksize, 3, 1)
        if 4 in self.scales:
            self.downx4 = nn.Conv2d(channel, channel, ksize, 4, 1)
        self.down = nn.Conv2d(channel, channel, ksize, 2, 1)

    def _down(self, s: int) -> nn.Conv2d:
        """The strided conv of scale s (the official names: `down` for 2, `downx3`, `downx4`, made for
        the scales this attention has)."""
        if s == 2:
            return self.down
        return self.downx3 if s == 3 else self.downx4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        outs = []
        for s in self.scales:
            pad = (0, -w % s, 0, -h % s)
            mode = "reflect" if pad[1] < w and pad[3] < h else "replicate"  # a 1-pixel side has nothing to reflect
            xp = F.pad(x, pad, mode) if any(pad) else x
            hp, wp = xp.shape[-2:]
            k = s * self.ksize
            embed = self.conv_assembly(xp)
            raw = F.unfold(F.pad(embed, (s, s, s, s)), k, stride=s)  # 'same' padding of the official code
            raw = raw.view(x.shape[0], embed.shape[1], k, k, -1).permute(0, 4, 1, 2, 3)
            match = F.pad(self.conv_match_1(xp), (1, 1, 1, 1))
            ref = self.conv_match_2(F.interpolate(xp, scale_factor=1.0 / s, mode="bilinear"))
            kernels = F.unfold(F.pad(ref, (1, 1, 1, 1)), self.ksize)
            kernels = kernels.view(x.shape[0], ref.shape[1], self.ksize, self.ksize, -1).permute(0, 4, 1, 2, 3)
            per_image = []
            for b in range(x.shape[0]):  # each image matches against its own patches
                kb = kernels[b]
                norm = torch.maximum(kb.pow(2).sum((1, 2, 3), keepdim=True).sqrt(), self.escape_NaN)
                score = F.conv2d(match[b:b + 1], kb / norm)
                score = F.softmax(score * self.softmax_scale, dim=1)
                y = F.conv_transpose2d(score, raw[b], stride=s, padding=s)
                per_image.append(self._down(s)(y) / 6.0)
            outs.append(torch.cat(per_image)[:, :, :h, :w])
        return torch.cat(outs, 1)

    def macs(self, h: int, w: int) -> float:
        """Multiply-accumulates on an h x w map (one block of the official scheme)."""
        c = self.conv_assembly[0].out_channels
        m = self.conv_match_1[0].out_channels
        total = 0.0
        for s in self.scales:
            hp, wp = h + (-h % s), w + (-w % s)
            refs = (hp // s) * (wp // s)
            total += hp * wp * (c * c + c * m) + refs * c * m  # 1x1 convs
            total += hp * wp * refs * m * self.ksize ** 2  # matching
            total += hp * wp * refs * c * (s * self.ksize) ** 2  # assembling the patches
            total += hp * wp * c * c * self.ksize ** 2  # strided conv back
        return total


def non_local_features(attention: CrossScaleAttention, feat: torch.Tensor) -> torch.Tensor:
    """The cross-scale attention of a whole feature map, in the official code's 48 x 48 blocks
    (one feature of context each side where the map has it) when the map is larger than one
    block. The official code leaves the features at zero when one side is under 48 but the area
    is over 48 x 48; here such a side is one block."""
    h, w = feat.shape[-2:]
    if h * w <= CROP * CROP:
        return attention(feat)
    out = feat.new_zeros(feat.shape[0], feat.shape[1] * len(attention.scales), h, w)
    ni, nj = max(1, h // CROP), max(1, w // CROP)
    for i in range(ni):
        i1, i2 = i * CROP, (i + 1) * CROP if i < ni - 1 else h
        pi1, pi2 = int(i1 > 0), int(i2 < h)
        for j in range(nj):
            j1, j2 = j * CROP, (j + 1) * CROP if j < nj - 1 else w
            pj1, pj2 = int(j1 > 0), int(j2 < w)
            block = attention(feat[:, :, i1 - pi1:i2 + pi2, j1 - pj1:j2 + pj2])
            out[:, :, i1:i2, j1:j2] = block[:, :, pi1:block.shape[2] - pi2, pj1:block.shape[3] - pj2]
    return out


def non_local_macs(attention: CrossScaleAttention, h: int, w: int) -> float:
    if h * w <= CROP * CROP:
        return attention.macs(h, w)
    ni, nj = max(1, h // CROP), max(1, w // CROP)
    rows = [CROP] * (ni - 1) + [h - CROP * (ni - 1)]
    cols = [CROP] * (nj - 1) + [w - CROP * (nj - 1)]
    return sum(attention.macs(r + 2, c + 2) for r in rows for c in cols)


def _centres(n: int, device: torch.device) -> torch.Tensor:
    """Pixel centres as the official float32 `make_coord` computes them (CiaoSR's nearest lookups
    break ties on them), in float32 on `device` (no float64: MPS has none)."""
    r = 1.0 / n
    return -1 + r + (2 * r) * torch.arange(n, device=device).float()


def _ensemble_offsets(local_size: int) -> list[tuple[int, int]]:
    """(vx, vy) of the official `v_lst`: vx moves along height, vy along width."""
    if local_size == 1:
        return [(0, 0)]
    return [(i, j) for i in (-1, 1) for j in (-1, 1)]


def _rel_cell_term(layer: nn.Linear, start: int, rel: torch.Tensor, rel_cell: torch.Tensor) -> torch.Tensor:
    """The (rel, cell) inputs' share of a first layer whose inputs end with them, plus its bias."""
    weight = layer.weight[:, start:start + 4]
    return layer.bias + rel @ weight[:, :2].t() + rel_cell @ weight[:, 2:].t()


def _rest(mlp: MLP, hidden: torch.Tensor) -> torch.Tensor:
    """The layers after the first, on its pre-activation `hidden`."""
    for layer in mlp.linears[1:]:
        hidden = rows_linear(hidden.relu(), layer.weight, layer.bias)
    return hidden


class LMCiaoSR(LMLIIF):
    """LM-CiaoSR. Module names follow the official checkpoints (`prenet_q`, `hypernet_q`,
    `imnet_q/k/v`, `cs_attn`); the render stage is LM-LIIF's with `mod_input` (the code is two
    render widths wide) and no cell, plus the bilinear skip."""

    def __init__(self, encoder: nn.Module, hidden_dim: int = 16, hidden_depth: int = 8,
                 prenet_hidden: list[int] | None = None, hypernet_hidden: list[int] | None = None,
                 key_hidden: list[int] | None = None, value_hidden: list[int] | None = None,
                 local_size: int = 2, non_local_attn: bool = True, multi_scale: tuple[int, ...] = (2,),
                 softmax_scale: float = 1.0, mod_input: bool = True) -> None:
        ImplicitSR.__init__(self)  # LM-LIIF's modules have other names here: only its methods are shared
        c = encoder.out_dim
        self.encoder = encoder
        self.local_ensemble = local_size == 2
        self.local_size = local_size
        self.feat_unfold = True
        self.cell_decode = False
        self.mod_input = mod_input
        self.bilinear_skip = True
        self.non_local_attn = non_local_attn
        self.softmax_scale = softmax_scale
        non_local = c * len(multi_scale) if non_local_attn else 0
        if non_local_attn:
            self.cs_attn = CrossScaleAttention(c, tuple(multi_scale))
        self.imnet_k = MLP(4 * c + 4, 4 * c, key_hidden or [256])
        self.imnet_v = MLP(4 * c + non_local + 4, 4 * c + non_local, value_hidden or [256])
        render = ModulatedMLP(2 * hidden_dim + 2 if mod_input else 4 * c + non_local + 2, 3, hidden_dim, hidden_depth)
        self.hypernet_q = MLP(4 * c + non_local, render.mod_dim + (2 * hidden_dim if mod_input else 0),
                              hypernet_hidden or [288])
        self.prenet_q = MLP(9 * c, 4 * c, prenet_hidden or [256])
        self.imnet_q = render
        # Channels of the 3x3-unfolded feature that the official code reads as each neighbour's
        # 2x2 key: it views the (C x 9) unfold as (3, 3, C) and takes [t:t+2, l:l+2].
        picks = []
        for vx, vy in _ensemble_offsets(local_size):
            top, left = round(vy / 2 + 0.5), round(vx / 2 + 0.5)
            picks.append([(a * 3 + b) * c + k for a in (top, top + 1) for b in (left, left + 1)
                          for k in range(c)])
        self.register_buffer("key_channels", torch.tensor(picks), persistent=False)

    @property
    def imnet(self) -> ModulatedMLP:
        return self.imnet_q

    @property
    def hypernet(self) -> MLP:
        return self.hypernet_q

    def latents(self, feat: torch.Tensor, rel_cell: torch.Tensor) -> Latents:
        """Keys and values of the 2x2 ensemble at their fixed offsets, the attention from the
        query, and the modulations and code from the attended value: once per LR pixel."""
        b, c, h, w = feat.shape
        rich = channels_last_table(unfold3x3(feat))
        extra = channels_last_table(non_local_features(self.cs_attn, feat)) if self.non_local_attn else None
        # The official relative coordinate of neighbour v: (-vx / h, -vy / w), the same for every pixel.
        rels = [feat.new_tensor([-vx / h, -vy / w]).expand(b, 2) for vx, vy in _ensemble_offsets(self.local_size)]
        rows = max(1, LATENT_ROWS // w)
        bands = [self._latent_band(rich[:, r:r + rows], None if extra is None else extra[:, r:r + rows],
                                   rels, rel_cell) for r in range(0, h, rows)]
        mod = torch.cat([band[0] for band in bands], 1)
        if self.mod_input:
            return {"mod": mod}
        return {"mod": mod, "code": torch.cat([band[1] for band in bands], 1)}

    def _latent_band(self, rich: torch.Tensor, extra: torch.Tensor | None, rels: list[torch.Tensor],
                     rel_cell: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b = rich.shape[0]
        k_first, v_first = self.imnet_k.linears[0], self.imnet_v.linears[0]
        logits, values = [], []
        query = self.prenet_q(rich)
        for picks, rel in zip(self.key_channels, rels, strict=True):
            key = rich.index_select(-1, picks)
            value = key if extra is None else torch.cat([key, extra], -1)
            term_k = _rel_cell_term(k_first, key.shape[-1], rel, rel_cell).view(b, 1, 1, -1)
            term_v = _rel_cell_term(v_first, value.shape[-1], rel, rel_cell).view(b, 1, 1, -1)
            weight_k = _rest(self.imnet_k, rows_linear(key, k_first.weight[:, :key.shape[-1]]) + term_k)
            weight_v = _rest(self.imnet_v, rows_linear(value, v_first.weight[:, :value.shape[-1]]) + term_v)
            logits.append((query * key * weight_k).sum(-1))
            values.append(value * weight_v)
        attn = (torch.stack(logits, -1) / self.softmax_scale).softmax(-1)
        attended = sum(a.unsqueeze(-1) * v for a, v in zip(attn.unbind(-1), values, strict=True))
        return self.hypernet_q(attended), attended

    def decode_points(self, latents: Latents, index: torch.Tensor, rel: torch.Tensor,
                      rel_cell: torch.Tensor) -> torch.Tensor:
        mod = gather(latents["mod"], index)
        m = self.imnet.mod_dim
        code = mod[..., m:] if self.mod_input else gather(latents["code"], index)
        return self.imnet(torch.cat([code, rel], -1), self.imnet.split(mod[..., :m]))

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities("lmciaosr", encoder_margin(self.encoder), self.encoder.out_dim,
                            self.hypernet_q.linears[-1].out_features,
                            max(layer.out_features for layer in self.imnet_q.linears), cmsr=True,
                            kernel_width=self.imnet_q.hidden_dim, renders_pairs=True, tile_grid=None,
                            tile_difference=LM_CIAOSR_TILE_DIFFERENCE)

    def stage_macs(self, in_hw: tuple[int, int], out_hw: tuple[int, int]) -> dict[str, float]:
        pixels = in_hw[0] * in_hw[1]
        neighbours = len(self.key_channels)
        per_pixel = (linear_macs(self.prenet_q.linears) + linear_macs(self.hypernet_q.linears)
                     + neighbours * (linear_macs(self.imnet_k.linears) + linear_macs(self.imnet_v.linears)))
        attention = non_local_macs(self.cs_attn, *in_hw) if self.non_local_attn else 0.0
        return {"latent": per_pixel * pixels + attention,
                "render": neighbours * linear_macs(self.imnet_q.linears) * out_hw[0] * out_hw[1]}


class CiaoSR(ImplicitSR):
    """CiaoSR: the local attention runs per output pixel. `render` and `query` share one
    per-point formula (`_predict`); the first layers of `imnet_k` and `imnet_v` apply their
    feature part once per latent (it does not depend on the query), which is exact."""

    def __init__(self, encoder: nn.Module, q_hidden: list[int] | None = None, k_hidden: list[int] | None = None,
                 v_hidden: list[int] | None = None, local_size: int = 2, non_local_attn: bool = True,
                 multi_scale: tuple[int, ...] = (2,), softmax_scale: float = 1.0) -> None:
        super().__init__()
        c = encoder.out_dim
        self.encoder = encoder
        self.local_size = local_size
        self.local_ensemble = local_size == 2
        self.bilinear_skip = True
        self.non_local_attn = non_local_attn
        self.softmax_scale = softmax_scale
        non_local = c * len(multi_scale) if non_local_attn else 0
        self.imnet_q = MLP(9 * c + non_local, 3, q_hidden or [256] * 4)
        self.imnet_k = MLP(9 * c + 4, 9 * c, k_hidden or [256])
        self.imnet_v = MLP(9 * c + non_local + 4, 9 * c + non_local, v_hidden or [256])
        if non_local_attn:
            self.cs_attn = CrossScaleAttention(c, tuple(multi_scale))

    def latents(self, feat: torch.Tensor, rel_cell: torch.Tensor) -> Latents:
        """The unfolded feature (query and key) with the non-local feature (value), and the
        feature parts of the key and value MLPs' first layers."""
        value = unfold3x3(feat)
        if self.non_local_attn:
            value = torch.cat([value, non_local_features(self.cs_attn, feat)], 1)
        value = channels_last_table(value)
        k_first, v_first = self.imnet_k.linears[0], self.imnet_v.linears[0]
        n_key = 9 * feat.shape[1]
        return {"value": value, "key_hidden": rows_linear(value[..., :n_key], k_first.weight[:, :n_key]),
                "value_hidden": rows_linear(value, v_first.weight[:, :value.shape[-1]])}

    def _predict(self, latents: Latents, own: torch.Tensor, found: list[tuple[torch.Tensor, torch.Tensor]],
                 rel_cell: torch.Tensor) -> torch.Tensor:
        """RGB (B, Q, 3) before the skip: `own` (B, Q) the latent holding each point (query), `found`
        the neighbours' flat latent indices (B, Q) and relative coordinates (B, Q, 2)."""
        table = latents["value"]
        n_key = self.imnet_k.linears[-1].out_features
        query = gather(table, own)[..., :n_key]
        cell = rel_cell.unsqueeze(1)
        k_first, v_first = self.imnet_k.linears[0], self.imnet_v.linears[0]
        logits, values = [], []
        for index, rel in found:
            value = gather(table, index)
            key = value[..., :n_key]
            weight_k = _rest(self.imnet_k, gather(latents["key_hidden"], index)
                             + _rel_cell_term(k_first, n_key, rel, cell))
            weight_v = _rest(self.imnet_v, gather(latents["value_hidden"], index)
                             + _rel_cell_term(v_first, value.shape[-1], rel, cell))
            logits.append((query * key * weight_k).sum(-1))
            values.append(value * weight_v)
        attn = (torch.stack(logits, -1) / self.softmax_scale).softmax(-1)
        attended = sum(a.unsqueeze(-1) * v for a, v in zip(attn.unbind(-1), values, strict=True))
        return self.imnet_q(attended)

    def _axis(self, coord: torch.Tensor, n: int, cell: torch.Tensor) -> tuple[torch.Tensor, list[tuple]]:
        """Along one axis, in the official float32 arithmetic: the latent holding each coordinate
        (nearest, as grid_sample) and each neighbour's latent and relative coordinate. The
        neighbours sit (1 - cell) / (n - 1) away, CiaoSR's own offset (not half a latent)."""
        def nearest(c: torch.Tensor) -> torch.Tensor:
            return torch.round(((c + 1) * n - 1) / 2).long().clamp_(0, n - 1)

        centres = _centres(n, coord.device)
        step = 1 / ((n - 1) / (1 - cell)) if n > 1 else torch.zeros_like(cell)
        found = []
        for v in ((-1, 1) if self.local_size == 2 else (0,)):
            shifted = (coord + (v * step + 1e-6)).clamp(-1 + 1e-6, 1 - 1e-6) if v else coord
            index = nearest(shifted)
            found.append((index, (coord - centres[index]) * n))
        return nearest(coord), found

    def _points(self, latents: Latents, coord: torch.Tensor, in_hw: tuple[int, int], rel_cell: torch.Tensor,
                origin: tuple[int, int] = (0, 0)) -> torch.Tensor:
        """(B, Q, 3) at official float32 coordinates (B, Q, 2) of an in_hw image whose latent
        table starts at LR pixel `origin`."""
        (h, w), (r0, c0) = in_hw, origin
        width = latents["value"].shape[2]
        cell = rel_cell / rel_cell.new_tensor([h, w])
        own_y, ys = self._axis(coord[..., 0], h, cell[:, None, 0])
        own_x, xs = self._axis(coord[..., 1], w, cell[:, None, 1])
        found = [((iy - r0) * width + (ix - c0), torch.stack([ry, rx], -1))
                 for iy, ry in ys for ix, rx in xs]
        return self._predict(latents, (own_y - r0) * width + (own_x - c0), found, rel_cell)

    def query(self, inp: torch.Tensor, latents: Latents, coord: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:
        h, w = inp.shape[-2:]
        out = self._points(latents, coord.float(), (h, w), cell[:, 0] * cell.new_tensor([h, w]))
        return self.add_skip_at_points(inp, coord, out)

    def render(self, inp: torch.Tensor, latents: Latents, window: RenderWindow) -> torch.Tensor:
        """The window's pixels on the global grid (its axes' spans), point by point."""
        (n_out_r, h, i0, i1, r0), (n_out_c, w, j0, j1, c0) = window.rows.span, window.cols.span
        ys, xs = _centres(n_out_r, inp.device)[i0:i1], _centres(n_out_c, inp.device)[j0:j1]
        coord = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), -1).view(1, -1, 2).expand(inp.shape[0], -1, 2)
        out = self._points(latents, coord, (h, w), window.rel_cell, (r0, c0))
        out = out.transpose(1, 2).reshape(inp.shape[0], 3, i1 - i0, j1 - j0)
        return out + bilinear_window_last(inp, window.bilinear_rows, window.bilinear_cols).permute(0, 3, 1, 2)

    @property
    def capabilities(self) -> Capabilities:
        widest = max(layer.out_features for mlp in (self.imnet_k, self.imnet_v, self.imnet_q) for layer in mlp.linears)
        return Capabilities("ciaosr", encoder_margin(self.encoder), self.encoder.out_dim,
                            self.imnet_v.linears[-1].out_features + 2 * self.imnet_k.linears[0].out_features,
                            widest, tile_grid=None, tile_difference=CIAOSR_TILE_DIFFERENCE)

    def stage_macs(self, in_hw: tuple[int, int], out_hw: tuple[int, int]) -> dict[str, float]:
        """The architecture's MACs: per output pixel the query MLP and, per neighbour, the key
        and value MLPs whole (as the paper counts them; `latents` hoists their feature part)."""
        neighbours = 4 if self.local_size == 2 else 1
        per_pixel = linear_macs(self.imnet_q.linears) + neighbours * (
            linear_macs(self.imnet_k.linears) + linear_macs(self.imnet_v.linears))
        attention = non_local_macs(self.cs_attn, *in_hw) if self.non_local_attn else 0.0
        return {"latent": attention, "render": per_pixel * out_hw[0] * out_hw[1]}

