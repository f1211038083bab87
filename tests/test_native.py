"""The compiled render kernel against the PyTorch renderer, and its masked (CMSR) form."""

from __future__ import annotations

import contextlib
import platform

import numpy as np
import pytest
import torch

from lmf_cli import models
from lmf_cli.engine import encode_image, native, render_region, upscale_tensor
from lmf_cli.hardware import cpu_flags

SMALL = {"name": "edsr-baseline", "args": {"n_resblocks": 2, "n_feats": 16, "no_upsampling": True}}


def _variant(name: str, **changes) -> models.ImplicitSR:
    spec = models.lmliif_spec(SMALL) if name == "lmliif" else models.lmlte_spec(SMALL)
    spec["args"].update(changes)
    for key in ("hidden_dim", "hidden_depth"):
        if key in changes:
            spec["args"]["imnet_spec"]["args"][key] = spec["args"].pop(key)
    torch.manual_seed(0)
    model = models.make(spec).eval()
    with torch.no_grad():  # latents large enough that every ReLU and modulation matters
        for layer in model.hypernet.linears:
            layer.weight.mul_(3)
    return model


VARIANTS = {
    "lm-liif": lambda: _variant("lmliif"),
    "lm-liif, skip": lambda: _variant("lmliif", bilinear_skip=True),
    "lm-liif, encoder code": lambda: _variant("lmliif", mod_input=False),
    "lm-liif, no ensemble": lambda: _variant("lmliif", local_ensemble=False),
    "lm-liif, width 8, depth 3": lambda: _variant("lmliif", hidden_dim=8, hidden_depth=3),
    "lm-liif, depth 1": lambda: _variant("lmliif", hidden_depth=1),
    "lm-lte": lambda: _variant("lmlte"),
}


@pytest.fixture(scope="module")
def kernel_available():
    if native._library(16) is None:
        pytest.skip("no C compiler: the render kernel cannot be built here")


def _upscale(model, inp, out_hw, monkeypatch, path: str) -> torch.Tensor:
    monkeypatch.setenv("LMF_NATIVE", "1" if path == "kernel" else "0")
    return upscale_tensor(model, inp, out_hw)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("out_hw", [(80, 96), (140, 168), (37, 150)])
def test_kernel_equals_pytorch(kernel_available, butterfly, monkeypatch, variant, out_hw):
    model = VARIANTS[variant]()
    inp = torch.from_numpy(butterfly[:20, :24]).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        assert native.usable(model, inp.device)
        fast = _upscale(model, inp, out_hw, monkeypatch, "kernel")
        slow = _upscale(model, inp, out_hw, monkeypatch, "pytorch")
    assert fast.std() > 0.01  # a real image, not a constant
    assert (fast - slow).abs().max() < 1e-5


@contextlib.contextmanager
def _kernel_built_with(flags: tuple[str, ...], monkeypatch: pytest.MonkeyPatch):
    """The kernel built with these compiler flags alone (into the test's LMF_CACHE_DIR) while inside."""
    monkeypatch.setattr(native, "FLAG_SETS", (flags,))
    native._library.cache_clear()
    try:
        yield
    finally:
        native._library.cache_clear()


@pytest.mark.skipif(not {"avx512f", "avx2", "fma"} <= cpu_flags(), reason="needs a CPU with AVX-512 and AVX2")
@pytest.mark.parametrize("variant", ["lm-liif, skip", "lm-lte"])
def test_the_avx512_and_avx2_forms_give_the_same_bits(kernel_available, butterfly, tmp_path, monkeypatch, variant):
    """A render must not depend on the CPU's vector width: both forms do the same multiply-adds."""
    monkeypatch.setenv("LMF_CACHE_DIR", str(tmp_path))
    model = VARIANTS[variant]()
    inp = torch.from_numpy(butterfly[:20, :24]).permute(2, 0, 1)[None].float() / 127.5 - 1
    renders = []
    for narrower in ((), ("-mno-avx512f",)):
        with _kernel_built_with(("-O3", "-march=native", *narrower, "-fno-math-errno"), monkeypatch), torch.no_grad():
            assert native.usable(model, inp.device)
            renders.append(_upscale(model, inp, (140, 168), monkeypatch, "kernel"))
    assert len(list(tmp_path.rglob("*.so"))) == 2
    assert torch.equal(*renders)


def _blocky_mask(rows: int, cols: int) -> torch.Tensor:
    """Wanted in 7 x 11 blocks (a third of them), as CMSR's levels are: long unwanted runs that
    cross row ends, of lengths around the kernel's 8-byte skip."""
    blocks = torch.from_numpy(np.random.default_rng(2).random((-(-rows // 7), -(-cols // 11))) < 0.35)
    return blocks.repeat_interleave(7, 0)[:rows].repeat_interleave(11, 1)[:, :cols].contiguous()


@pytest.mark.parametrize("pattern", ["scattered", "blocks"])
def test_mask_draws_exactly_the_masked_pixels(kernel_available, butterfly, pattern):
    model = VARIANTS["lm-liif, skip"]()
    inp = torch.from_numpy(butterfly[:20, :24]).permute(2, 0, 1)[None].float() / 127.5 - 1
    out_hw = (100, 120)
    with torch.no_grad():
        g = encode_image(model, inp, out_hw)
        full = render_region(model, g, out_hw, (10, 60), (5, 90))
        mask = (torch.from_numpy(np.random.default_rng(0).random((50, 85)) < 0.3) if pattern == "scattered"
                else _blocky_mask(50, 85))
        g.counts["rendered"] = 0
        part = render_region(model, g, out_hw, (10, 60), (5, 90), mask=mask)
        skip = render_region(model, g, out_hw, (10, 60), (5, 90), mask=torch.zeros_like(mask))
    assert g.counts["rendered"] == int(mask.sum())
    assert torch.equal(part[0][:, mask], full[0][:, mask])  # bit for bit: pixels are independent
    assert torch.equal((part - skip)[0][:, ~mask], torch.zeros(3, int((~mask).sum())))


@pytest.mark.parametrize("cols", [(5, 10), (0, 7), (20, 28), (30, 47)])
def test_narrow_masked_windows_on_two_threads(kernel_available, butterfly, cols):
    """Windows narrower than, as wide as, and just over the kernel's 8-byte mask skip, with rows
    split between two threads (each takes every other row and carries its batch over row ends)."""
    model = VARIANTS["lm-liif, skip"]()
    inp = torch.from_numpy(butterfly[:20, :24]).permute(2, 0, 1)[None].float() / 127.5 - 1
    out_hw, width = (100, 120), cols[1] - cols[0]
    mask = torch.from_numpy(np.random.default_rng(width).random((50, width)) < 0.4)
    mask[7:19] = False  # whole unwanted rows, for one thread and the other
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.no_grad():
            g = encode_image(model, inp, out_hw)
            full = render_region(model, g, out_hw, (10, 60), cols)
            g.counts["rendered"] = 0
            part = render_region(model, g, out_hw, (10, 60), cols, mask=mask)
    finally:
        torch.set_num_threads(threads)
    assert g.counts["rendered"] == int(mask.sum())  # both threads' counts
    assert torch.equal(part[0][:, mask], full[0][:, mask])
    assert not part[0][:, ~mask].any()


def _as_samples(unit: torch.Tensor, peak: float, dtype: np.dtype) -> torch.Tensor:
    """numpy's way from [0, 1] floats to an image's samples (what the API did after rendering)."""
    return torch.from_numpy(np.round(unit.clamp(0, 1).numpy() * peak).astype(dtype))


SAMPLES = [(torch.uint8, 255.0, np.uint8), (torch.uint16, 65535.0, np.uint16)]


BUILD_FORMS = {"native": (), "avx2": ("-mno-avx512f",), "plain": ("-mno-avx",)}


def _built_in_form(form: str, tmp_path, monkeypatch: pytest.MonkeyPatch) -> contextlib.AbstractContextManager:
    """The kernel as the product builds it ("native"), or built for a narrower x86 CPU (AVX2, or no AVX)."""
    if form == "native":
        return contextlib.nullcontext()
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86 build forms")
    monkeypatch.setenv("LMF_CACHE_DIR", str(tmp_path))
    return _kernel_built_with((*native.FLAG_SETS[0], *BUILD_FORMS[form]), monkeypatch)


@pytest.mark.parametrize(("fused", "form"), [(False, "native")] + [(True, form) for form in BUILD_FORMS])
def test_unit_and_sample_outputs_are_the_normalised_one_converted_bit_for_bit(kernel_available, butterfly, fused,
                                                                              form, tmp_path, monkeypatch):
    """`unit` writes (v + 1) * 0.5 in the same pass: the same bits as PyTorch's add and mul after,
    on both renderers (the kernel in each form it is built in on this CPU: its vector stores of four
    pixels side by side, and one by one elsewhere), for plain and masked windows, and for a CMSR coarse
    level's blend; into a uint8 or uint16 view (strided, pixel-interleaved, as the canvas), the bytes
    numpy's clamp, multiply and round give."""
    with _built_in_form(form, tmp_path, monkeypatch):
        _check_units(VARIANTS["lm-liif, skip"](), butterfly, fused, saturates=True)  # 4 pixels a batch
        _check_units(VARIANTS["lm-liif, no ensemble"](), butterfly, fused, saturates=False)  # 16, no skip


def _check_units(model: models.ImplicitSR, butterfly: np.ndarray, fused: bool, saturates: bool) -> None:
    from dataclasses import replace

    from lmf_cli.engine.cmsr import _draw_coarse

    inp = torch.from_numpy(butterfly[:20, :24]).permute(2, 0, 1)[None].float() / 127.5 - 1
    inp[..., :4, :4] = 1.0  # saturated pixels, which render outside [0, 1] and are clamped
    out_hw = (100, 120)
    mask = torch.from_numpy(np.random.default_rng(1).random((50, 85)) < 0.4)

    def interleaved(dtype: torch.dtype) -> torch.Tensor:
        return torch.zeros(1, 50, 85, 3, dtype=dtype).permute(0, 3, 1, 2)

    with torch.no_grad():
        g = replace(encode_image(model, inp, out_hw), fused=fused)
        for wanted in (None, mask):
            normalised = render_region(model, g, out_hw, (10, 60), (5, 90), mask=wanted,
                                       into=torch.full((1, 3, 50, 85), -1.0))
            unit = render_region(model, g, out_hw, (10, 60), (5, 90), mask=wanted,
                                 into=torch.zeros(1, 3, 50, 85), unit=True)
            assert torch.equal(unit, normalised.add(1).mul(0.5))
            assert not saturates or ((unit > 1).any() and (unit < 0).any())  # the clamp matters
            for as_unit, planar in ((False, normalised), (True, unit)):  # a float canvas, pixel-interleaved
                canvas = interleaved(torch.float32).fill_(0.0 if as_unit else -1.0)
                assert torch.equal(render_region(model, g, out_hw, (10, 60), (5, 90), mask=wanted, into=canvas,
                                                 unit=as_unit), planar)
            for dtype, peak, np_dtype in SAMPLES:
                samples = render_region(model, g, out_hw, (10, 60), (5, 90), mask=wanted, into=interleaved(dtype),
                                        unit=True)
                assert samples.dtype == dtype
                expected = _as_samples(unit, peak, np_dtype)
                if wanted is not None:
                    expected = torch.where(wanted, expected, 0)
                assert torch.equal(samples.to(torch.int64), expected.to(torch.int64))
        rects = torch.tensor([[0, 20, 0, 85], [20, 50, 40, 85]])
        outs = [torch.zeros(1, 3, 50, 85) for _ in range(2)] + [interleaved(dtype) for dtype, _, _ in SAMPLES]
        for out, unit in zip(outs, (False, True, True, True), strict=True):
            _draw_coarse(model, g, (40, 48), rects, (10, 5), out, None, unit)
    drawn = torch.zeros(50, 85, dtype=torch.bool)
    drawn[:20], drawn[20:, 40:] = True, True
    assert outs[0][0][:, drawn].std() > 0.01
    assert torch.equal(outs[1][0][:, drawn], outs[0][0][:, drawn].add(1).mul(0.5))
    for out, (_, peak, np_dtype) in zip(outs[2:], SAMPLES, strict=True):
        assert torch.equal(out[0][:, drawn].to(torch.int64),
                           _as_samples(outs[1][0][:, drawn], peak, np_dtype).to(torch.int64))


@pytest.mark.parametrize("form", list(BUILD_FORMS))
def test_blend_is_the_bilinear_sample_in_every_unit(kernel_available, form, tmp_path, monkeypatch):
    """The kernel's blend of a coarse level (AVX-512: 16 columns a step where their taps lie within 16
    coarse columns, AVX2: 8, the rest one by one; the last coarse columns read under a mask), in each
    form the kernel is built in on this CPU: the bilinear sample of the coarse pixels to float rounding,
    and its 8- and 16-bit samples those floats converted bit for bit, clamped (values beyond [-1, 1])
    and with NaN as 0."""
    with _built_in_form(form, tmp_path, monkeypatch):
        for factor in (1.02, 1.5, 3.75, 7.5, 15.0):  # AVX2 and AVX-512 take the vector path from 8/7 and 16/15
            _check_blend(factor)


def _check_blend(factor: float) -> None:
    from lmf_cli.models.geometry import axis_bilinear, bilinear_grid

    out_h, out_w = 40, 203
    coarse_h, coarse_w = max(2, round(out_h / factor)), max(2, round(out_w / factor))
    coarse = torch.from_numpy(np.random.default_rng(3).uniform(-1.3, 1.3, (1, 3, coarse_h, coarse_w))).float()
    coarse[0, 1, 0, -1] = float("nan")
    nan, inf = float("nan"), float("inf")  # early columns too, where whole vectors of samples are made
    coarse[0, :, 1, 1:5] = torch.tensor([[nan, inf, -inf, 1e8], [-1e8, nan, 1e8, -inf], [inf, -1e8, nan, 1e8]])
    rows, cols = axis_bilinear(out_h, coarse_h, 0, out_h), axis_bilinear(out_w, coarse_w, 0, out_w)
    rects = torch.tensor([[0, 17, 0, out_w], [17, out_h, 5, 190], [17, out_h, 190, out_w]])
    drawn = torch.ones(out_h, out_w, dtype=torch.bool)
    drawn[17:, :5] = False
    expected = bilinear_grid(coarse.double(), rows, cols)[0]
    normalised = torch.zeros(1, 3, out_h, out_w)
    native.blend_rects(16, normalised, rects, coarse, rows, cols)
    finite = drawn & expected.isfinite().all(0)
    assert (~finite & drawn).any() and bool(normalised[0][:, ~finite & drawn].isnan().any())
    assert torch.allclose(normalised[0][:, finite].double(), expected[:, finite], rtol=0, atol=1e-6)
    assert (normalised[0][:, ~drawn] == 0).all()
    unit = normalised.add(1).mul(0.5)
    for dtype, peak, np_dtype in SAMPLES:
        samples = torch.zeros(1, out_h, out_w, 3, dtype=dtype).permute(0, 3, 1, 2)
        native.blend_rects(16, samples, rects, coarse, rows, cols, unit=True)
        converted = _as_samples(torch.nan_to_num(unit[0], nan=0.0), peak, np_dtype)
        values = samples[0][:, drawn].to(torch.int64)
        assert torch.equal(values, converted[:, drawn].to(torch.int64))
        assert values.min() == 0 and values.max() == peak  # the clamp matters


@pytest.mark.parametrize("path", ["kernel", "pytorch"])
def test_upscale_to_samples_is_the_float_upscale_rounded(kernel_available, butterfly, monkeypatch, path):
    """A uint8 or uint16 canvas holds the bytes of the float canvas rounded as numpy does, exact and
    under a CMSR schedule, and it is the image in memory (pixel-interleaved: no copy to save it)."""
    from lmf_cli.engine.cmsr import Schedule

    model = VARIANTS["lm-liif, skip"]()
    inp = torch.from_numpy(butterfly[:24, :24]).permute(2, 0, 1)[None].float() / 127.5 - 1
    monkeypatch.setenv("LMF_NATIVE", "1" if path == "kernel" else "0")
    schedule = Schedule((2.0, 4.0), (0.5, 1.0))
    with torch.no_grad():
        for plan in (None, schedule):
            stats: dict[str, int] = {}
            unit = upscale_tensor(model, inp, (200, 200), schedule=plan, stats=stats)
            assert (stats["rendered"] < stats["total"]) == (plan is not None)  # some blocks coarse
            for dtype, peak, np_dtype in SAMPLES:
                samples = upscale_tensor(model, inp, (200, 200), schedule=plan, dtype=dtype)
                assert samples.dtype == dtype and samples.permute(0, 2, 3, 1).is_contiguous()
                assert torch.equal(samples.to(torch.int64), _as_samples(unit, peak, np_dtype).to(torch.int64))


def test_kernel_not_used_where_it_cannot_be(monkeypatch):
    model = VARIANTS["lm-lte"]()
    assert not native.usable(model, torch.device("meta"))
    monkeypatch.setenv("LMF_NATIVE", "0")
    assert not native.usable(model, torch.device("cpu"))
    assert "LMF_NATIVE=0" in native.status()
    no_mod_input = _variant("lmlte", mod_input=False)
    monkeypatch.setenv("LMF_NATIVE", "1")
    assert no_mod_input.fused_mlp(encode_image(no_mod_input, torch.zeros(1, 3, 4, 4), (8, 8)).latents) is None


@pytest.mark.parametrize("variant", ["lm-liif, no ensemble", "lm-lte"])
def test_both_renderers_equal_point_queries(render_path, variant):
    """The grid renderers against the per-point path used in training (which shares no
    grouping code with them); without the local ensemble too."""
    from lmf_cli.models.geometry import make_coord

    model = VARIANTS[variant]()
    torch.manual_seed(0)
    inp = torch.rand(1, 3, 9, 11) * 2 - 1
    big_h, big_w = 25, 31
    with torch.no_grad():
        grid = upscale_tensor(model, inp, (big_h, big_w)) * 2 - 1
        coord = make_coord(big_h, big_w)[None]
        cell = torch.tensor([2 / big_h, 2 / big_w]).expand(1, big_h * big_w, 2)
        points = model(inp, coord, cell).view(1, big_h, big_w, 3).permute(0, 3, 1, 2)
    assert (grid - points).abs().max() < 2e-5


def test_a_missing_or_failing_compiler_means_pytorch(tmp_path, monkeypatch):
    monkeypatch.setenv("LMF_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    assert native._library.__wrapped__(16) is None
    assert not any(tmp_path.rglob("*.so*"))  # no half-written library left behind
    calls = []
    monkeypatch.setattr(native, "_compile", lambda *args: calls.append(args) or False)
    assert native._library.__wrapped__(16) is None
    assert calls == []  # the failures were remembered: no process tries those flags again


def test_the_kernel_is_built_once_into_the_cache(kernel_available, tmp_path, monkeypatch):
    monkeypatch.setenv("LMF_CACHE_DIR", str(tmp_path))
    assert native._library.__wrapped__(8) is not None
    built = list(tmp_path.rglob("*.so"))
    assert len(built) == 1
    assert not list(tmp_path.rglob("*.failed"))  # with the product's first flags, not a fallback
    stamp = built[0].stat().st_mtime_ns
    assert native._library.__wrapped__(8) is not None
    assert built[0].stat().st_mtime_ns == stamp  # loaded from the cache, not rebuilt


def test_the_kernel_is_built_from_the_source_this_process_imported(kernel_available, tmp_path, monkeypatch):
    """A package updated under a long-running process (a kernel with other arguments on disk) must
    not be built and called with this process's argument list: the source is read at import."""
    monkeypatch.setenv("LMF_CACHE_DIR", str(tmp_path))
    changed = tmp_path / "render_kernel.c"
    changed.write_text("void lmf_render(int a) {}\n")  # what a newer version on disk might say
    monkeypatch.setattr(native, "SOURCE", changed)
    lib = native._library.__wrapped__(16)
    assert lib is not None
    built = list(tmp_path.rglob("*.so"))
    assert len(built) == 1 and not list(tmp_path.rglob("kernels/*.c"))  # the temp source is gone
    assert b"lmf_blend_rects" in built[0].read_bytes()  # built from the imported source


def test_a_new_build_clears_week_old_ones(kernel_available, tmp_path, monkeypatch):
    import os
    import time

    monkeypatch.setenv("LMF_CACHE_DIR", str(tmp_path))
    folder = tmp_path / "kernels"
    folder.mkdir()
    old, recent = folder / "render-8-0123456789abcdef.so", folder / "render-16-0123456789abcdef.so"
    for path in (old, recent):
        path.write_bytes(b"an older build")
    week_ago = time.time() - 8 * 86400
    os.utime(old, (week_ago, week_ago))
    assert native._library.__wrapped__(8) is not None
    assert not old.exists() and recent.exists()


def test_models_the_kernel_cannot_run_still_render_right(butterfly, monkeypatch):
    """LM-LTE without mod_input has no kernel form: it must render through PyTorch, into the
    canvas, with the kernel enabled."""
    model = _variant("lmlte", mod_input=False)
    inp = torch.from_numpy(butterfly[:20, :24]).permute(2, 0, 1)[None].float() / 127.5 - 1
    assert not native.usable(model, inp.device)
    with torch.no_grad():
        enabled = _upscale(model, inp, (50, 61), monkeypatch, "kernel")
        disabled = _upscale(model, inp, (50, 61), monkeypatch, "pytorch")
    assert torch.equal(enabled, disabled)


def test_cmsr_when_one_axis_has_lr_pixels_without_outputs(kernel_available, butterfly):
    """Shrinking an axis (possible through the engine, not the API) leaves LR pixels that own
    no output pixel; a level chosen only there must be skipped, not crash."""
    from lmf_cli.engine.cmsr import Schedule

    class OnlyColumnZeroIsCalm(Schedule):
        def levels(self, strength: torch.Tensor) -> torch.Tensor:
            levels = torch.ones_like(strength, dtype=torch.long)  # 1 = full
            levels[:, 0] = 0  # 12 -> 5 columns: LR column 0 holds no output pixel centre
            return levels

    model = VARIANTS["lm-liif"]()
    inp = torch.from_numpy(butterfly[:12, :12]).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        out = upscale_tensor(model, inp, (96, 5), schedule=OnlyColumnZeroIsCalm((2.0,), (0.5,)))
        full = upscale_tensor(model, inp, (96, 5))
    assert torch.equal(out, full)
