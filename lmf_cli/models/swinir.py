"""The SwinIR encoder (Liang et al. 2021) as LMF's configs use it: no upsampler, 64 output channels.

Key names follow the official checkpoints (`conv_first`, `patch_embed.norm`, `layers.{i}.residual_group.
blocks.{j}`, `conv_after_body`, `conv_before_upsample.0`), buffers included, so their state dicts
load as they are.

Attention runs in windows on a grid anchored at the input's top-left pixel; every other block
shifts the grid by half a window (cyclic roll, the wrapped regions masked off). The input is
reflect-padded to whole windows, as the official forward does, and the features are cut back to
the input's size, so each feature is aligned with its pixel (the official forward returns the
padded map, which its decoders then stretch over the image: both agree when the sides are whole
windows). A feature sees at most `window - 1` pixels further per block, so the reach is finite;
tiles equal the whole image when they start on the window grid and their margin covers the reach.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from lmf_cli.models.base import DECODER_MARGIN


def _window_partition(x: torch.Tensor, ws: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * nW, ws * ws, C), windows in row-major order."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, ws * ws, c)


def _window_reverse(windows: torch.Tensor, ws: int, h: int, w: int) -> torch.Tensor:
    c = windows.shape[-1]
    x = windows.reshape(-1, h // ws, w // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h, w, c)


def _relative_position_index(ws: int) -> torch.Tensor:
    coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (ws - 1)
    return rel[..., 0] * (2 * ws - 1) + rel[..., 1]


@functools.lru_cache(maxsize=32)
def shift_mask(h: int, w: int, ws: int, shift: int) -> torch.Tensor:
    """(nW, ws*ws, ws*ws) additive mask of the shifted windows: -100 between pixels that the
    cyclic roll brought together from different regions (the official value)."""
    img = torch.zeros(1, h, w, 1)
    cuts = (slice(0, -ws), slice(-ws, -shift), slice(-shift, None))
    label = 0
    for rows in cuts:
        for cols in cuts:
            img[:, rows, cols, :] = label
            label += 1
    windows = _window_partition(img, ws).squeeze(-1)
    diff = windows.unsqueeze(1) - windows.unsqueeze(2)
    return torch.zeros_like(diff).masked_fill_(diff != 0, -100.0)


class _WindowAttention(nn.Module):
    def __init__(self, dim: int, ws: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * ws - 1) ** 2, heads))
        self.register_buffer("relative_position_index", _relative_position_index(ws))
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        bw, n, c = x.shape
        q, k, v = self.qkv(x).reshape(bw, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        attn = attn + bias.permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            nw = mask.shape[0]
            attn = attn.view(bw // nw, nw, self.heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.heads, n, n)
        return self.proj((attn.softmax(-1) @ v).transpose(1, 2).reshape(bw, n, c))


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _SwinBlock(nn.Module):
    def __init__(self, dim: int, train_size: int, heads: int, ws: int, shift: int, mlp_ratio: float) -> None:
        super().__init__()
        if train_size <= ws:  # the official rule, decided on the training patch size
            ws, shift = train_size, 0
        self.ws, self.shift = ws, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _WindowAttention(dim, ws, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = _Mlp(dim, int(dim * mlp_ratio))
        if shift:  # stored in official checkpoints for the training size; recomputed per input size
            self.register_buffer("attn_mask", shift_mask(train_size, train_size, ws, shift).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, H, W, C) on whole windows."""
        b, h, w, c = x.shape
        y = self.norm1(x)
        if self.shift:
            y = torch.roll(y, (-self.shift, -self.shift), (1, 2))
        mask = shift_mask(h, w, self.ws, self.shift).to(x.device, x.dtype) if self.shift else None
        y = _window_reverse(self.attn(_window_partition(y, self.ws), mask), self.ws, h, w)
        if self.shift:
            y = torch.roll(y, (self.shift, self.shift), (1, 2))
        x = x + y
        return x + self.mlp(self.norm2(x))


class _ResidualGroup(nn.Module):
    def __init__(self, blocks: list[_SwinBlock]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)


class _RSTB(nn.Module):
    """Residual Swin Transformer Block: Swin blocks, a 3x3 conv, and the skip."""

    def __init__(self, dim: int, depth: int, heads: int, ws: int, train_size: int, mlp_ratio: float) -> None:
        super().__init__()
        self.residual_group = _ResidualGroup([_SwinBlock(dim, train_size, heads, ws, 0 if i % 2 == 0 else ws // 2,
                                                         mlp_ratio) for i in range(depth)])
        self.conv = nn.Conv2d(dim, dim, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        for block in self.residual_group.blocks:
            y = block(y)
        return self.conv(y.permute(0, 3, 1, 2)).permute(0, 2, 3, 1) + x


class _PatchEmbed(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)


class SwinIR(nn.Module):
    """SwinIR without its upsampler (LMF's `swinir` encoder): 64 feature channels."""

    streams_rows = False  # attention windows: no row-band streaming (the engine tiles it with margins)

    def __init__(self, img_size: int = 48, embed_dim: int = 180, depths: tuple[int, ...] = (6,) * 6,
                 num_heads: tuple[int, ...] = (6,) * 6, window_size: int = 8, mlp_ratio: float = 2.0,
                 out_dim: int = 64, n_colors: int = 3) -> None:
        super().__init__()
        self.window_size = window_size
        self.conv_first = nn.Conv2d(n_colors, embed_dim, 3, padding=1)
        self.patch_embed = _PatchEmbed(embed_dim)
        self.layers = nn.ModuleList([_RSTB(embed_dim, d, h, window_size, img_size, mlp_ratio)
                                     for d, h in zip(depths, num_heads, strict=True)])
        self.norm = nn.LayerNorm(embed_dim)
        self.conv_after_body = nn.Conv2d(embed_dim, embed_dim, 3, padding=1)
        self.conv_before_upsample = nn.Sequential(nn.Conv2d(embed_dim, out_dim, 3, padding=1), nn.LeakyReLU())
        self.out_dim = out_dim
        self.tile_grid = window_size
        reach = sum(depths) * (window_size - 1) + len(depths) + 3  # windows, the RSTB convs, 3 more convs
        # Rounded up so that a decoder's margin (radius + its 3x3 stage) is whole windows: tiles
        # whose cores start on the window grid then also encode from the grid.
        self.receptive_radius = -(-(reach + DECODER_MARGIN) // window_size) * window_size - DECODER_MARGIN

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        ws = self.window_size
        pad_h, pad_w = -h % ws, -w % ws
        if pad_h or pad_w:  # reflect as the official check_image_size; inputs under a window repeat their edge
            mode = "reflect" if pad_h < h and pad_w < w else "replicate"
            x = F.pad(x, (0, pad_w, 0, pad_h), mode)
        x = self.conv_first(x)
        y = self.patch_embed.norm(x.permute(0, 2, 3, 1))
        for layer in self.layers:
            y = layer(y)
        y = self.norm(y).permute(0, 3, 1, 2)
        x = self.conv_after_body(y) + x
        return self.conv_before_upsample(x)[:, :, :h, :w]
