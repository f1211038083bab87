"""Upscaling a whole image in tiles: the core the Upscaler, eval and the benchmark call.

The encoder and latent MLP run once per tile (with a margin of the encoder's receptive
field); the render MLP covers the tile's output in blocks sized from a memory budget.
Tiles and blocks only split the work: every output pixel gets the same neighbours, the
same ops and the same summation order whatever the tile and block sizes."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from lmf_cli.engine.budget import plan_tile, render_block, stream_plan
from lmf_cli.engine.cmsr import (
    BLOCK,
    KERNEL_REGION_BLOCKS,
    REGION_BLOCKS,
    REGION_MIN_LR,
    Schedule,
    pays,
    render_levels,
    tile_levels,
)
from lmf_cli.engine.render import Geometry, encode_finite, render_region, renders_fused
from lmf_cli.models.base import ImplicitSR, Latents
from lmf_cli.models.rows import cat_rows
from lmf_cli.options import EngineOptions
from lmf_cli.sizes import rel_cell_for


@contextmanager
def ieee_float32_convolutions() -> Iterator[None]:
    """cuDNN runs float32 convolutions in TF32 unless told not to (PyTorch's default): 10-bit
    mantissas in an encoder asked for fp32, and tiles whose shapes pick other kernels then differ by
    1e-4 (seen on an H200). fp32 here means IEEE float32, as on the CPU."""
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = saved


@torch.inference_mode()
@ieee_float32_convolutions()
def upscale_tensor(model: ImplicitSR, inp: torch.Tensor, out_hw: tuple[int, int],
                   options: EngineOptions | None = None, schedule: Schedule | None = None,
                   progress: Callable[[int, int], None] | None = None,
                   stats: dict[str, int] | None = None,
                   cores: list[tuple[int, int, int, int]] | None = None,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Upscale a (B, 3, h, w) tensor in [-1, 1] to a (B, 3, H, W) CPU tensor in [0, 1] units, or
    with `dtype` uint8 / uint16 to the samples of an 8- or 16-bit image (render.to_samples: the
    bytes numpy's rounding of the [0, 1] values gives), written as each pixel is rendered. Its
    memory is pixel-interleaved, (B, H, W, 3): `.permute(0, 2, 3, 1)` is the image, no copy.

    The input is cut into tiles of options.tile input pixels a side (None: from
    options.max_memory, else a share of free memory); each tile is encoded with a margin
    and renders exactly the output pixels whose centres fall in its core, on the global
    grid, so tiling never changes the result beyond float rounding. With a CMSR
    `schedule`, each output block renders only the levels its LR pixels need. `stats`
    receives the count of pixels the render MLP drew. A tile that runs out of GPU memory
    is split in four and retried; finished tiles stay. `cores` (input boxes r0, r1, c0, c1): render
    only the output pixels whose centres fall in them, each cut in tiles the same way; the rest
    of the canvas is left unwritten (video frames copy it from the frame before).
    """
    options = options or EngineOptions()
    h, w = inp.shape[-2:]
    capabilities = model.capabilities
    run = _TiledRun(model, inp, out_hw, schedule, options.max_memory, stats, dtype)
    tile = _aligned(plan_tile(capabilities, (h, w), options.tile, options.max_memory, inp.device), run.align)
    streamed = cores is None and capabilities.streams_rows and (h > tile or w > tile)
    if streamed:
        chunk, rows, columns = stream_plan(capabilities, options.max_memory, inp.device, w)
        rows, columns = (_aligned(options.tile or side, run.align) for side in (rows, columns))
        try:
            run.stream(min(chunk, rows), (rows, columns), progress)
        except torch.OutOfMemoryError:
            warnings.warn("out of memory while streaming the encoder; tiling with margins instead", stacklevel=2)
            if inp.device.type == "cuda":
                torch.cuda.empty_cache()
            streamed = False
    if not streamed:
        boxes = [(0, h, 0, w)] if cores is None else cores
        tiles = [(r, min(r1, r + tile), c, min(c1, c + tile)) for r0, r1, c0, c1 in boxes
                 for r in range(r0, r1, tile) for c in range(c0, c1, tile)]
        for done, core in enumerate(tiles, 1):
            run.tile(*core)
            if progress:
                progress(done, len(tiles))
    if inp.device.type == "cuda":
        torch.cuda.synchronize(inp.device)  # the non-blocking copies into the canvas have landed
    return run.canvas


class _TiledRun:
    """State of one upscale: the host canvas and what every tile shares."""

    def __init__(self, model: ImplicitSR, inp: torch.Tensor, out_hw: tuple[int, int], schedule: Schedule | None,
                 max_memory: int | None, stats: dict[str, int] | None, dtype: torch.dtype) -> None:
        self.model, self.inp, self.out_hw, self.schedule = model, inp, out_hw, schedule
        # CMSR levels belong to blocks of the global grid: tiles cut on it never encode a block twice
        self.align = BLOCK if schedule is not None else 1
        self.in_hw = tuple(inp.shape[-2:])
        self.margin = model.capabilities.tile_margin
        self.rel_cell = inp.new_tensor([rel_cell_for(self.in_hw, out_hw)]).expand(inp.shape[0], 2)
        # On a GPU the canvas is pinned host memory: blocks are copied back without waiting for
        # them (non_blocking), and the one wait is at the end of the upscale.
        self.on_host = inp.device.type == "cpu"
        # Pixel-interleaved, as images are saved: the samples are written where they will be read
        self.canvas = torch.empty(inp.shape[0], *out_hw, 3, dtype=dtype,
                                  pin_memory=inp.device.type == "cuda").permute(0, 3, 1, 2)
        self.fused = renders_fused(model, inp)
        self.block = render_block(model.capabilities, max_memory, self.fused, inp.device)
        self.counts = stats if stats is not None else {}
        self.counts.update(rendered=0, total=inp.shape[0] * out_hw[0] * out_hw[1])

    def tile(self, r0: int, r1: int, c0: int, c1: int) -> None:
        try:
            self._render_tile(r0, r1, c0, c1)
            return
        except torch.OutOfMemoryError:
            if max(r1 - r0, c1 - c0) <= 16:
                raise
        # Retried after the handler: inside it, the error's traceback still holds the failed attempt's
        # tensors, and on a GPU the smaller tiles would run out of memory too.
        warnings.warn(f"out of memory on a {c1 - c0}x{r1 - r0} tile; retrying it as four smaller tiles",
                      stacklevel=2)
        if self.inp.device.type == "cuda":
            torch.cuda.empty_cache()
            self.block = tuple(max(16, side // 2) for side in self.block)  # sized from free memory: too big
        rm, cm = (r0 + r1) // 2, (c0 + c1) // 2
        for sub in ((r0, rm, c0, cm), (r0, rm, cm, c1), (rm, r1, c0, cm), (rm, r1, cm, c1)):
            if sub[1] > sub[0] and sub[3] > sub[2]:
                self.tile(*sub)

    def stream(self, chunk: int, side: tuple[int, int], progress: Callable[[int, int], None] | None) -> None:
        """The whole image in tiles of `side` (rows, columns) without recomputed margins: the encoder
        runs once down the image over row chunks (models/rows.py), and each band of tiles decodes
        from the feature rows it needs plus the decoder's small margin (latent stage, ensemble).
        Feature rows stay in the chunks they were made in; a tile copies out only its own piece."""
        (h, w), model = self.in_hw, self.model
        margin = model.capabilities.decoder_margin
        encoder = model.stream_encoder(h)
        held: list[torch.Tensor] = []  # feature rows [first, made), chunk by chunk
        first = made = pushed = done = 0
        bands, columns = range(0, h, _even(h, side[0], self.align)), range(0, w, _even(w, side[1], self.align))
        for r0 in bands:
            r1 = min(h, r0 + bands.step)
            top, bottom = max(0, r0 - margin), min(h, r1 + margin)
            while made < bottom:
                rows = encoder.push(self.inp[:, :, pushed:pushed + chunk])
                pushed += chunk
                if rows.shape[2]:
                    held.append(rows)
                    made += rows.shape[2]
            while first + held[0].shape[2] <= top:
                first += held.pop(0).shape[2]
            for c0 in columns:
                c1 = min(w, c0 + columns.step)
                left, right = max(0, c0 - margin), min(w, c1 + margin)
                parts, row = [], first
                for rows in held:
                    a, b = max(top, row), min(bottom, row + rows.shape[2])
                    if a < b:
                        parts.append(rows[:, :, a - row:b - row, left:right])
                    row += rows.shape[2]
                self._decode_piece(cat_rows(parts), (top, bottom, left, right), (r0, r1, c0, c1))
                done += 1
                if progress:
                    progress(done, len(bands) * len(columns))

    def _decode_piece(self, feat: torch.Tensor, box: tuple[int, int, int, int],
                      core: tuple[int, int, int, int]) -> None:
        """Latents of streamed features `feat` covering input `box`; render the outputs of `core`."""
        (h, w), (big_h, big_w), model = self.in_hw, self.out_hw, self.model
        (i0, i1), (j0, j1) = output_span(core[0], core[1], h, big_h), output_span(core[2], core[3], w, big_w)
        if i1 <= i0 or j1 <= j0:
            return
        if model.may_overflow and not bool(torch.isfinite(feat).all()):
            self.tile(*core)  # the margin path recomputes a reduced-precision overflow in float32
            return
        top, bottom, left, right = box
        piece = self.inp[:, :, top:bottom, left:right]
        batch_latents = model.latent_tables(feat, self.rel_cell)
        for b in range(piece.shape[0]):
            latents = {k: v[b:b + 1] for k, v in batch_latents.items()} if piece.shape[0] > 1 else batch_latents
            self._render_image(b, piece[b:b + 1], latents, (top, left), (i0, i1), (j0, j1))

    def _render_tile(self, r0: int, r1: int, c0: int, c1: int) -> None:
        (h, w), (big_h, big_w), model = self.in_hw, self.out_hw, self.model
        (i0, i1), (j0, j1) = output_span(r0, r1, h, big_h), output_span(c0, c1, w, big_w)
        if i1 <= i0 or j1 <= j0:
            return
        lr0, lc0 = max(0, r0 - self.margin), max(0, c0 - self.margin)
        piece = self.inp[:, :, lr0:min(h, r1 + self.margin), lc0:min(w, c1 + self.margin)]
        batch_latents = encode_finite(model, piece, self.rel_cell)  # one encoder call for the whole batch
        for b in range(piece.shape[0]):  # rendering takes one image at a time (the kernel's layout)
            latents = {k: v[b:b + 1] for k, v in batch_latents.items()} if piece.shape[0] > 1 else batch_latents
            self._render_image(b, piece[b:b + 1], latents, (lr0, lc0), (i0, i1), (j0, j1))

    def _render_image(self, b: int, piece: torch.Tensor, latents: Latents, origin: tuple[int, int],
                      rows_range: tuple[int, int], cols_range: tuple[int, int]) -> None:
        model = self.model
        scale = max(o / i for o, i in zip(self.out_hw, self.in_hw, strict=True))
        levels = None if self.schedule is None or not pays(scale, self.fused, self.inp.device) else tile_levels(
            model, self.schedule, self.inp[b:b + 1], latents, origin, self.out_hw, rows_range, cols_range,
            self.rel_cell[b:b + 1], self.margin)
        geometry = Geometry(self.in_hw, self.out_hw, *origin, piece, latents, self.counts, self.fused,
                            model.fused_mlp(latents) if self.fused else None)
        block_h, block_w = self.block
        chunk = None
        if levels is not None:
            # CMSR: regions of several render blocks a side, so that each level's rectangles and coarse
            # pixels are handled once per region, not once per block; the rendering itself still goes
            # a block at a time
            chunk = self.block
            if self.fused:
                block_h, block_w = block_h * KERNEL_REGION_BLOCKS, block_w * KERNEL_REGION_BLOCKS
            else:
                block_h, block_w = (side * max(REGION_BLOCKS, math.ceil(REGION_MIN_LR * scale / side))
                                    for side in (block_h, block_w))
        (i0, i1), (j0, j1) = rows_range, cols_range
        for a in range(i0, i1, block_h):
            for ca in range(j0, j1, block_w):
                rows, cols = (a, min(i1, a + block_h)), (ca, min(j1, ca + block_w))
                region = self.canvas[b:b + 1, :, rows[0]:rows[1], cols[0]:cols[1]]
                # every pixel is written once, in the canvas's units (`unit`): on the CPU in place (the
                # kernel straight into the canvas), from a GPU through a block of its own
                target = region if self.on_host else torch.empty(region.shape, dtype=region.dtype,
                                                                 device=self.inp.device)
                if levels is not None:  # each pixel drawn by one level
                    render_levels(model, geometry, self.schedule, levels, rows, cols, into=target, block=chunk,
                                  unit=True)
                else:
                    render_region(model, geometry, self.out_hw, rows, cols, into=target, unit=True)
                if not self.on_host:
                    region.copy_(target, non_blocking=True)


def _aligned(side: int, multiple: int) -> int:
    return max(multiple, side // multiple * multiple)


def _even(n: int, side: int, multiple: int = 1) -> int:
    """Tile side at most `side` (a multiple of `multiple`) that cuts n into near-equal tiles: no sliver
    at the end, whose few columns would make BLAS and oneDNN choose other kernels (last-bit
    differences) and waste calls."""
    even = -(-n // -(-n // side))
    return -(-even // multiple) * multiple


def output_span(start: int, stop: int, n_in: int, n_out: int) -> tuple[int, int]:
    """Output indices [i0, i1) whose centres lie in input positions [start, stop) along one axis:
    what a tile core renders, and so what a reused region copies."""
    return _first_output(start, n_in, n_out), _first_output(stop, n_in, n_out) if stop < n_in else n_out


def _first_output(a: int, n_in: int, n_out: int) -> int:
    """First output index whose centre lies at or after input position a (exact integers)."""
    return max(0, -((n_in - 2 * a * n_out) // (2 * n_in)))
