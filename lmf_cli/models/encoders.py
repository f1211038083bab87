"""Feature encoders: EDSR-baseline (and smaller EDSR variants) and RDN.

Key names follow the official LIIF/LTE/LMF checkpoints so their state dicts load as-is.
The EDSR mean-shift layers are kept as (unused) buffers-with-weights for the same reason:
the official code never applies them, and neither do we.
"""

from __future__ import annotations

import torch
from torch import nn

from lmf_cli.models.rows import RowConv, RowQueue, RowStream, Scratch


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

    streams_rows = True
    tile_grid = 1  # convolutions: tiles exact at any offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(x)
        return self.body(x).add_(x)

    def rows(self, height: int) -> RowStream:
        """This forward over row bands of an image `height` rows tall (models/rows.py)."""
        return _EDSRRows(self, height)


class _EDSRRows(RowStream):
    def __init__(self, net: EDSR, height: int) -> None:
        scratch = Scratch()
        self.head = RowConv(net.head[0], height, scratch)
        self.blocks = [(RowConv(block.body[0], height, scratch), RowConv(block.body[2], height, scratch), RowQueue(),
                        block.res_scale) for block in net.body[:-1]]
        self.tail = RowConv(net.body[-1], height, scratch)
        self.skip = RowQueue()

    def push(self, rows: torch.Tensor) -> torch.Tensor:
        x = self.head.push(rows)
        self.skip.put(x)
        for first, second, skip, res_scale in self.blocks:
            skip.put(x)
            res = second.push(first.push(x).relu_())
            if res_scale != 1:
                res.mul_(res_scale)
            x = skip.add_to(res)
        out = self.tail.push(x)
        return self.skip.add_to(out)


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

    streams_rows = True
    tile_grid = 1  # convolutions: tiles exact at any offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f1 = self.SFENet1(x)
        x = self.SFENet2(f1)
        outs = []
        for block in self.RDBs:
            x = block(x)
            outs.append(x)
        return self.GFF(torch.cat(outs, 1)).add_(f1)

    def rows(self, height: int) -> RowStream:
        """This forward over row bands of an image `height` rows tall (models/rows.py)."""
        return _RDNRows(self, height)


class _RDNRows(RowStream):
    """Each dense layer's input waits in a queue for its convolution; the global fusion waits
    for the deepest block (each block lags the one before by its C rows)."""

    def __init__(self, net: RDN, height: int) -> None:
        scratch = Scratch()
        self.first = RowConv(net.SFENet1, height, scratch)
        self.second = RowConv(net.SFENet2, height, scratch)
        self.blocks = [([(RowConv(layer.conv[0], height, scratch), RowQueue()) for layer in block.convs],
                        RowConv(block.LFF, height, scratch), RowQueue()) for block in net.RDBs]
        self.outs = [RowQueue() for _ in net.RDBs]
        self.fuse, self.spread = RowConv(net.GFF[0], height, scratch), RowConv(net.GFF[1], height, scratch)
        self.skip = RowQueue()

    def push(self, rows: torch.Tensor) -> torch.Tensor:
        f1 = self.first.push(rows)
        self.skip.put(f1)
        x = self.second.push(f1)
        for (dense, lff, skip), out in zip(self.blocks, self.outs, strict=True):
            skip.put(x)
            for conv, inputs in dense:
                inputs.put(x)
                grown = conv.push(x).relu_()
                x = torch.cat((inputs.take(grown.shape[2]), grown), 1)
            x = skip.add_to(lff.push(x))
            out.put(x)
        n = min(len(out) for out in self.outs)
        fused = self.spread.push(self.fuse.push(torch.cat([out.take(n) for out in self.outs], 1)))
        return self.skip.add_to(fused)
