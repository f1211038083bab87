"""Slots of render windows: every output pixel with its ensemble neighbours, each once."""

from __future__ import annotations

import pytest
import torch

from lmf_cli.models import geometry
from lmf_cli.models.geometry import axis_slots


def _neighbours_by_pixel(n_out: int, n_in: int) -> dict[int, dict[int, tuple[float, float]]]:
    """Per output pixel, its neighbour latents -> (relative coordinate, summed weight), from the
    per-pixel lookup the point queries use."""
    coord = geometry.pixel_centres(n_out, "cpu", torch.float64)
    found = geometry._axis_neighbours(coord, n_in, True, geometry.official_centres(n_out))
    (i0, r0), (i1, r1) = found
    total = r0.abs() + r1.abs()
    w0 = torch.where(total > 0, r1.abs() / total.clamp_min(1e-300), 0.5)
    out: dict[int, dict[int, tuple[float, float]]] = {}
    for p in range(n_out):
        by_lat = out.setdefault(p, {})
        for lat, rel, w in ((int(i0[p]), float(r0[p]), float(w0[p])), (int(i1[p]), float(r1[p]), 1 - float(w0[p]))):
            by_lat[lat] = (rel, by_lat.get(lat, (rel, 0.0))[1] + w)
    return out


@pytest.mark.parametrize(("n_out", "n_in"), [(61, 13), (180, 20), (97, 40), (300, 25), (229, 17), (40, 40)])
@pytest.mark.parametrize("role_rows", [False, True])
def test_window_slots_are_the_pixels_neighbours(n_out, n_in, role_rows, monkeypatch):
    monkeypatch.setattr(geometry, "ROLE_ROWS_MIN_SCALE", 1.0 if role_rows else 1e9)
    expected = _neighbours_by_pixel(n_out, n_in)
    for start, stop in [(0, n_out), (0, 7), (5, 23), (n_out - 11, n_out), (n_out // 3, n_out // 3 + 1)]:
        lat_start = max(0, min(min(expected[p]) for p in range(start, stop)) - 2)
        slots = axis_slots(n_out, n_in, start, stop, lat_start)
        real = slots.taps > 0
        assert slots.out[~real].eq(0).all() and slots.weight[~real].eq(0).all()
        got: dict[int, dict[int, tuple[float, float]]] = {}
        for r, k in real.nonzero().tolist():
            p, lat = start + int(slots.out[r, k]), lat_start + slots.lat0 + int(slots.lat[r])
            rel, w = float(slots.rel[r, k]), float(slots.weight[r, k])
            # a pixel whose two neighbours are one latent (borders): one slot per latent row, two per
            # pair of role rows
            before = got.setdefault(p, {}).get(lat)
            assert before is None or (role_rows and before[0] == rel)
            got[p][lat] = (rel, w + (before[1] if before else 0.0))
        assert sorted(got) == list(range(start, stop))
        for p in range(start, stop):
            assert got[p].keys() == expected[p].keys()
            for lat, (rel, w) in expected[p].items():
                assert got[p][lat] == pytest.approx((rel, w), abs=1e-6)
        assert 0 <= slots.lat0 and int(slots.lat.min()) == 0 and slots.n_latents == int(slots.lat.max()) + 1


def test_role_rows_decode_fewer_slots_at_large_scales(monkeypatch):
    """Rows per latent and role cut fewer padded slots at window edges than rows per latent."""
    def slots_per_pixel(min_scale: float) -> float:
        monkeypatch.setattr(geometry, "ROLE_ROWS_MIN_SCALE", min_scale)
        windows = [axis_slots(3840, 320, a, a + 128) for a in range(0, 3840 - 128, 128)]
        return sum(w.out.numel() for w in windows) / (2 * 128 * len(windows))

    by_role, by_latent = slots_per_pixel(8.0), slots_per_pixel(1e9)
    assert by_role < 1.10 < 1.15 < by_latent


@pytest.mark.parametrize("role_rows", [False, True])
def test_wanted_pairs_are_the_latents_with_a_slot_on_a_wanted_pixel(role_rows, monkeypatch):
    """wanted_pairs reads a pair's rectangle from the mask's summed-area table; the reference looks
    at every slot of every pair."""
    from lmf_cli.engine.render import wanted_pairs

    monkeypatch.setattr(geometry, "ROLE_ROWS_MIN_SCALE", 1.0 if role_rows else 1e9)
    gen = torch.Generator().manual_seed(0)
    rows, cols = axis_slots(229, 17, 20, 90), axis_slots(300, 25, 33, 140)
    counts = []
    for share in (0.0, 0.001, 0.004, 0.02, 1.0):
        mask = torch.rand(70, 107, generator=gen) < share
        hit = mask[rows.out[:, None, :, None], cols.out[None, :, None, :]]
        hit &= (rows.taps > 0)[:, None, :, None] & (cols.taps > 0)[None, :, None, :]
        expected = torch.nonzero(hit.flatten(2).any(-1).flatten()).flatten()
        assert torch.equal(wanted_pairs(rows, cols, mask), expected)
        counts.append(expected.numel())
    assert counts[0] == 0 < counts[1] < counts[2] < counts[3] < counts[4] == rows.n_rows * cols.n_rows


def test_bilinear_window_last_is_bilinear_grid_channels_last():
    """The skip read channels last from the window's own input pixels: bilinear_grid's values (to float32
    rounding: lerp and the sum of two products round differently), at windows inside and at the borders."""
    from lmf_cli.models.geometry import axis_bilinear, bilinear_grid, bilinear_window_last

    image = torch.rand(2, 3, 17, 23, generator=torch.Generator().manual_seed(3))
    for (r0, r1), (c0, c1) in [((0, 200), (0, 276)), ((37, 90), (101, 133)), ((190, 204), (250, 276))]:
        rows, cols = axis_bilinear(204, 17, r0, r1), axis_bilinear(276, 23, c0, c1)
        last = bilinear_window_last(image, rows, cols)
        assert last.shape == (2, r1 - r0, c1 - c0, 3)
        torch.testing.assert_close(last.permute(0, 3, 1, 2), bilinear_grid(image, rows, cols), rtol=0, atol=1e-6)
