"""Consecutive video frames: what did not change is not computed again.

An output pixel depends only on the input pixels of its tile's core plus the model's
`tile_margin` around it (tiles render on the global grid: `tiling`). So where every input pixel
within the margin of an output pixel's own input pixel is bit-identical to the frame before's,
so is the output pixel, and it is copied instead of computed. Codecs make that common: H.264 and
H.265 skip blocks decode to exactly the reference frame's pixels, so a still region stays
bit-identical from frame to frame even in a lossy file.

`frames_to_render` says which frames must be rendered and where: `boxes_to_render`, the input
boxes whose output must be computed again, as a few pixel-tight rectangles; `output_boxes` maps
them to the output, where everything else is the previous output.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from lmf_cli.engine.tiling import output_span

Box = tuple[int, int, int, int]  # rows [r0, r1), columns [c0, c1)

# Changed cells of this many input pixels that touch are grouped. Measured on the benchmark's clips
# (320 x 180 and 640 x 360, margins 21 and 37) for grids of 8 to 64: the same boxes on the screen
# recording, the animation and the pan; on the H.264 screen recording the encoder read 45-68% of a
# frame per frame at 32, 47-81% at 8 or 16 (the pairwise merge is greedy), 52-69% at 64. Fixed
# regions of 32 to 128 pixels instead of pixel-tight boxes read 1.3-3.6x as much on the screen
# recording even when merged, and 1.6-10x the frame on the pan when each region is its own tile.
CELL = 32


@dataclass(frozen=True)
class Previous:
    """The frame before (H x W x 3) and its output as returned (rounded): what the next frame may copy."""

    frame: np.ndarray
    output: np.ndarray


def changed_pixels(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """(H, W) True where any channel of two H x W x C frames differs."""
    return (before != after).any(axis=-1)


def frames_to_render(frames: np.ndarray, before: np.ndarray | None, margin: int) -> tuple[list[int], list[Box]]:
    """Which of consecutive frames (N x H x W x C) must be rendered, and where: those that differ from
    the frame before them (`before`: the one before the first, None if there is none), inside the
    boxes around every change of any of them (so that they render together); everything else is
    the frame before's output. Without `before`, every frame, whole."""
    if before is None:
        return list(range(len(frames))), [(0, frames.shape[1], 0, frames.shape[2])]
    fresh, changed = [], np.zeros(frames.shape[1:3], dtype=bool)
    for k, frame in enumerate(frames):
        if (diff := changed_pixels(before, frame)).any():
            fresh.append(k)
            changed |= diff
        before = frame
    return fresh, boxes_to_render(changed, margin)


def boxes_to_render(changed: np.ndarray, margin: int, cell: int = CELL) -> list[Box]:
    """Input boxes whose output must be computed again: every input pixel within `margin` of a
    changed one. Changed cells of `cell` pixels that touch (8 neighbours) form a group, whose box is
    its changed pixels' bounding box grown by the margin; then two boxes are merged while the merged
    box costs the encoder no more than the two apart (its input: the box and the margin around it),
    and boxes that together cost more than the whole frame are the whole frame."""
    h, w = changed.shape
    nr, nc = -(-h // cell), -(-w // cell)
    padded = np.zeros((nr * cell, nc * cell), dtype=bool)
    padded[:h, :w] = changed
    blocks = padded.reshape(nr, cell, nc, cell)
    rows, cols = blocks.any(axis=3), blocks.any(axis=1)  # (nr, cell, nc): rows hit in each cell; (nr, nc, cell)
    count, labels = cv2.connectedComponents(rows.any(axis=1).astype(np.uint8), connectivity=8)
    if count <= 1:
        return []
    # each cell's changed pixels' bounds, then each group's
    bounds = np.stack([np.arange(nr)[:, None] * cell + rows.argmax(axis=1),
                       np.arange(nr)[:, None] * cell + cell - rows[:, ::-1].argmax(axis=1),
                       np.arange(nc)[None, :] * cell + cols.argmax(axis=2),
                       np.arange(nc)[None, :] * cell + cell - cols[:, :, ::-1].argmax(axis=2)], axis=-1)
    group, bounds = labels[labels > 0] - 1, bounds[labels > 0]
    boxes = np.tile(np.array([max(h, w), 0, max(h, w), 0], dtype=np.int64), (count - 1, 1))
    np.minimum.at(boxes[:, 0], group, bounds[:, 0])
    np.maximum.at(boxes[:, 1], group, bounds[:, 1])
    np.minimum.at(boxes[:, 2], group, bounds[:, 2])
    np.maximum.at(boxes[:, 3], group, bounds[:, 3])
    boxes += np.array([-margin, margin, -margin, margin])
    boxes[:, :2], boxes[:, 2:] = boxes[:, :2].clip(0, h), boxes[:, 2:].clip(0, w)
    if _encoded(boxes, margin, (h, w)).sum() >= h * w:
        return [(0, h, 0, w)]
    return _merged(boxes, margin, (h, w))


def output_boxes(boxes: list[Box], in_hw: tuple[int, int], out_hw: tuple[int, int]) -> list[Box]:
    """The output pixels each input box renders (those whose centres fall in it)."""
    return [(*output_span(r0, r1, in_hw[0], out_hw[0]), *output_span(c0, c1, in_hw[1], out_hw[1]))
            for r0, r1, c0, c1 in boxes]


def _merged(b: np.ndarray, margin: int, in_hw: tuple[int, int]) -> list[Box]:
    """Merge the pair of boxes (n x 4) that saves the most encoder input while one saves any (no
    input is then encoded twice where two boxes' inputs overlap: the overlap is a saving)."""
    while len(b) > 1:
        union = np.stack([np.minimum(b[:, None, 0], b[None, :, 0]), np.maximum(b[:, None, 1], b[None, :, 1]),
                          np.minimum(b[:, None, 2], b[None, :, 2]), np.maximum(b[:, None, 3], b[None, :, 3])], -1)
        own = _encoded(b, margin, in_hw)
        saving = own[:, None] + own[None, :] - _encoded(union, margin, in_hw)
        np.fill_diagonal(saving, -1)
        i, j = np.unravel_index(int(saving.argmax()), saving.shape)
        if saving[i, j] < 0:
            break
        b = np.concatenate([np.delete(b, [i, j], axis=0), union[i, j][None]])
    return [tuple(int(v) for v in box) for box in b]


def _encoded(boxes: np.ndarray, margin: int, in_hw: tuple[int, int]) -> np.ndarray:
    """Input pixels the encoder reads for each box: the box and its margin, within the image."""
    r0, r1 = np.maximum(boxes[..., 0] - margin, 0), np.minimum(boxes[..., 1] + margin, in_hw[0])
    c0, c1 = np.maximum(boxes[..., 2] - margin, 0), np.minimum(boxes[..., 3] + margin, in_hw[1])
    return (r1 - r0) * (c1 - c0)
