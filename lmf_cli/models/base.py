"""What every implicit upscaler here shares: encode once, then query points or render grids.

Two forward paths, one set of formulas:
- `query(latents, coord, cell)`: arbitrary points, one gather per neighbour (training, CMSR).
- `render(latents, rows, cols, ...)`: a whole output window, with queries grouped by the
  latent they read (`AxisSlots`), so per-latent work (first layer, modulations) is done once
  per latent and broadcast over its slots instead of gathered per output pixel.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from lmf_cli.models.geometry import (
    AREA_EPS,
    AxisBilinear,
    AxisSlots,
    bilinear_window_last,
    gather_latents,
    neighbours,
)
from lmf_cli.models.rows import RowStream

Latents = dict[str, torch.Tensor]

PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class Capabilities:
    """What a model can do, declared once by its family (in the spirit of spandrel's descriptor).

    The engine, the API, training and the benchmark read these facts; nothing outside
    `models/` looks inside a network to guess them.
    """

    family: str  # the registry name: lmliif, lmlte, liif, lte, diif
    tile_margin: int  # input pixels a tile adds per side so its core sees what the whole image sees
    feature_channels: int  # encoder output channels: the encoder's share of a tile's memory
    latent_channels: int  # width of the per-latent table: its share of a tile's memory
    render_width: int  # widest layer of the per-output-pixel MLP: the PyTorch renderer's block size
    cmsr: bool = False  # modulated render MLP: CMSR levels (intensity from its shift modulations)
    kernel_width: int | None = None  # hidden width the compiled render kernel is built for; None: PyTorch only
    renders_pairs: bool = False  # decode_slots honours RenderWindow.pairs (CMSR on the PyTorch path)
    whole_cells: bool = False  # decodes every pixel of an LR cell at once: training samples whole cells
    precisions: tuple[str, ...] = PRECISIONS  # encoder compute precisions (the MLPs stay float32)
    # The model's reach, for tiling: tiles are exact when their cores start on multiples of this many
    # input pixels (1 for convolutions; SwinIR's attention window) and their margin is tile_margin.
    # None: the reach is global (attention over the whole feature map), so no margin makes tiles exact.
    tile_grid: int | None = 1
    # With tile_grid None: the largest difference of a tiled run from the whole-image run, in 8-bit levels,
    # as measured (the warning before tiling quotes it); None where it was not measured.
    tile_difference: float | None = None
    streams_rows: bool = False  # the encoder runs over row bands (stream_encoder): large images tile without margins
    decoder_margin: int = 0  # of tile_margin, what the stages after the encoder read beyond a core (streamed tiles)


@dataclass(frozen=True)
class RenderWindow:
    """Where a latent window sits in the global image, and which output window to render.

    rows/cols: slots of the output window; bilinear_rows/cols: taps for the input skip.
    rel_cell: (B, 2) cell in LR-pixel units (already clipped for large scales).
    pairs: render only the slots of these latents (others add nothing): what CMSR's levels
    need, at the cost of the pixels they own (models whose capabilities say `renders_pairs`).
    """

    rows: AxisSlots
    cols: AxisSlots
    bilinear_rows: AxisBilinear | None
    bilinear_cols: AxisBilinear | None
    rel_cell: torch.Tensor
    pairs: torch.Tensor | None = None  # (P,) flat r * nc + c: only these latents render (CMSR)


MIN_GEMM_ROWS = 16
# Slots decoded at once where a window renders only some pairs of rows (CMSR's levels; about a
# 128 x 128 window's worth at x12): the render MLP's activations stay in cache whatever the window.
PAIR_CHUNK_SLOTS = 1 << 15


def rows_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear over the last axis whose rows do not depend on how many rows there are.

    BLAS picks other kernels (other summation orders) for very few rows; padding to a
    minimum row count keeps every output value independent of block and tile sizes.
    """
    flat = x.reshape(-1, x.shape[-1])
    rows = flat.shape[0]
    if rows < MIN_GEMM_ROWS:
        flat = torch.cat([flat, flat.new_zeros(MIN_GEMM_ROWS - rows, flat.shape[1])])
    out = F.linear(flat, weight, bias)[:rows]
    return out.view(*x.shape[:-1], weight.shape[0])


def unfold3x3(feat: torch.Tensor) -> torch.Tensor:
    """3x3 neighbourhood of every feature, zero padded, channel-major like F.unfold."""
    b, c, h, w = feat.shape
    return F.unfold(feat, 3, padding=1).view(b, c * 9, h, w)


def channels_last_table(feat: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h, w, C): one contiguous row per latent."""
    return feat.permute(0, 2, 3, 1).contiguous()


class ImplicitSR(nn.Module):
    """Base class: subclasses define `encode`, `decode_points` and `decode_slots`."""

    encoder: nn.Module
    local_ensemble: bool = True
    bilinear_skip: bool = False
    encoder_dtype: torch.dtype | None = None  # e.g. bfloat16: run the convolutions under autocast
    channels_last: bool = False  # NHWC input for the encoder (oneDNN/cuDNN's fast layout)

    @property
    def latent_dtype(self) -> torch.dtype | None:
        """The latent MLP's compute dtype: bf16 where the encoder runs in it (float32's range, so no
        overflow to check); fp16 could overflow there, unchecked, so with fp16 it stays float32."""
        return self.encoder_dtype if self.encoder_dtype == torch.bfloat16 else None

    @property
    def may_overflow(self) -> bool:
        """Whether the encoder's precision is narrower in range than float32 (fp16), the one case where
        finite inputs can give inf/NaN features worth a check: bf16 has float32's range, and the check
        reads every latent (5% of a whole x4 upscale)."""
        return self.encoder_dtype == torch.float16

    def use_channels_last(self) -> None:
        """Run the convolutions in NHWC: about a quarter faster on CPUs (oneDNN), and the
        layout tensor cores want on GPUs."""
        self.encoder.to(memory_format=torch.channels_last)
        self.channels_last = True

    def stream_encoder(self, height: int) -> FeatureRows:
        """run_encoder over row bands pushed in order (the engine's streamed tiling); needs an
        encoder that `streams_rows` (capabilities.streams_rows)."""
        return FeatureRows(self, self.encoder.rows(height))

    def run_encoder(self, inp: torch.Tensor) -> torch.Tensor:
        """Encoder features in float32, optionally computed in a lower precision."""
        if self.channels_last:
            inp = inp.contiguous(memory_format=torch.channels_last)
        if self.encoder_dtype is None:
            return self.encoder(inp).float()
        with torch.autocast(inp.device.type, dtype=self.encoder_dtype):
            return self.encoder(inp).float()

    @property
    def capabilities(self) -> Capabilities:
        raise NotImplementedError

    def stage_macs(self, in_hw: tuple[int, int], out_hw: tuple[int, int]) -> dict[str, float]:
        """Multiply-accumulates of the decoder's stages for one image: "latent" (per LR pixel work
        after the encoder) and "render" (per output pixel). The encoder is counted by the benchmark."""
        raise NotImplementedError

    def encode(self, inp: torch.Tensor, rel_cell: torch.Tensor) -> Latents:
        """The latent tables of an input: its encoder features, then the per-LR-pixel decoder stage."""
        return self.latent_tables(self.run_encoder(inp), rel_cell)

    def latent_tables(self, feat: torch.Tensor, rel_cell: torch.Tensor) -> Latents:
        """`latents`, computed in `latent_dtype` where there is one, the tables in float32 for the renderers.
        The latent MLP reads encoder features, not coordinates, so bfloat16 costs it what it costs the
        encoder; on CPUs with native bf16 it takes 0.6x its float32 time (x4 on a Zen 5 EPYC)."""
        if self.latent_dtype is None:
            return self.latents(feat, rel_cell)
        with torch.autocast(feat.device.type, dtype=self.latent_dtype):
            tables = self.latents(feat, rel_cell)
        return {name: table.float() for name, table in tables.items()}

    def latents(self, feat: torch.Tensor, rel_cell: torch.Tensor) -> Latents:
        """The latent tables from encoder features (B, C, h, w). Separate from the encoder so
        that features streamed in row bands (models/rows.py, engine/tiling.py) can be decoded in pieces."""
        raise NotImplementedError

    def decode_points(self, latents: Latents, index: torch.Tensor, rel: torch.Tensor,
                      rel_cell: torch.Tensor) -> torch.Tensor:
        """Predictions (B, N, Q, 3) for latents at flat `index` (B, N, Q) with offsets `rel`."""
        raise NotImplementedError

    def decode_slots(self, latents: Latents, window: RenderWindow) -> torch.Tensor:
        """Predictions (B, nr, Kr, nc, Kc, 3) for every slot of the window."""
        raise NotImplementedError

    def query(self, inp: torch.Tensor, latents: Latents, coord: torch.Tensor,
              cell: torch.Tensor) -> torch.Tensor:
        """RGB (normalised) at global coordinates (B, Q, 2), cells (B, Q, 2) -> (B, Q, 3)."""
        h, w = inp.shape[-2:]
        nb = neighbours(coord, h, w, self.local_ensemble)
        rel_cell = cell * cell.new_tensor([h, w])
        pred = self.decode_points(latents, nb.index, nb.rel, rel_cell)
        out = (pred * nb.weight.unsqueeze(-1)).sum(1)
        return self.add_skip_at_points(inp, coord, out)

    def add_skip_at_points(self, inp: torch.Tensor, coord: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out (B, Q, 3) plus the bilinear upsample of the input at `coord`, for models with the skip."""
        if not self.bilinear_skip:
            return out
        grid = coord.flip(-1).unsqueeze(1)
        return out + F.grid_sample(inp, grid, mode="bilinear", padding_mode="border",
                                   align_corners=False)[:, :, 0].transpose(1, 2)

    def forward(self, inp: torch.Tensor, coord: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:
        h, w = inp.shape[-2:]
        latents = self.encode(inp, cell[:, 0] * cell.new_tensor([h, w]))
        return self.query(inp, latents, coord, cell)

    def render(self, inp: torch.Tensor, latents: Latents, window: RenderWindow) -> torch.Tensor:
        """Render an output window as (B, 3, H', W') in normalised units: each slot's prediction
        times its ensemble weight, summed into output columns (per row of slots), then into output rows."""
        rows, cols = window.rows, window.cols
        n_out_r = int(rows.out.max()) + 1
        n_out_c = int(cols.out.max()) + 1
        if window.pairs is None:
            pred = self.decode_slots(latents, window)  # (B, nr, nc, Kr, Kc, 3)
            pred = pred * ensemble_weights(rows, cols, self.local_ensemble).unsqueeze(-1)
            b, nr, nc, kr, kc, _ = pred.shape
            by_col = pred.new_zeros(b, nr * kr, n_out_c, 3)
            by_col.index_add_(2, cols.out.flatten(), pred.permute(0, 1, 3, 2, 4, 5).reshape(b, nr * kr, nc * kc, 3))
        else:
            by_col = self._pairs_by_col(latents, window, inp.shape[0], n_out_c)
        out = by_col.new_zeros(by_col.shape[0], n_out_r, n_out_c, 3)
        out.index_add_(1, rows.out.flatten(), by_col)
        if self.bilinear_skip:
            out += bilinear_window_last(inp, window.bilinear_rows, window.bilinear_cols)
        return out.permute(0, 3, 1, 2)

    def _pairs_by_col(self, latents: Latents, window: RenderWindow, batch: int, n_out_c: int) -> torch.Tensor:
        """render's column sums (B, nr * Kr, n_out_c, 3) from the slots of window.pairs alone, decoded
        PAIR_CHUNK_SLOTS at a time and added straight to their places pixel by pixel (the pairs of a
        large sparse window are a fraction of its rows x columns). A wanted pixel's sums get the same
        terms in the same order as on the dense path, so its value is the same to the bit."""
        rows, cols = window.rows, window.cols
        kr, kc = rows.rel.shape[1], cols.rel.shape[1]
        device = rows.out.device
        by_col = torch.zeros(rows.n_rows * kr * n_out_c, batch, 3, device=device)
        # a slot's place: its row of slots' first pixel, plus its output column
        row_place = torch.arange(rows.n_rows * kr, device=device).view(-1, kr) * n_out_c
        for chunk in window.pairs.split(max(1, PAIR_CHUNK_SLOTS // (kr * kc))):
            pred = self.decode_slots(latents, replace(window, pairs=chunk))[:, :, 0]  # (B, P, Kr, Kc, 3)
            pred = pred * ensemble_weights(rows, cols, self.local_ensemble, chunk).unsqueeze(-1)
            r, c = chunk // cols.n_rows, chunk % cols.n_rows
            place = row_place[r][:, :, None] + cols.out[c][:, None, :]
            # one index a pixel for its three channels (and the batch), not one a value
            by_col.index_add_(0, place.view(-1), pred.reshape(batch, -1, 3).transpose(0, 1))
        return by_col.permute(1, 0, 2).reshape(batch, rows.n_rows * kr, n_out_c, 3)


class FeatureRows:
    """Encoder features of input rows pushed top to bottom, in run_encoder's layout and precision."""

    def __init__(self, model: ImplicitSR, stream: RowStream) -> None:
        self.model, self.stream = model, stream

    def push(self, rows: torch.Tensor) -> torch.Tensor:
        """The feature rows these input rows complete, float32 (B, C, n, w); n may be 0."""
        if self.model.channels_last:
            rows = rows.contiguous(memory_format=torch.channels_last)
        if self.model.encoder_dtype is None:
            return self.stream.push(rows).float()
        with torch.autocast(rows.device.type, dtype=self.model.encoder_dtype):
            return self.stream.push(rows).float()


def ensemble_weights(rows: AxisSlots, cols: AxisSlots, local_ensemble: bool = True,
                     pairs: torch.Tensor | None = None) -> torch.Tensor:
    """(nr, nc, Kr, Kc) weights: LIIF's normalised areas with their 1e-9 floor, exactly
    (computed in float64 from per-axis factors: see AxisSlots); with `pairs` (P,) of flat
    r * nc + c, (P, Kr, Kc) for those pairs of rows alone."""
    if pairs is None:
        def along_y(t: torch.Tensor) -> torch.Tensor:
            return t[:, None, :, None]

        def along_x(t: torch.Tensor) -> torch.Tensor:
            return t[None, :, None, :]
    else:
        r, c = pairs // cols.n_rows, pairs % cols.n_rows

        def along_y(t: torch.Tensor) -> torch.Tensor:
            return t[r][:, :, None]

        def along_x(t: torch.Tensor) -> torch.Tensor:
            return t[c][:, None, :]
    if not local_ensemble:
        return along_y(rows.weight) * along_x(cols.weight)
    oy, ox = along_y(rows.other), along_x(cols.other)
    ty, tx = along_y(rows.taps), along_x(cols.taps)
    sy, sx = along_y(rows.total), along_x(cols.total)
    return ((oy * ox + ty * tx * AREA_EPS) / (sy * sx + 4 * AREA_EPS)).float()


def slot_window(latents_map: torch.Tensor, window: RenderWindow) -> torch.Tensor:
    """The per-latent table (B, h, w, C) at the window's rows (see AxisSlots: a latent per row and
    neighbour role, so most latents twice per axis), shaped (B, nr, nc, 1, 1, C) to broadcast over
    their (Kr, Kc) slots; with window.pairs, (B, P, 1, 1, 1, C) for the chosen pairs of rows."""
    rows, cols = window.rows, window.cols
    cut = latents_map[:, rows.lat0:rows.lat0 + rows.n_latents, cols.lat0:cols.lat0 + cols.n_latents]
    if window.pairs is not None:
        r, c = rows.lat[window.pairs // cols.n_rows], cols.lat[window.pairs % cols.n_rows]
        return cut[:, r, c][:, :, None, None, None, :]
    return cut[:, rows.lat[:, None], cols.lat[None, :]][:, :, :, None, None, :]


def slot_rel(window: RenderWindow, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Relative coordinates of the slots: y as (nr, 1, Kr, 1, 1), x as (1, nc, 1, Kc, 1)."""
    ry = window.rows.rel.to(dtype)[:, None, :, None, None]
    rx = window.cols.rel.to(dtype)[None, :, None, :, None]
    return ry, rx


def slot_rel_pairs(window: RenderWindow, batch: int, dtype: torch.dtype) -> torch.Tensor:
    """(B * nr * nc, Kr * Kc, 2) relative (y, x) of every slot, latent-major for bmm."""
    nr, kr = window.rows.rel.shape
    nc, kc = window.cols.rel.shape
    if window.pairs is not None:
        ry = window.rows.rel.to(dtype)[window.pairs // nc][:, :, None, None]
        rx = window.cols.rel.to(dtype)[window.pairs % nc][:, None, :, None]
        p = window.pairs.numel()
        both = torch.cat([ry.expand(p, kr, kc, 1), rx.expand(p, kr, kc, 1)], -1)
        return both.expand(batch, p, kr, kc, 2).reshape(batch * p, kr * kc, 2)
    ry, rx = slot_rel(window, dtype)
    pairs = torch.cat([ry.expand(nr, nc, kr, kc, 1), rx.expand(nr, nc, kr, kc, 1)], -1)
    return pairs.expand(batch, nr, nc, kr, kc, 2).reshape(batch * nr * nc, kr * kc, 2)


def gather(latents_map: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows of a (B, h, w, C) table at flat indices (B, ...)."""
    b, h, w, c = latents_map.shape
    return gather_latents(latents_map.reshape(b, h * w, c), index)


# What a decoder with a 3x3 latent stage reads beyond a tile's core, in input pixels: the 3x3
# latent conv/unfold, the ensemble neighbour and the bilinear skip's second tap.
DECODER_MARGIN = 3


def encoder_margin(encoder: nn.Module) -> int:
    """Tile margin of a decoder on `encoder`: its receptive field plus DECODER_MARGIN."""
    return int(encoder.receptive_radius) + DECODER_MARGIN


def linear_macs(layers: list[nn.Linear]) -> float:
    return float(sum(layer.in_features * layer.out_features for layer in layers))


def conv3x3_macs(*convs: nn.Conv2d) -> float:
    return float(sum(c.in_channels * c.out_channels * c.kernel_size[0] * c.kernel_size[1] for c in convs))


def ensemble_stages(model: ImplicitSR, latent_per_pixel: float, in_hw: tuple[int, int],
                    out_hw: tuple[int, int]) -> dict[str, float]:
    """stage_macs of a decoder whose render MLP (`imnet`) runs once per output pixel and ensemble
    neighbour, after `latent_per_pixel` MACs per LR pixel."""
    neighbours = 4 if model.local_ensemble else 1
    return {"latent": latent_per_pixel * in_hw[0] * in_hw[1],
            "render": neighbours * linear_macs(model.imnet.linears) * out_hw[0] * out_hw[1]}
