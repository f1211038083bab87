"""What the `lmf` command sets for its process (lmf_cli.process): freed memory kept for the next upscale,
short OpenMP spins."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")

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
from lmf_cli.process import describe

assert CliRunner().invoke(app, ["models"]).exit_code == 0
torch.set_num_threads(1)
up = Upscaler.load("lmf-lite", EngineOptions("cpu", precision="fp32"))
image = np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8)
for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    up.upscale(image, scale=4)
print(describe()["freed memory"].replace(" ", "_"), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _third_upscale_faults(keep: str) -> int:
    env = {**os.environ, "LMF_KEEP_MEMORY": keep}
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    said, faults = done.stdout.split()[-2:]
    assert said == ("kept" if keep == "1" else "returned_to_the_system")  # as the benchmark reports it
    return int(faults)


@glibc_only
def test_the_command_keeps_freed_memory_for_the_next_upscale():
    kept = _third_upscale_faults("1")
    assert kept < 1000  # the output and a few buffers at most; the working set is reused
    assert _third_upscale_faults("0") > kept + 1000  # opted out: glibc's defaults, fresh pages again


def test_opting_out_leaves_the_allocator_alone(monkeypatch):
    from lmf_cli.process import keep_freed_memory

    monkeypatch.setenv("LMF_KEEP_MEMORY", "0")
    assert not keep_freed_memory()


SPIN_PROBE = """
import os, sys
from typer.testing import CliRunner
from lmf_cli.cli import app

assert "torch" not in sys.modules
assert CliRunner().invoke(app, ["models"]).exit_code == 0
import torch

print(os.environ.get("GOMP_SPINCOUNT"), "torch" in sys.modules)
"""


@pytest.mark.parametrize(("given", "expected"), [(None, "10000"), ("123", "123")])
def test_the_command_shortens_openmp_spins_before_pytorch_loads(given, expected):
    """Set before PyTorch loads libgomp (which reads it then), and a value the user gave is kept."""
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    if given is not None:
        env["GOMP_SPINCOUNT"] = given
    done = subprocess.run([sys.executable, "-c", SPIN_PROBE], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [expected, "True"]


def test_too_late_once_pytorch_is_loaded():
    import torch  # noqa: F401  (loaded: its OpenMP runtime has read its settings)

    from lmf_cli.process import short_thread_spin

    assert not short_thread_spin()
