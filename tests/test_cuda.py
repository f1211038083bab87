"""GPU against CPU: the same pixels through the PyTorch path on CUDA. Skipped without a GPU;
`scripts/gpu-check` runs these first when one is lent."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmf_cli import EngineOptions, Upscaler

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("arch", ["liif", "lte", "lmliif", "lmlte"])
@pytest.mark.parametrize("scale", [2, 3.5, (2.5, 1.5), 12])  # x12: rows per latent and role
def test_gpu_equals_cpu(official_files, butterfly, arch, scale):
    image = butterfly.astype(np.float32) / 255
    cpu = Upscaler.load(official_files[arch], EngineOptions("cpu", "fp32")).upscale(image, scale=scale)
    gpu = Upscaler.load(official_files[arch], EngineOptions("cuda", "fp32")).upscale(image, scale=scale)
    assert np.abs(cpu - gpu).max() < 1e-3  # TF32 and other kernels: within 1e-3


@pytest.mark.parametrize("arch", ["lmliif", "lmlte"])
def test_gpu_tiles_and_batches_are_exact(official_files, butterfly, arch):
    up = Upscaler.load(official_files[arch], EngineOptions("cuda", "fp32"))
    image = butterfly.astype(np.float32) / 255
    whole = up.upscale(image, scale=3, options=EngineOptions("cuda", "fp32", tile=10_000))
    assert np.abs(whole - up.upscale(image, scale=3, options=EngineOptions("cuda", "fp32", tile=16))).max() < 1e-4
    frames = np.stack([image, image[::-1]])
    assert np.abs(up.upscale_batch(frames, scale=3)[0] - whole).max() < 1e-4


def test_gpu_half_precision_encoder_is_close(official_files, butterfly):
    fp32 = Upscaler.load(official_files["lmliif"], EngineOptions("cuda", "fp32")).upscale(butterfly, scale=2)
    auto = Upscaler.load(official_files["lmliif"], EngineOptions("cuda", "auto"))
    assert auto.precision == "fp16"
    diff = np.abs(auto.upscale(butterfly, scale=2).astype(int) - fp32.astype(int))
    assert diff.mean() < 2


def test_gpu_out_of_memory_backs_off(official_files):
    """A real CUDA out-of-memory error from a tiny memory fraction: the tile is split, not the image lost."""
    up = Upscaler.load(official_files["lmliif"], EngineOptions("cuda", "fp32"))
    image = np.random.default_rng(0).random((512, 512, 3), dtype=np.float32)
    expected = up.upscale(image, scale=2, options=EngineOptions("cuda", "fp32", tile=128))
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(min(1.0, (torch.cuda.memory_allocated() + (96 << 20)) / total))
    try:
        with pytest.warns(UserWarning, match="out of memory"):
            out = up.upscale(image, scale=2, options=EngineOptions("cuda", "fp32", tile=10_000))
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    assert np.abs(out - expected).max() < 1e-4


def test_gpu_tf32_matmuls_would_stay_within_1e3(official_files, butterfly):
    """TF32 matmuls stay off by default (the render MLP's first layer takes sub-pixel offsets);
    this measures what turning them on would change, the bar issue 14 sets for allowing them."""
    up = Upscaler.load(official_files["lmliif"], EngineOptions("cuda", "fp32"))
    image = butterfly.astype(np.float32) / 255
    exact = up.upscale(image, scale=7.5)
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        tf32 = up.upscale(image, scale=7.5)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False
    assert np.abs(exact - tf32).max() < 1e-3


def test_gpu_8_bit_samples_are_the_float_output_rounded(official_files, butterfly):
    """An 8-bit image is rounded to samples on the GPU before its blocks come back (a quarter of the
    bytes): the same bytes as the float output rounded by numpy, and within 1 of the CPU's."""
    up = Upscaler.load(official_files["lmliif"], EngineOptions("cuda", "fp32"))
    samples = up.upscale(butterfly, scale=3.5)
    unit = up.upscale(butterfly.astype(np.float32) / 255, scale=3.5)
    assert samples.dtype == np.uint8
    assert np.array_equal(samples, np.round(unit * 255.0).astype(np.uint8))
    cpu = Upscaler.load(official_files["lmliif"], EngineOptions("cpu", "fp32")).upscale(butterfly, scale=3.5)
    assert np.abs(samples.astype(int) - cpu.astype(int)).max() <= 1
