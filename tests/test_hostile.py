"""A hostile pass over `lmf upscale` and the Upscaler API: bad files, paths, options and signals.

Every bad input must end as one line, `failed: PATH: reason` (or `error: ...` for a bad option),
with exit code 1 and the batch going on: never a traceback, a partial file or a touched input.
The committed inputs are in tests/bad_inputs/ (see its README); what git cannot keep (folders
named like images, symbolic link loops, FIFOs, permissions) is made here.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from lmf_cli.cli import app
from lmf_cli.errors import InputError, OptionError
from lmf_cli.io.images import inspect_image, probe_image, read_frames, read_image
from lmf_cli.options import EngineOptions

BAD = Path(__file__).parent / "bad_inputs"
runner = CliRunner()


def snapshot(folder: Path) -> dict[str, tuple]:
    """Every entry under a folder, as (kind, bytes, mtime) without following links or opening FIFOs."""
    out = {}
    for p in sorted(folder.rglob("*")):
        st = p.lstat()
        content = p.read_bytes() if p.is_file() and not p.is_symlink() else os.readlink(p) if p.is_symlink() else b""
        out[str(p.relative_to(folder))] = (st.st_mode, content, st.st_mtime_ns)
    return out


def failed_line(output: str, path: Path) -> str:
    lines = [x for x in output.splitlines() if x.startswith(f"failed: {path}: ")]
    assert len(lines) == 1, output
    return lines[0][len(f"failed: {path}: "):]


@contextmanager
def deadline(seconds: int):
    """Fail instead of hanging (a FIFO read blocks until a writer comes)."""
    def expired(signum, frame):
        raise TimeoutError("hung")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def bad_folder(tmp_path, butterfly):
    folder = tmp_path / "bad in é"
    shutil.copytree(BAD, folder)
    (folder / "README.md").unlink()
    (folder / "folder.png").mkdir()  # a directory named like an image
    (folder / "loop.png").symlink_to("loop2.png")
    (folder / "loop2.png").symlink_to("loop.png")
    (folder / "dangling.png").symlink_to("nowhere.png")
    os.mkfifo(folder / "fifo.png")
    Image.fromarray(butterfly).save(folder / "-dash é s.png")  # a leading dash, unicode and spaces
    return folder


def test_every_bad_input_is_one_line_and_the_batch_goes_on(weights, bad_folder, tmp_path):
    before = snapshot(bad_folder)
    out = tmp_path / "out"
    names = ["truncated.png", "truncated.jpg", "empty.png", "text.png", "header_bomb.png", "frames_bomb.png",
             "folder.png", "loop.png", "dangling.png", "fifo.png", "one_pixel.png", "png_bytes.jpg", "-dash é s.png"]
    command = ["upscale", "--scale", "2", "-o", str(out), "--model", str(weights), "--device", "cpu", "--",
               *(str(bad_folder / n) for n in names)]  # after "--", "-dash é s.png" is a file, not an option
    with deadline(240):
        result = runner.invoke(app, command)
    assert result.exit_code == 1
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
    reasons = {
        "truncated.png": "truncated or damaged image", "truncated.jpg": "truncated or damaged image",
        "empty.png": "not an image, or a format lmf cannot read",
        "text.png": "not an image, or a format lmf cannot read",
        "header_bomb.png": "65536 x 65536 is 4,294,967,296 pixels, over the limit of 400,000,000 (--max-pixels)",
        "frames_bomb.png": "2,147,483,647 frames of 4 x 4 are 34,359,738,352 pixels in all, over the limit",
        "folder.png": "no images in this folder",
        "loop.png": "a symbolic link loop (the link leads back to itself)",  # was "no such file or folder"
        "dangling.png": "a broken symbolic link (to nowhere.png, which does not exist)",  # was "no such file ..."
        "fifo.png": "not a regular file (a pipe, device or socket)",  # was "no such file or folder"
    }
    for name, reason in reasons.items():
        assert failed_line(result.output, bad_folder / name).startswith(reason), name
    assert "done 3, skipped 0, failed 10 in" in result.output
    assert Image.open(out / "one_pixel_x2.png").size == (2, 2)
    with Image.open(out / "png_bytes_x2.jpg") as img:  # read by its content, written as its name says
        assert img.format == "JPEG" and img.size == (48, 40)
    assert Image.open(out / "-dash é s_x2.png").size == (96, 80)
    assert sorted(p.name for p in out.iterdir()) == ["-dash é s_x2.png", "one_pixel_x2.png", "png_bytes_x2.jpg"]
    assert snapshot(bad_folder) == before  # nothing written beside the inputs, no input touched


def test_a_folder_of_bad_inputs_skips_what_is_not_a_file(lmf, bad_folder):
    before = snapshot(bad_folder)
    with deadline(240):
        result = lmf(bad_folder, "--scale", "2", "--dry-run")
    assert result.exit_code == 1 and "Traceback" not in result.output
    failed = {p.name for p in bad_folder.iterdir() if f"failed: {p}: " in result.output}
    assert failed == {"truncated.jpg", "empty.png", "text.png", "header_bomb.png", "frames_bomb.png"}
    assert "would write 5, skipped 0, failed 5 in" in result.output  # headers only: truncated.png passes them
    for name in ("folder.png", "loop.png", "dangling.png", "fifo.png"):  # not image files: not listed
        assert str(bad_folder / name) not in result.output
    assert snapshot(bad_folder) == before


def test_extreme_shapes_are_planned_and_upscaled(lmf, tiny, tmp_path):
    result = lmf(BAD / "wide_65536x1.png", "--scale", "2", "-o", tmp_path / "w.png", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "65536 x 1 -> 131072 x 2 (dry run)" in result.output
    assert probe_image(BAD / "wide_65536x1.png") == (65536, 1)
    assert tiny.upscale(np.full((1, 2048), 128, np.uint8), scale=2).shape == (2, 4096)
    assert tiny.upscale(np.full((2048, 1, 3), 9, np.uint8), scale=(1.5, 3)).shape == (3072, 3, 3)
    assert lmf(BAD / "one_pixel.png", "--scale", "7", "-o", tmp_path / "big.png").exit_code == 0
    assert Image.open(tmp_path / "big.png").size == (7, 7)


def test_output_folder_that_is_a_file_is_refused_before_any_work(lmf, butterfly, tmp_path):
    Image.fromarray(butterfly).save(tmp_path / "a.png")
    Image.fromarray(butterfly).save(tmp_path / "b.png")
    (tmp_path / "taken").write_text("a file, not a folder")
    result = lmf(tmp_path / "a.png", tmp_path / "b.png", "--scale", "2", "-o", tmp_path / "taken")
    assert result.exit_code == 1  # was: both upscaled, then "cannot write .../taken/a_x2.png (File exists)"
    assert result.output.strip() == f"error: -o {tmp_path / 'taken'}: {tmp_path / 'taken'} is a file, not a folder"
    result = lmf(tmp_path / "a.png", "--scale", "2", "-o", tmp_path / "taken" / "deeper" / "x.png")
    assert result.exit_code == 1
    assert f"{tmp_path / 'taken'} is a file, not a folder" in result.output and "model" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png", "taken"]


def test_output_into_a_new_nested_folder(lmf, butterfly, tmp_path):
    Image.fromarray(butterfly).save(tmp_path / "a.png")
    result = lmf(tmp_path / "a.png", "--scale", "2", "-o", tmp_path / "new" / "deeper" / "still" / "x.png")
    assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "new" / "deeper" / "still" / "x.png").size == (96, 80)


def test_an_output_name_too_long_for_the_file_system(lmf, butterfly, tmp_path):
    long = tmp_path / ("n" * 250 + ".png")  # the input fits in 255 bytes, its output name does not
    Image.fromarray(butterfly).save(long)
    Image.fromarray(butterfly).save(tmp_path / "fine.png")
    result = lmf(long, tmp_path / "fine.png", "--scale", "2")
    assert result.exception is None or isinstance(result.exception, SystemExit)  # was an OSError traceback
    assert result.exit_code == 1
    assert failed_line(result.output, long).startswith(f"cannot write {long.with_name('n' * 250 + '_x2.png')} (")
    assert "done 1, skipped 0, failed 1" in result.output and (tmp_path / "fine_x2.png").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".part")]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file(lmf, butterfly, tmp_path):
    Image.fromarray(butterfly).save(tmp_path / "locked.png")
    (tmp_path / "locked.png").chmod(0)
    result = lmf(tmp_path / "locked.png", "--scale", "2")
    assert result.exit_code == 1
    assert failed_line(result.output, tmp_path / "locked.png") == "cannot read the file (Permission denied)"


def test_file_system_errors_are_not_called_damaged_images(tmp_path, monkeypatch):
    (tmp_path / "folder.png").mkdir()
    with pytest.raises(InputError) as caught:  # was "truncated or damaged image ([Errno 21] Is a directory...)"
        probe_image(tmp_path / "folder.png")
    assert str(caught.value) == "is a folder, not an image file"
    Image.new("RGB", (4, 4)).save(tmp_path / "locked.png")

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Image, "open", denied)  # what a chmod 000 file gives a user who is not root
    with pytest.raises(InputError) as caught:  # was "truncated or damaged image ([Errno 13] Permission denied)"
        probe_image(tmp_path / "locked.png")
    assert str(caught.value) == "cannot read the file (Permission denied)"


def test_a_fifo_is_refused_not_read(tmp_path):
    os.mkfifo(tmp_path / "pipe.png")
    with deadline(10):  # was: every reader blocked forever, waiting for a writer
        for read in (read_image, probe_image, inspect_image, read_frames):
            with pytest.raises(InputError, match="not a regular file"):
                read(tmp_path / "pipe.png")


def test_sigterm_removes_the_temp_file_and_exits_143(weights, butterfly, tmp_path):
    Image.fromarray(butterfly).save(tmp_path / "a.png")
    script = textwrap.dedent(f"""
        import os, signal, time
        import lmf_cli.io.images as images
        real = images.atomic_write

        def killed_while_writing(path, write):
            def write_then_die(tmp):
                write(tmp)  # the temp file is complete but not yet renamed
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)
            real(path, write_then_die)

        images.atomic_write = killed_while_writing
        from lmf_cli.cli import app
        app(["upscale", {str(tmp_path / "a.png")!r}, "--scale", "2", "--model", {str(weights)!r}, "--device", "cpu"])
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 143, done.stderr  # was -15: killed, with the temp file left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]


# The API -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scale", [np.float32(2), np.int64(2), np.array(2.0), np.array([2.0, 2.0])])
def test_numpy_numbers_are_numbers(tiny, butterfly, scale):
    assert tiny.upscale(butterfly, scale=scale).shape == (80, 96, 3)  # was TypeError: not iterable
    assert tiny.upscale(butterfly, size=np.array([80, 96])).shape == (80, 96, 3)
    assert tiny.upscale(butterfly, size=(80.0, 96.0)).shape == (80, 96, 3)


@pytest.mark.parametrize(("options", "message"), [
    (dict(size=(80.5, 96)), "whole pixels"),  # was silently 80
    (dict(size=("80", "96")), "whole pixels"),  # was ValueError
    (dict(size=80), "whole pixels"),  # was TypeError
    (dict(scale=(2, "x")), "positive number or a \\(y, x\\) pair"),  # was TypeError from numpy
    (dict(scale=1e7), "over the limit of 400,000,000"),  # the pixel limit speaks before the allocator
])
def test_api_refuses_with_a_reason(tiny, butterfly, options, message):
    with pytest.raises(InputError, match=message):
        tiny.upscale(butterfly, **options)


@pytest.mark.parametrize(("fields", "message"), [
    (dict(tile=0), "tile 0: must be a whole number of input pixels, at least 1"),  # was one-pixel tiles
    (dict(tile=-5), "at least 1"),
    (dict(tile=2.5), "whole number"),
    (dict(max_memory=0), "positive number of bytes"),
    (dict(alpha="bicubc"), "use 'model' or 'bicubic'"),  # was silently the model
    (dict(cmsr="balancd"), "choose one of fast, balanced, fine, exact"),
    (dict(cmsr=-1e-5), "MSE threshold"),
    (dict(device="gpu"), "use auto, cpu, cuda, cuda:N or mps"),
    (dict(precision="fp8"), "choose one of auto, fp32, bf16, fp16"),
    (dict(max_pixels=0), "positive whole number of pixels"),
])
def test_engine_options_refuse_with_a_reason_at_construction(fields, message):
    with pytest.raises(OptionError, match=message) as caught:
        EngineOptions(**fields)
    assert caught.value.option == next(iter(fields))  # the CLI names the flag from it


def test_out_of_memory_is_one_line(tiny, butterfly):
    with pytest.raises(InputError, match="out of memory for a 480000000 x 400000000 output"):  # was RuntimeError
        tiny.upscale(butterfly, scale=1e7, options=EngineOptions(max_pixels=10**18))
