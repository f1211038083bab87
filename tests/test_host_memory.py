"""Freed memory kept for the next allocation (host_memory): an upscale reuses the pages of the one before."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")

# Three x4 upscales of a 160 x 120 image by lmf-lite in a process of its own, after the `lmf` command has
# run (`models`, which loads nothing); prints the page faults of the third. With glibc's defaults each
# upscale maps its large buffers afresh (4-6k faults here, 90k at 320 x 180 with lmf-edsr).
PROBE = """
import resource
import numpy as np
import torch
from typer.testing import CliRunner
from lmf_cli import EngineOptions, Upscaler
from lmf_cli.cli import app

assert CliRunner().invoke(app, ["models"]).exit_code == 0
torch.set_num_threads(1)
up = Upscaler.load("lmf-lite", EngineOptions("cpu", precision="fp32"))
image = np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8)
for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    up.upscale(image, scale=4)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _third_upscale_faults(keep: str) -> int:
    env = {**os.environ, "LMF_KEEP_MEMORY": keep}
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    return int(done.stdout.split()[-1])


def test_the_command_keeps_freed_memory_for_the_next_upscale():
    kept = _third_upscale_faults("1")
    assert kept < 1000  # the output and a few buffers at most; the working set is reused
    assert _third_upscale_faults("0") > kept + 1000  # opted out: glibc's defaults, fresh pages again


def test_opting_out_leaves_the_allocator_alone(monkeypatch):
    from lmf_cli.host_memory import keep_freed_memory

    monkeypatch.setenv("LMF_KEEP_MEMORY", "0")
    assert not keep_freed_memory()
