"""`--ray`: the same batches and videos on a local Ray instance (2 CPUs) give the local run's files
byte for byte and frame for frame, survive workers that die, and resume either way."""

from __future__ import annotations

import functools
import json
import os
import socket
import subprocess
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

ray = pytest.importorskip("ray")

from test_cli import ICC, chunk, exif_bytes  # noqa: E402
from test_video import make_clip, read_clip  # noqa: E402

from lmf_cli.api import Upscaler  # noqa: E402
from lmf_cli.cli import app  # noqa: E402
from lmf_cli.cluster import WorkerPool, run_video_on, upscale_files  # noqa: E402
from lmf_cli.cluster import pool as pool_module  # noqa: E402
from lmf_cli.cluster.connect import ClusterError  # noqa: E402
from lmf_cli.cluster.pool import plan_shape  # noqa: E402
from lmf_cli.io.video import plan_video, work_dir  # noqa: E402
from lmf_cli.jobs.images import FileOptions, Sizing, expand_inputs, plan_jobs, upscale_file  # noqa: E402
from lmf_cli.options import EngineOptions  # noqa: E402

runner = CliRunner()
VFR = [40, 20, 60, 33, 50, 25, 70, 40, 20, 60, 33, 50, 25, 70]


def test_without_ray_or_a_cluster_the_error_is_one_line(weights, tmp_path, butterfly, monkeypatch):
    """Runs before the module's Ray instance starts: a connected process would keep its connection."""
    Image.fromarray(butterfly).save(tmp_path / "a.png")
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails
    missing = runner.invoke(app, ["upscale", str(tmp_path / "a.png"), "--scale", "2", "--ray", "local",
                                  "--model", str(weights)])
    assert missing.exit_code == 1 and 'pip install "lmf-cli[ray]"' in missing.output
    assert len(missing.output.strip().splitlines()) <= 2 and "Traceback" not in missing.output
    monkeypatch.undo()
    command = [sys.executable, "-m", "lmf_cli", "upscale", str(tmp_path / "a.png"), "--scale", "2", "--model",
               str(weights), "--ray"]
    for address in ("127.0.0.1:1", "ray://127.0.0.1:1"):
        refused = subprocess.run([*command, address], capture_output=True, text=True, timeout=120)
        assert refused.returncode == 1, refused.stderr
        assert f"error: cannot reach the Ray cluster at {address}: connection refused" in refused.stderr
        assert "Traceback" not in refused.stderr and not (tmp_path / "a_x2.png").exists()


def test_pool_shape_follows_the_cluster():
    def node(cpus: int, gpus: int = 0) -> dict:
        return {"Alive": True, "Resources": {"CPU": cpus, **({"GPU": gpus} if gpus else {})}}

    assert plan_shape([node(2)]) == pool_module.PoolShape(2, 1.0, 0.0, 1)  # CI: one actor per core
    assert plan_shape([node(32), node(16)]) == pool_module.PoolShape(12, 4.0, 0.0, 4)
    assert plan_shape([node(16, 2), node(16, 4)]) == pool_module.PoolShape(6, 4.0, 1.0, 4)  # one per GPU
    assert plan_shape([node(16, 2)], gpus=False).num_gpus == 0  # --device cpu
    assert plan_shape([node(2)], workers=1) == pool_module.PoolShape(1, 2.0, 0.0, 2)
    assert plan_shape([node(2)], workers=4) == pool_module.PoolShape(4, 0.5, 0.0, 1)  # more actors than cores


@pytest.fixture(scope="module")
def cluster():
    """One local Ray instance of 2 CPUs for the module; lmf's `--ray local` joins it."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the poisoned loader below
    yield
    ray.shutdown()


def make_tree(root: Path, butterfly: np.ndarray) -> None:
    """8- and 16-bit, gray, alpha, ICC and EXIF (with an orientation), an animation, and one corrupt file."""
    (root / "sub" / "deeper").mkdir(parents=True)
    Image.fromarray(butterfly).save(root / "a.png")
    deep = (np.random.default_rng(0).random((20, 24, 3)) * 65535).astype(np.uint16)
    data = cv2.imencode(".png", deep)[1].tobytes()
    extra = chunk(b"iCCP", b"sRGB\x00\x00" + zlib.compress(ICC)) + chunk(b"eXIf", exif_bytes()[6:])
    (root / "sub" / "deep.png").write_bytes(data[:33] + extra + data[33:])
    alpha = np.tile(np.linspace(0, 255, 48).astype(np.uint8), (40, 1))
    Image.fromarray(np.dstack([butterfly, alpha]), "RGBA").save(root / "sub" / "alpha.png")
    Image.fromarray(butterfly).save(root / "sub" / "cam.jpg", quality=95, exif=exif_bytes(6), icc_profile=ICC)
    Image.fromarray(butterfly).convert("L").save(root / "sub" / "deeper" / "gray.png")
    frames = [Image.fromarray(np.roll(butterfly, 4 * i, axis=1)) for i in range(3)]
    frames[0].save(root / "anim.gif", save_all=True, append_images=frames[1:], duration=[80, 120, 60], loop=0)
    good = (root / "a.png").read_bytes()
    (root / "sub" / "truncated.png").write_bytes(good[: len(good) // 2])  # its header plans; decoding fails


def outputs(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def failures(output: str) -> list[str]:
    return sorted(line for line in output.splitlines() if line.startswith("failed:"))


def test_a_tree_on_ray_equals_the_local_run_byte_for_byte(cluster, weights, tmp_path, butterfly):
    tree = tmp_path / "tree"
    make_tree(tree, butterfly)
    args = ["upscale", str(tree), "-r", "--scale", "2", "--model", str(weights), "--device", "cpu"]
    local = runner.invoke(app, [*args, "-o", str(tmp_path / "local")])
    remote = runner.invoke(app, [*args, "-o", str(tmp_path / "ray"), "--ray", "local"])
    assert local.exit_code == remote.exit_code == 1, remote.output
    assert "Ray worker" in remote.output
    assert failures(remote.output) == failures(local.output) != []
    assert "truncated.png: truncated or damaged image" in failures(remote.output)[0]
    assert "done 6, skipped 0, failed 1" in remote.output and "done 6, skipped 0, failed 1" in local.output
    written = outputs(tmp_path / "ray")
    assert sorted(written) == ["a_x2.png", "anim_x2.gif", "sub/alpha_x2.png", "sub/cam_x2.jpg", "sub/deep_x2.png",
                               "sub/deeper/gray_x2.png"]
    assert written == outputs(tmp_path / "local")
    with Image.open(tmp_path / "ray" / "sub" / "deep_x2.png") as deep:
        assert deep.info["icc_profile"] == ICC and deep.getexif()[0x010F] == "LMF Camera"
    again = runner.invoke(app, [*args, "-o", str(tmp_path / "ray"), "--ray", "local"])
    assert again.exit_code == 1 and "done 0, skipped 6, failed 1" in again.output  # skip-existing, as locally


def poisoned(weights: Path) -> Upscaler:
    """An Upscaler whose process dies on 21-row images: a file that kills every worker it is given."""

    class Poisoned(Upscaler):
        def upscale(self, image, *args, **kwargs):
            if image.shape[0] == 21:
                os._exit(1)
            return super().upscale(image, *args, **kwargs)

    loaded = Upscaler.load(weights, EngineOptions("cpu", "fp32"))
    return Poisoned(loaded.loaded, EngineOptions("cpu", "fp32"))


def mixed(weights: Path, claim: Path) -> Upscaler:
    """The first worker to load renders in fp32, the others in bf16: `--precision auto` on a cluster
    whose nodes do and do not have bf16 units."""
    try:
        os.close(os.open(claim, os.O_CREAT | os.O_EXCL))
        precision = "fp32"
    except FileExistsError:
        precision = "bf16"
    return Upscaler.load(weights, EngineOptions("cpu", precision))


def test_workers_that_would_render_differently_stop_the_pool(cluster, weights, tmp_path):
    """A segment or image must not depend on which node rendered it: a worker whose precision differs
    from the pool's stops the work with a line that says how to choose one."""
    with WorkerPool.start("local", functools.partial(mixed, weights, tmp_path / "claim")) as pool:
        first = pool.facts["precision"]  # whichever answered first
        with pytest.raises(ClusterError) as refused:
            list(pool.map(range(4), lambda actor, _: actor.describe.remote()))
    other, host = {"fp32": "bf16", "bf16": "fp32"}[first], socket.gethostname()
    assert str(refused.value).startswith(f"the Ray workers would not render alike: precision {other} on {host} "
                                         f"against {first} on {host}; choose one with --device and --precision")


def test_workers_that_die_are_replaced_and_their_work_retried(cluster, weights, tmp_path, butterfly, monkeypatch):
    """Every actor killed during a batch: Ray restarts them and reruns their calls, and every output is
    the local one. A file that kills its worker every time fails after Ray's retries; the rest goes on."""
    monkeypatch.setattr(pool_module, "MAX_TASK_RETRIES", 1)  # two deaths per poisoned call keep this short
    rng = np.random.default_rng(1)
    for i in range(8):
        Image.fromarray((rng.random((64, 80, 3)) * 255).astype(np.uint8)).save(tmp_path / f"f{i}.png")
    Image.fromarray(butterfly[:21]).save(tmp_path / "poison.png")
    jobs = expand_inputs([str(tmp_path)], False, None)
    plan_jobs(jobs, Sizing(scale=(2.0, 2.0), uniform=True), 400_000_000, None, None, tmp_path / "out", False, False)
    assert len(jobs) == 9
    options = FileOptions()
    killed, ended = [], []
    with WorkerPool.start("local", functools.partial(poisoned, weights)) as pool:
        first = {ray.get(actor.describe.remote())["pid"] for actor in pool.actors}

        def done(job, notes):
            ended.append(job)
            if len(ended) == 2 and not killed:  # the other worker is in the middle of a file
                for actor in pool.actors:
                    ray.kill(actor, no_restart=False)
                killed.append(True)

        upscale_files(pool, jobs, options, on_done=done)
        after = {ray.get(actor.describe.remote())["pid"] for actor in pool.actors}
    assert killed and not first & after and len(ended) == 9
    by_name = {job.source.name: job for job in jobs}
    assert by_name["poison.png"].status == "failed"
    assert "a Ray worker died 2 times on it" in by_name["poison.png"].reason
    tiny = Upscaler.load(weights, EngineOptions("cpu", "fp32"))
    for i in range(8):
        job = by_name[f"f{i}.png"]
        assert job.status == "done", job.reason
        ours = job.target.read_bytes()
        job.target = tmp_path / "local" / job.target.name
        upscale_file(job, tiny, options)
        assert ours == job.target.read_bytes()
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.endswith(".part")]


@pytest.fixture(scope="module")
def clip_and_local(weights, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ray-video")
    clip = make_clip(folder / "clip.mkv", VFR)
    local = folder / "local.mkv"
    result = runner.invoke(app, ["video", str(clip), "-o", str(local), *VIDEO_ARGS, "--model", str(weights)])
    assert result.exit_code == 0, result.output
    return clip, read_clip(local)


# ffv1, as the local resume tests: the decoded frames are then the upscaled frames themselves, which is what a
# cluster must reproduce. libx264's macroblock-tree rate control reads memory it has not written on frames this
# small (the same 96 x 64 frames gave three bitstreams under three malloc fill patterns; mbtree=0 or bframes=0:
# one), so two x264 encodes of equal frames in two processes may differ.
VIDEO_ARGS = ["--scale", "2", "--codec", "ffv1", "--segment-frames", "4", "--device", "cpu"]


def test_video_on_ray_equals_the_local_run_frame_for_frame(cluster, weights, clip_and_local, tmp_path):
    clip, local = clip_and_local
    dst = tmp_path / "ray.mkv"
    result = runner.invoke(app, ["video", str(clip), "-o", str(dst), *VIDEO_ARGS, "--model", str(weights),
                                 "--ray", "local"])
    assert result.exit_code == 0, result.output
    assert "Ray worker" in result.output and "14 frames" in result.output
    out = read_clip(dst)
    assert out == local  # frame hashes and timestamps, audio and subtitle spans, cues, chapters, tags
    assert out["streams"] == [("video", "ffv1"), ("audio", "aac"), ("subtitle", "srt")]
    assert len(set(out["hashes"])) == len(VFR) and not work_dir(dst).exists()


def test_an_interrupted_cluster_run_resumes_on_ray_or_locally(cluster, weights, clip_and_local, tmp_path):
    """Ctrl-C keeps the finished segments; `--resume` continues on Ray or locally. Segments finish in any
    order on a cluster: the local resume fills the gaps (here: the first segment) before going on."""
    clip, local = clip_and_local
    plan = plan_video(clip, 2.0, codec="ffv1", segment_frames=4)

    def interrupt(progress):
        if progress.segments >= 2:
            raise KeyboardInterrupt

    load = functools.partial(Upscaler.load, str(weights), EngineOptions("cpu", "fp32"))
    with WorkerPool.start("local", load) as pool:
        for name in ("on-ray.mkv", "locally.mkv"):
            with pytest.raises(KeyboardInterrupt):  # workers read the input by its path, as over the object store limit
                run_video_on(pool, plan, tmp_path / name, progress=interrupt, ship_limit=0)
            assert not (tmp_path / name).exists()
            kept = sorted(p.name for p in work_dir(tmp_path / name).iterdir())
            assert kept[:2] == ["frames.json", "manifest.json"] and len(kept) >= 4, kept
    manifest_path = work_dir(tmp_path / "locally.mkv") / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    first = manifest["segments"].pop(0)  # as if the second segment had finished before the first
    (manifest_path.parent / first["file"]).unlink()
    manifest_path.write_text(json.dumps(manifest))
    base = ["video", str(clip), *VIDEO_ARGS, "--model", str(weights), "--resume"]
    resumed = runner.invoke(app, [*base, "-o", str(tmp_path / "on-ray.mkv"), "--ray", "local"])
    assert resumed.exit_code == 0 and "resumed)" in resumed.output, resumed.output
    assert read_clip(tmp_path / "on-ray.mkv") == local
    resumed = runner.invoke(app, [*base, "-o", str(tmp_path / "locally.mkv")])
    assert resumed.exit_code == 0 and "resumed)" in resumed.output, resumed.output
    assert read_clip(tmp_path / "locally.mkv") == local
