"""The MLPs of the decoders, with the official `layers.{0,2,...}` key layout."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

AFFINE, FOURIER = 0, 1  # input stages of the compiled render kernel (lmf_cli/native.py)


def _stack(in_dim: int, hidden: list[int], out_dim: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    last = in_dim
    for width in hidden:
        layers += [nn.Linear(last, width), nn.ReLU()]
        last = width
    layers.append(nn.Linear(last, out_dim))
    return nn.Sequential(*layers)


def table_linear(table: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
    """`linear` applied to every row of a (B, h, w, C) table, as a (B, h, w, out) table.

    On the CPU in float32 it runs as oneDNN's 1x1 convolution over the channels-last image the
    table already is: a plain matrix product goes to MKL, whose float32 kernels on AMD CPUs run at
    0.6x oneDNN's (35 against 60 GMAC/s for a 208 x 208 layer on one thread of a Zen 5 EPYC; with
    oneDNN held to AVX2, 62 ms against MKL's 73). Each output row depends on its input row only,
    whatever the table's size, so tiles and row bands still match a whole-image run.
    """
    if (table.device.type != "cpu" or table.dtype != torch.float32 or torch.is_autocast_enabled("cpu")
            or not torch.backends.mkldnn.is_available()):
        return linear(table)
    image = table.permute(0, 3, 1, 2)  # (B, C, h, w), channels last: no copy
    weight = linear.weight[:, :, None, None]
    out = torch.mkldnn_convolution(image, weight, linear.bias, [0, 0], [1, 1], [1, 1], 1)
    return out.permute(0, 2, 3, 1).contiguous()


class MLP(nn.Module):
    """Plain ReLU MLP (LIIF's and LTE's decoder, LMF's latent MLP)."""

    def __init__(self, in_dim: int, out_dim: int, hidden_list: list[int]) -> None:
        super().__init__()
        self.layers = _stack(in_dim, list(hidden_list), out_dim)

    @property
    def linears(self) -> list[nn.Linear]:
        return [m for m in self.layers if isinstance(m, nn.Linear)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)

    def on_table(self, table: torch.Tensor) -> torch.Tensor:
        """`forward` over every row of a (B, h, w, C) latent table, each linear layer by `table_linear`."""
        for layer in self.layers:
            table = table_linear(table, layer) if isinstance(layer, nn.Linear) else layer(table)
        return table


class ModulatedMLP(nn.Module):
    """LMF's render MLP: every hidden layer is `relu((W h + b) * (1 + scale) + shift)`."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int, hidden_depth: int) -> None:
        super().__init__()
        self.hidden_dim = hidden_dim
        self.hidden_depth = hidden_depth
        self.layers = _stack(in_dim, [hidden_dim] * hidden_depth, out_dim)

    @property
    def linears(self) -> list[nn.Linear]:
        return [m for m in self.layers if isinstance(m, nn.Linear)]

    @property
    def mod_dim(self) -> int:
        """Scale and shift values per latent: (scale, shift) x depth x width."""
        return 2 * self.hidden_depth * self.hidden_dim

    def split(self, table: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Cut a latent table (..., C) into width-sized pieces: scales, shifts, then the rest.

        One unbind instead of a slice per layer: in training, each slice's backward would
        allocate and zero a gradient of the whole gathered table.
        """
        return table.unflatten(-1, (table.shape[-1] // self.hidden_dim, self.hidden_dim)).unbind(-2)

    def forward(self, x: torch.Tensor, pieces: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """x (..., in_dim); pieces from `split`: depth scales, then depth shifts."""
        n = self.hidden_depth
        *linears, last = self.linears
        for k, layer in enumerate(linears):
            x = torch.relu(torch.addcmul(pieces[n + k], layer(x), 1 + pieces[k]))
        return last(x)


@dataclass(frozen=True)
class FusedMLP:
    """What the compiled kernel needs to run a render MLP (see render_kernel.c): the latent
    `table` (h, w, C) as the latent MLP wrote it, the input stage `kind` with its per-latent
    `base` (AFFINE) or the offset `code` of (coef, freq) in a row (FOURIER), the small `extra`
    vector of the grid rendered (None until a grid is chosen: the rest is packed once per tile),
    and the matrix layers after it, (n, in, out) weights and (n, out) biases."""

    kind: int
    table: torch.Tensor
    depth: int
    base: torch.Tensor | None
    extra: torch.Tensor | None
    code: int
    weights: torch.Tensor
    biases: torch.Tensor
    w_out: torch.Tensor
    b_out: torch.Tensor

    @property
    def hidden(self) -> int:
        return self.weights.shape[-1]
