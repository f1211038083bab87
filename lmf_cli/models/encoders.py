"""Feature encoders: EDSR-baseline (and smaller EDSR variants) and RDN.

Key names follow the official LIIF/LTE/LMF checkpoints so their state dicts load as-is.
The EDSR mean-shift layers are kept as (unused) buffers-with-weights for the same reason:
the official code never applies them, and neither do we.
"""

from __future__ import annotations

import torch
from torch import nn


def _conv(in_ch: int, out_ch: int, kernel: int = 3) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel, padding=kernel // 2)


class _MeanShift(nn.Conv2d):
    """Present only so official state dicts (sub_mean/add_mean) load strictly."""

    def __init__(self) -> None:
        super().__init__(3, 3, kernel_size=1)
        for p in self.parameters():
            p.requires_grad = False


class _ResBlock(nn.Module):
    def __init__(self, feats: int, res_scale: float) -> None:
        super().__init__()
        self.body = nn.Sequential(_conv(feats, feats), nn.ReLU(inplace=True), _conv(feats, feats))
        self.res_scale = res_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        res = self.body(x)  # a fresh tensor: scaled and summed in place (one pass less each)
        if self.res_scale != 1:
            res.mul_(self.res_scale)
        return res.add_(x)


class EDSR(nn.Module):
    """EDSR without its upsampler: a residual trunk that maps pixels to features."""

    def __init__(self, n_resblocks: int = 16, n_feats: int = 64, res_scale: float = 1.0,
                 n_colors: int = 3) -> None:
        super().__init__()
        self.sub_mean = _MeanShift()
        self.add_mean = _MeanShift()
        self.head = nn.Sequential(_conv(n_colors, n_feats))
        self.body = nn.Sequential(*[_ResBlock(n_feats, res_scale) for _ in range(n_resblocks)],
                                  _conv(n_feats, n_feats))
        self.out_dim = n_feats
        self.receptive_radius = 2 * n_resblocks + 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(x)
        return self.body(x).add_(x)


class _RDBConv(nn.Module):
    def __init__(self, in_ch: int, growth: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(_conv(in_ch, growth), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((x, self.conv(x)), 1)


class _RDB(nn.Module):
    def __init__(self, g0: int, growth: int, n_convs: int) -> None:
        super().__init__()
        self.convs = nn.Sequential(*[_RDBConv(g0 + c * growth, growth) for c in range(n_convs)])
        self.LFF = nn.Conv2d(g0 + n_convs * growth, g0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LFF(self.convs(x)).add_(x)


class RDN(nn.Module):
    """Residual Dense Network (config B: 16 blocks of 8 convs), as in the official checkpoints."""

    def __init__(self, G0: int = 64, D: int = 16, C: int = 8, G: int = 64, n_colors: int = 3) -> None:
        super().__init__()
        self.SFENet1 = _conv(n_colors, G0)
        self.SFENet2 = _conv(G0, G0)
        self.RDBs = nn.ModuleList([_RDB(G0, G, C) for _ in range(D)])
        self.GFF = nn.Sequential(nn.Conv2d(D * G0, G0, 1), _conv(G0, G0))
        self.out_dim = G0
        self.receptive_radius = 2 + D * C + 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f1 = self.SFENet1(x)
        x = self.SFENet2(f1)
        outs = []
        for block in self.RDBs:
            x = block(x)
            outs.append(x)
        return self.GFF(torch.cat(outs, 1)).add_(f1)
