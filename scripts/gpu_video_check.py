"""Video speed for the GPU check: a synthetic 1920x1080 clip to 3840x2160 with lmf-edsr and
lmf-lite; frames per second and peak GPU memory, written to OUT/video.json."""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np
import torch

from lmf_cli import EngineOptions, Upscaler
from lmf_cli.jobs.video import upscale_video

FRAMES = 48


def make_clip(path: Path) -> None:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (1080 // 8, 1920 // 8, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
    with av.open(str(path), "w") as c:
        stream = c.add_stream("libx264", rate=24)
        stream.width, stream.height, stream.pix_fmt = 1920, 1080, "yuv420p"
        for i in range(FRAMES):
            frame = av.VideoFrame.from_ndarray(np.roll(base, 4 * i, axis=1), format="rgb24")
            c.mux(stream.encode(frame))
        c.mux(stream.encode(None))


def main(out: Path, work: Path) -> None:
    clip = work / "clip1080.mp4"
    make_clip(clip)
    results = {"gpu": torch.cuda.get_device_name(0), "frames": FRAMES}
    for name in ("lmf-edsr", "lmf-lite"):
        up = Upscaler.load(name, EngineOptions(device="cuda"))
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        result = upscale_video(clip, work / f"{name}_4k.mkv", up, (2160, 3840), codec="libx264", overwrite=True)
        seconds = time.perf_counter() - start
        results[name] = {"fps": result.frames / seconds, "model_fps": result.fps,
                         "peak_vram_mb": torch.cuda.max_memory_allocated() / 2 ** 20}
    (out / "video.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as work:  # the clips stay on the machine; only the figures come back
        main(Path(sys.argv[1]), Path(work))
