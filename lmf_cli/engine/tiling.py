"""Upscaling a whole image in tiles: the core the Upscaler, eval and the benchmark call.

The encoder and latent MLP run once per tile (with a margin of the encoder's receptive
field); the render MLP covers the tile's output in blocks sized from a memory budget.
Tiles and blocks only split the work: every output pixel gets the same neighbours, the
same ops and the same summation order whatever the tile and block sizes."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from lmf_cli.engine.budget import default_tile, render_block
from lmf_cli.engine.cmsr import Schedule, render_levels
from lmf_cli.engine.render import Geometry, encode_finite, render_region, renders_fused
from lmf_cli.models.base import ImplicitSR, Latents
from lmf_cli.options import EngineOptions
from lmf_cli.sizes import rel_cell_for


@torch.inference_mode()
def upscale_tensor(model: ImplicitSR, inp: torch.Tensor, out_hw: tuple[int, int],
                   options: EngineOptions | None = None, schedule: Schedule | None = None,
                   progress: Callable[[int, int], None] | None = None,
                   stats: dict[str, int] | None = None,
                   cores: list[tuple[int, int, int, int]] | None = None) -> torch.Tensor:
    """Upscale a (B, 3, h, w) tensor in [-1, 1] to a (B, 3, H, W) CPU tensor in [0, 1] units.

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
    tile = options.tile or default_tile(model.capabilities, options.max_memory, inp.device)
    run = _TiledRun(model, inp, out_hw, schedule, options.max_memory, stats)
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
                 max_memory: int | None, stats: dict[str, int] | None) -> None:
        self.model, self.inp, self.out_hw, self.schedule = model, inp, out_hw, schedule
        self.in_hw = tuple(inp.shape[-2:])
        self.margin = model.capabilities.tile_margin
        self.rel_cell = inp.new_tensor([rel_cell_for(self.in_hw, out_hw)]).expand(inp.shape[0], 2)
        # On a GPU the canvas is pinned host memory: blocks are copied back without waiting for
        # them (non_blocking), and the one wait is at the end of the upscale.
        self.on_host = inp.device.type == "cpu"
        self.canvas = torch.empty(inp.shape[0], 3, *out_hw, dtype=torch.float32,
                                  pin_memory=inp.device.type == "cuda")
        self.fused = renders_fused(model, inp)
        self.block = render_block(model.capabilities, max_memory, self.fused, inp.device)
        self.counts = stats if stats is not None else {}
        self.counts.update(rendered=0, total=inp.shape[0] * out_hw[0] * out_hw[1])

    def tile(self, r0: int, r1: int, c0: int, c1: int) -> None:
        try:
            self._render_tile(r0, r1, c0, c1)
        except torch.OutOfMemoryError:
            if max(r1 - r0, c1 - c0) <= 16:
                raise
            warnings.warn(f"out of memory on a {c1 - c0}x{r1 - r0} tile; retrying it as four smaller tiles",
                          stacklevel=2)
            if self.inp.device.type == "cuda":
                torch.cuda.empty_cache()
                self.block = tuple(max(16, side // 2) for side in self.block)  # sized from free memory: too big
            rm, cm = (r0 + r1) // 2, (c0 + c1) // 2
            for sub in ((r0, rm, c0, cm), (r0, rm, cm, c1), (rm, r1, c0, cm), (rm, r1, cm, c1)):
                if sub[1] > sub[0] and sub[3] > sub[2]:
                    self.tile(*sub)

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
        levels = self.schedule.levels(model.modulation_intensity(latents)[0]) if self.schedule else None
        geometry = Geometry(self.in_hw, self.out_hw, *origin, piece, latents, self.counts, self.fused)
        block_h, block_w = self.block
        (i0, i1), (j0, j1) = rows_range, cols_range
        for a in range(i0, i1, block_h):
            for ca in range(j0, j1, block_w):
                rows, cols = (a, min(i1, a + block_h)), (ca, min(j1, ca + block_w))
                region = self.canvas[b:b + 1, :, rows[0]:rows[1], cols[0]:cols[1]]
                if levels is not None and self.on_host:  # every pixel is drawn by one level, in place
                    render_levels(model, geometry, self.schedule, levels, rows, cols, into=region).add_(1).mul_(0.5)
                elif levels is not None:
                    out = render_levels(model, geometry, self.schedule, levels, rows, cols)
                    region.copy_(out.add_(1).mul_(0.5), non_blocking=True)
                elif self.fused:  # the kernel writes straight into the canvas
                    render_region(model, geometry, self.out_hw, rows, cols, into=region).add_(1).mul_(0.5)
                else:
                    out = render_region(model, geometry, self.out_hw, rows, cols)
                    region.copy_(out.add_(1).mul_(0.5), non_blocking=True)


def output_span(start: int, stop: int, n_in: int, n_out: int) -> tuple[int, int]:
    """Output indices [i0, i1) whose centres lie in input positions [start, stop) along one axis:
    what a tile core renders, and so what a reused region copies."""
    return _first_output(start, n_in, n_out), _first_output(stop, n_in, n_out) if stop < n_in else n_out


def _first_output(a: int, n_in: int, n_out: int) -> int:
    """First output index whose centre lies at or after input position a (exact integers)."""
    return max(0, -((n_in - 2 * a * n_out) // (2 * n_in)))
