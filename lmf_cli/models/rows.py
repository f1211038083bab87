"""Running a convolution stack over an image in row bands, each layer exactly once per row.

A tile must be encoded with a margin of the encoder's receptive field (37 input pixels a side
for EDSR-baseline), so cutting a large image into tiles computes every margin twice. Streaming
computes the same feature map layer by layer down the image instead: each layer keeps the few
input rows its kernel still needs from the previous band and emits the output rows it can
finish, so no row is computed twice and memory grows with the image's width, not its area.

Every output row is made by the same convolution over the same input values as in a
whole-image run, with the zero rows of the image's top and bottom padding written out, so
streamed features equal whole-image features (bit for bit on the CPU kernels measured).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RowQueue:
    """Rows that arrived but are not yet used: aligns a skip connection with a branch that
    lags it (a residual's input waits for the convolutions of its body). Rows stay in the
    pieces they came in; nothing is copied to join them unless a caller needs one tensor."""

    def __init__(self) -> None:
        self.pieces: list[torch.Tensor] = []
        self.empty: torch.Tensor | None = None  # no rows, the right channels and width

    def put(self, rows: torch.Tensor) -> None:
        if self.empty is None:  # its own, not a view: a view would keep a whole chunk alive
            self.empty = rows.new_empty(rows.shape[0], rows.shape[1], 0, rows.shape[3])
        if rows.shape[2]:
            self.pieces.append(rows)

    def __len__(self) -> int:
        return sum(piece.shape[2] for piece in self.pieces)

    def _take_pieces(self, n: int) -> list[torch.Tensor]:
        out = []
        while n:
            piece = self.pieces[0]
            k = min(n, piece.shape[2])
            out.append(piece[:, :, :k])
            if k == piece.shape[2]:
                self.pieces.pop(0)
            else:  # a copy of the few rows left: a view would keep the whole chunk alive
                self.pieces[0] = piece[:, :, k:].clone()
            n -= k
        return out

    def take(self, n: int) -> torch.Tensor:
        """The next n rows as one tensor."""
        pieces = self._take_pieces(n)
        if not pieces:
            assert self.empty is not None
            return self.empty
        return pieces[0] if len(pieces) == 1 else cat_rows(pieces)

    def add_to(self, target: torch.Tensor) -> torch.Tensor:
        """target += the next target-height rows, in place and piece by piece (a residual sum)."""
        row = 0
        for piece in self._take_pieces(target.shape[2]):
            target[:, :, row:row + piece.shape[2]].add_(piece)
            row += piece.shape[2]
        return target


class Scratch:
    """One reused buffer for the input windows of a stream's convolutions, which run one at a
    time. A fresh window per layer and chunk would be a fresh large allocation each time, and
    its page faults cost a tenth of the convolution (measured on an AMD EPYC, one thread)."""

    def __init__(self) -> None:
        self.flat: torch.Tensor | None = None

    def rows(self, like: torch.Tensor, n: int) -> torch.Tensor:
        """An uninitialised (B, C, n, W) tensor in `like`'s layout, valid until the next call."""
        b, c, _, w = like.shape
        size = b * c * n * w
        if self.flat is None or self.flat.numel() < size or self.flat.dtype != like.dtype \
                or self.flat.device != like.device:
            self.flat = like.new_empty(size)
        if _nhwc(like):
            return self.flat[:size].view(b, n, w, c).permute(0, 3, 1, 2)
        return self.flat[:size].view(b, c, n, w)


class RowConv:
    """A k x k convolution (padding k // 2) over rows pushed in order, top to bottom."""

    def __init__(self, conv: nn.Conv2d, height: int, scratch: Scratch) -> None:
        self.conv, self.height, self.scratch = conv, height, scratch
        self.pad = conv.kernel_size[0] // 2
        self.carry: torch.Tensor | None = None  # input rows [first, received - len(new rows)) still needed
        self.first = self.received = self.done = 0

    def push(self, rows: torch.Tensor) -> torch.Tensor:
        """Take the next input rows; return every output row they complete (maybe none)."""
        carried = 0 if self.carry is None else self.carry.shape[2]
        self.received += rows.shape[2]
        p = self.pad
        end = self.height if self.received == self.height else max(self.done, self.received - p)
        if end == self.done:
            self.carry = rows.clone() if not carried else cat_rows([self.carry, rows])
            return rows.new_empty(rows.shape[0], self.conv.out_channels, 0, rows.shape[3])
        # output rows [done, end) read input rows [done - p, end + p), zeros outside the image
        top, bottom = max(0, p - self.done), max(0, end + p - self.height)
        used = end + p - bottom - self.first  # of the carried rows and then the new ones
        if not (carried or top or bottom):
            source = rows[:, :, :used]
        else:
            source = self.scratch.rows(rows, top + used + bottom)
            source[:, :, :top].zero_()
            if carried:
                source[:, :, top:top + carried].copy_(self.carry)
            source[:, :, top + carried:top + used].copy_(rows[:, :, :used - carried])
            source[:, :, top + used:].zero_()
        out = F.conv2d(source, self.conv.weight, self.conv.bias, padding=(0, p))
        keep_from = max(0, end - p)
        skip = keep_from - self.first
        if skip >= carried:  # a copy of the few rows kept: a view would keep the whole chunk alive
            self.carry = rows[:, :, skip - carried:].clone()
        else:  # chunks shorter than the kernel: the kept rows span the old carry and the new rows
            self.carry = cat_rows([self.carry[:, :, skip:], rows])
        self.first, self.done = keep_from, end
        return out


def _nhwc(t: torch.Tensor) -> bool:
    """Channels-last in memory (the layout oneDNN is given on CPUs)."""
    return t.stride(1) == 1 and t.shape[1] > 1


def cat_rows(parts: list[torch.Tensor]) -> torch.Tensor:
    """Rows joined top to bottom into a new contiguous tensor in the first part's layout (one
    part: a contiguous copy). Channels-last rows are whole runs of memory, joined as such: three
    times faster than torch.cat on dim 2."""
    if _nhwc(parts[0]):
        return torch.cat([p.permute(0, 2, 3, 1) for p in parts], 1).permute(0, 3, 1, 2)
    return torch.cat(parts, 2)


class RowStream:
    """An encoder's streamed forward: `push(rows)` returns the feature rows now complete.

    Subclasses wire their layers as RowConv/RowQueue; the image height is fixed up front
    because the bottom rows' padding must be known to finish the last rows."""

    def push(self, rows: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError
