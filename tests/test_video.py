"""`lmf video` end to end on tiny clips made here with PyAV (video + AAC + subtitles), with a
tiny random-weight LM-LIIF, so nothing depends on trained weights or an ffmpeg binary."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from typer.testing import CliRunner

from lmf_cli.api import Upscaler
from lmf_cli.cli import app
from lmf_cli.errors import InputError
from lmf_cli.io.video import plan_video, work_dir
from lmf_cli.jobs import video as video_job
from lmf_cli.jobs.video import upscale_video
from lmf_cli.models import zoo
from lmf_cli.options import EngineOptions

W, H, FRAMES = 48, 32, 14
SRT = "1\n00:00:00,100 --> 00:00:00,300\nhello\n\n2\n00:00:00,400 --> 00:00:00,500\nworld\n"
runner = CliRunner()


def frame_pixels(i: int, h: int = H, w: int = W) -> np.ndarray:
    """A moving gradient with texture: every frame differs, so order and skips show."""
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([(x * 5 + i * 9) % 256, (y * 7 + i * 5) % 256, ((x + y) * 3 + i * 11) % 256], axis=2)
    return img.astype(np.uint8)


def make_clip(path: Path, durations: list[int], *, codec: str = "libx264", pix_fmt: str = "yuv420p",
              audio: bool = True, subtitles: bool = True, rotation: int | None = None) -> Path:
    """Video frames lasting `durations` ms each, AAC audio as long as the video, and an SRT
    subtitle stream remuxed from a .srt file; BT.709 colour tags, a title, a language and
    (when longer than 0.3 s) two chapters."""
    tb = Fraction(1, 1000)
    srt = path.with_suffix(".srt")
    srt.write_text(SRT)
    with av.open(str(srt)) as sub_in, av.open(str(path), "w") as out:
        video = out.add_stream(codec, rate=24)
        video.width, video.height, video.pix_fmt = W, H, pix_fmt
        video.time_base = video.codec_context.time_base = tb
        video.color_primaries = video.color_trc = video.colorspace = 1  # BT.709
        video.color_range = 1
        if rotation is not None:
            video.set_display_rotation(rotation)
        sound = out.add_stream("aac", rate=48000) if audio else None
        if sound is not None:
            sound.layout = "stereo"
            sound.metadata["language"] = "fra"
        out.metadata["title"] = "lmf test"
        text = out.add_stream_from_template(sub_in.streams.subtitles[0]) if subtitles else None
        pts = 0
        deep = "10" in pix_fmt
        if sum(durations) > 300:
            out.set_chapters([{"id": i + 1, "start": lo, "end": hi, "time_base": tb, "metadata": {"title": name}}
                              for i, (lo, hi, name) in enumerate([(0, 300, "one"), (300, sum(durations), "two")])])
        for i, ms in enumerate(durations):
            rgb = frame_pixels(i)
            frame = (av.VideoFrame.from_ndarray(rgb.astype(np.uint16) * 257, format="rgb48le") if deep
                     else av.VideoFrame.from_ndarray(rgb, format="rgb24"))
            frame = frame.reformat(format=pix_fmt, dst_colorspace="ITU709", dst_color_range="MPEG")
            frame.pts, frame.time_base, frame.duration = pts, tb, ms
            out.mux(video.encode(frame))
            pts += ms
        out.mux(video.encode(None))
        if sound is not None:
            mux_audio(out, sound, 48 * pts, lambda n: np.full((2, n), 0.1, np.float32))
        if text is not None:
            mux_subtitles(out, sub_in, text)
    return path


def mux_audio(out: av.container.OutputContainer, sound: av.audio.stream.AudioStream, samples: int,
              block: Callable[[int], np.ndarray]) -> None:
    """`samples` of 48 kHz stereo audio into a test clip, 1024 at a time, each block made by `block(n)`
    in the stream's sample format."""
    done = 0
    while done < samples:
        n = min(1024, samples - done)
        chunk = av.AudioFrame.from_ndarray(block(n), format=sound.format.name, layout="stereo")
        chunk.sample_rate, chunk.pts = 48000, done
        out.mux(sound.encode(chunk))
        done += n
    out.mux(sound.encode(None))


def mux_subtitles(out: av.container.OutputContainer, sub_in: av.container.InputContainer,
                  text: av.subtitles.stream.SubtitleStream) -> None:
    """The cues of an opened .srt into a test clip's subtitle stream."""
    for packet in sub_in.demux(sub_in.streams.subtitles[0]):
        if packet.dts is not None:
            packet.stream = text
            out.mux(packet)


def read_clip(path: Path) -> dict:
    """What a player sees: stream kinds and codecs, video frames (time, size, pixel hash),
    each stream's packet span in seconds, colour tags and rotation."""
    with av.open(str(path)) as c:
        media = [s for s in c.streams if s.type in ("video", "audio", "subtitle")]  # not MP4's chapter track
        info: dict = {"streams": [(s.type, s.codec_context.name) for s in media], "span": {},
                      "title": c.metadata.get("title"), "languages": [s.language for s in c.streams.audio],
                      "chapters": [(round(float(ch["start"] * ch["time_base"]), 3),
                                    round(float(ch["end"] * ch["time_base"]), 3), ch["metadata"].get("title"))
                                   for ch in c.chapters()]}
        for s in media:
            if s.type == "video":
                continue
            packets = [p for p in c.demux(s) if p.pts is not None]
            if s.type == "subtitle":  # only cues with text: mov_text also stores the gaps between them
                packets = [p for p in packets if (cue := s.codec_context.decode2(p)) is not None and len(cue)]
                info["cues"] = [(round(float(p.pts * s.time_base), 3), round(float((p.pts + p.duration) * s.time_base),
                                 3)) for p in packets]
            info["span"][s.type] = (float(packets[0].pts * s.time_base),
                                    float((packets[-1].pts + packets[-1].duration) * s.time_base)) if packets else None
            c.seek(0)
        video = c.streams.video[0]
        frames = list(c.decode(video))
    info["times"] = [round(float(f.pts * f.time_base), 4) for f in frames]
    info["size"] = (frames[0].width, frames[0].height)
    info["format"] = frames[0].format.name
    # the visible samples only: a plane's buffer also holds the padding at the end of each row, whatever
    # the decoder's pooled buffers held before (it made two decodes of one file hash differently)
    info["hashes"] = [hashlib.md5(f.to_ndarray().tobytes()).hexdigest() for f in frames]
    info["colour"] = (frames[0].color_primaries, frames[0].color_trc, frames[0].colorspace, frames[0].color_range)
    info["rotation"] = frames[0].rotation
    return info


@pytest.fixture(scope="module")
def tiny(official_files) -> Upscaler:
    return Upscaler.load(official_files["lmliif"], EngineOptions("cpu", "fp32"))


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("clips")
    return {"cfr": make_clip(folder / "cfr.mkv", [42] * FRAMES),
            "vfr": make_clip(folder / "vfr.mkv", [40, 20, 60, 33, 50, 25, 70, 40, 20, 60, 33, 50, 25, 70])}


def no_leftovers(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.name.startswith(".")]


def test_cfr_clip_keeps_timestamps_audio_subtitles_and_colour(tiny, clips, tmp_path):
    src = read_clip(clips["cfr"])
    dst = tmp_path / "out.mkv"
    result = upscale_video(clips["cfr"], dst, tiny, 2.0, codec="libx264", segment_frames=5)
    out = read_clip(dst)
    assert out["size"] == (2 * W, 2 * H)
    assert result.frames == len(out["times"]) == FRAMES
    assert out["times"] == src["times"]
    assert out["streams"] == src["streams"] == [("video", "h264"), ("audio", "aac"), ("subtitle", "srt")]
    assert out["span"] == src["span"]
    assert out["span"]["subtitle"] == (0.1, 0.5)
    assert out["colour"] == src["colour"] == (1, 1, 1, 1)
    assert (out["title"], out["languages"]) == (src["title"], src["languages"]) == ("lmf test", ["fra"])
    assert out["chapters"] == src["chapters"] == [(0.0, 0.3, "one"), (0.3, 0.588, "two")]
    assert no_leftovers(tmp_path)


def test_vfr_timestamps_survive_and_mp4_gets_mov_text(tiny, clips, tmp_path):
    src = read_clip(clips["vfr"])
    dst = tmp_path / "out.mp4"
    plan = plan_video(clips["vfr"], 2.0, suffix=".mp4", codec="libx264", segment_frames=4)
    assert any("re-encoded to mov_text" in note for note in plan.notes)
    upscale_video(clips["vfr"], dst, tiny, 2.0, codec="libx264", segment_frames=4)
    out = read_clip(dst)
    assert len(set(np.diff(src["times"]).round(3))) > 3  # the input really is VFR
    assert out["times"] == src["times"]
    assert out["streams"] == [("video", "h264"), ("audio", "aac"), ("subtitle", "mov_text")]
    assert out["span"]["audio"] == pytest.approx(src["span"]["audio"], abs=1e-3)
    assert out["cues"] == src["cues"] == [(0.1, 0.3), (0.4, 0.5)]


def test_interrupted_run_resumes_to_the_same_file(tiny, clips, tmp_path):
    straight = tmp_path / "straight.mkv"
    upscale_video(clips["vfr"], straight, tiny, 2.0, codec="ffv1", segment_frames=3)

    dst = tmp_path / "resumed.mkv"

    def interrupt(p):
        if p.segments >= 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        upscale_video(clips["vfr"], dst, tiny, 2.0, codec="ffv1", segment_frames=3, progress=interrupt)
    assert not dst.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".part")]
    parts = sorted(p.name for p in work_dir(dst).iterdir())
    assert "manifest.json" in parts and "segment-00001.bin" in parts

    seen = []
    result = upscale_video(clips["vfr"], dst, tiny, 2.0, codec="ffv1", segment_frames=3, resume=True,
                           progress=seen.append)
    assert result.resumed_frames >= 6 and seen[0].done == result.resumed_frames + 1
    assert seen[-1].done == seen[-1].total == FRAMES and seen[-1].out_bytes > 0
    a, b = read_clip(straight), read_clip(dst)
    assert len(b["times"]) == FRAMES
    assert (b["times"], b["hashes"], b["span"]) == (a["times"], a["hashes"], a["span"])
    assert len(set(b["hashes"])) == FRAMES  # every frame differs: a skipped or repeated frame would show
    assert not work_dir(dst).exists()


@pytest.mark.skipif("libsvtav1" not in av.codecs_available, reason="this FFmpeg build has no SVT-AV1")
def test_webm_gets_av1_and_reencodes_what_it_cannot_hold(tiny, clips, tmp_path):
    plan = plan_video(clips["cfr"], 2.0, suffix=".webm")
    assert plan.codec == "libsvtav1"
    assert [(s.kind, s.action, s.codec) for s in plan.streams] == [("audio", "encode", "libopus"),
                                                                   ("subtitle", "encode", "webvtt")]
    upscale_video(clips["cfr"], tmp_path / "out.webm", tiny, 2.0)
    src, out = read_clip(clips["cfr"]), read_clip(tmp_path / "out.webm")
    assert out["streams"] == [("video", "libdav1d"), ("audio", "opus"), ("subtitle", "webvtt")]
    assert out["times"] == src["times"] and out["cues"] == src["cues"]
    assert out["span"]["audio"][1] == pytest.approx(src["span"]["audio"][1], abs=0.03)


def test_ten_bit_input_is_upscaled_through_sixteen_bits(tiny, tmp_path):
    src = make_clip(tmp_path / "deep.mkv", [40] * 4, codec="ffv1", pix_fmt="yuv420p10le", audio=False,
                    subtitles=False)
    dtypes = []

    class Spy:
        def __getattr__(self, name):
            return getattr(tiny, name)

        def upscale_sequence(self, frames, **kwargs):
            dtypes.append(frames.dtype)
            return tiny.upscale_sequence(frames, **kwargs)

    upscale_video(src, tmp_path / "deep_x2.mkv", Spy(), 2.0, codec="libx265")
    out = read_clip(tmp_path / "deep_x2.mkv")
    assert set(dtypes) == {np.dtype(np.uint16)}
    assert out["format"] == "yuv420p10le" and out["streams"] == [("video", "hevc")]


def test_start_end_cut_every_stream_and_start_at_zero(tiny, clips, tmp_path):
    dst = tmp_path / "cut.mkv"
    upscale_video(clips["cfr"], dst, tiny, 1.5, codec="libx264", start=0.2, end=0.45)
    out = read_clip(dst)
    kept = [t for t in read_clip(clips["cfr"])["times"] if 0.2 <= t < 0.45]
    assert out["times"] == [round(t - 0.2, 4) for t in kept]
    assert out["size"] == (72, 48)
    lo, hi = out["span"]["audio"]
    assert lo == pytest.approx(0, abs=0.03) and hi == pytest.approx(0.25, abs=0.03)
    assert out["span"]["subtitle"] == pytest.approx((0.0, 0.25))  # "hello" was on screen at the cut; cut at --end
    assert out["chapters"] == [(0.0, 0.1, "one"), (0.1, 0.25, "two")]


def test_rotation_is_kept_and_sizes_follow_the_display(tiny, tmp_path):
    src = make_clip(tmp_path / "phone.mp4", [40] * 3, rotation=90, subtitles=False)
    plan = plan_video(src, lambda hw: (hw[0], 2 * hw[1]), suffix=".mp4")  # twice as wide on screen
    assert plan.display_in == (W, H) and plan.display_out == (W, 2 * H) and plan.out_hw == (2 * H, W)
    upscale_video(src, tmp_path / "phone_x2.mp4", tiny, (2 * W, 2 * H))  # (height, width) on screen
    out = read_clip(tmp_path / "phone_x2.mp4")
    assert out["rotation"] == 90 and out["size"] == (2 * W, 2 * H)  # stored frames: width 2W, height 2H
    assert out["colour"] == (1, 1, 1, 1)


def test_odd_sizes_are_rounded_up_to_even_for_yuv420(clips):
    plan = plan_video(clips["cfr"], (33, 51), codec="libx264")
    assert plan.out_hw == (34, 52)
    assert any("rounded up to 52 x 34" in note for note in plan.notes)
    assert plan_video(clips["cfr"], (33, 51), codec="ffv1", pix_fmt="yuv444p").out_hw == (33, 51)


def test_clear_errors(clips, tmp_path, monkeypatch):
    text = tmp_path / "notes.txt"
    text.write_text("not a video")
    audio_only = make_clip(tmp_path / "a.mkv", [40] * 2, subtitles=False)
    with av.open(str(audio_only)) as inp, av.open(str(tmp_path / "sound.mka"), "w") as out:
        stream = out.add_stream_from_template(inp.streams.audio[0])
        for packet in inp.demux(inp.streams.audio[0]):
            if packet.dts is not None:
                packet.stream = stream
                out.mux(packet)
    with pytest.raises(InputError, match="notes.txt: not a readable video"):
        plan_video(text, 2.0)
    with pytest.raises(InputError, match="sound.mka: no video stream"):
        plan_video(tmp_path / "sound.mka", 2.0)
    with pytest.raises(InputError, match="--codec vp9: choose one of"):
        plan_video(clips["cfr"], 2.0, codec="vp9")
    with pytest.raises(InputError, match="webm files cannot hold libx264"):
        plan_video(clips["cfr"], 2.0, suffix=".webm", codec="libx264")
    with pytest.raises(InputError, match="only enlarges"):
        plan_video(clips["cfr"], (16, 16))
    monkeypatch.setattr(av, "codecs_available", av.codecs_available - {"libx264"})
    with pytest.raises(InputError, match=r"encoder libx264 is not in this FFmpeg build .*available: libx265"):
        plan_video(clips["cfr"], 2.0, codec="libx264")


def test_cli_names_output_refuses_to_overwrite_and_resumes(official_files, clips, tmp_path):
    src = tmp_path / "clip.mkv"
    src.write_bytes(clips["cfr"].read_bytes())
    args = ["video", str(src), "--scale", "2", "--codec", "ffv1", "--model", str(official_files["lmliif"]),
            "--device", "cpu"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "48 x 32 -> 96 x 64" in result.output and "wrote" in result.output
    assert read_clip(tmp_path / "clip_x2.mkv")["size"] == (96, 64)
    again = runner.invoke(app, args)
    assert again.exit_code == 1 and "exists (--overwrite replaces it)" in again.output
    resumed = runner.invoke(app, [*args, "--overwrite", "--resume", "--start", "0.1"])
    assert resumed.exit_code == 0, resumed.output
    assert len(read_clip(tmp_path / "clip_x2.mkv")["times"]) == sum(t >= 0.1 for t in read_clip(src)["times"])
    bad = runner.invoke(app, ["video", str(src), "--scale", "2", "--codec", "nope"])
    assert bad.exit_code == 1 and "--codec nope: choose one of" in bad.output


def test_cli_default_model_on_cpu_and_ctrl_c(official_files, clips, tmp_path, monkeypatch):
    monkeypatch.setattr(zoo, "shipped_path", lambda name: None)
    missing = runner.invoke(app, ["video", str(clips["cfr"]), "-o", str(tmp_path / "a.mkv"), "--scale", "2",
                                  "--device", "cpu"])
    assert missing.exit_code == 1 and "model 'lmf-real-lite' has no trained weights" in missing.output

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(video_job, "run_video", interrupted)
    result = runner.invoke(app, ["video", str(clips["cfr"]), "-o", str(tmp_path / "b.mkv"), "--scale", "2",
                                 "--model", str(official_files["lmliif"]), "--device", "cpu"])
    assert result.exit_code == 130
    assert "interrupted: no output written" in result.output  # and nothing to resume: no segment was finished
    assert "no segment was finished" in result.output and "--resume" not in result.output


def test_batched_frames_equal_single_frames(tiny, clips, tmp_path):
    """Frames upscaled several at a time (one encoder call) give the frames of a one-by-one run."""
    outputs = {}
    for batch in (1, 3):
        dst = tmp_path / f"b{batch}.mkv"
        seen = []
        upscale_video(clips["vfr"], dst, tiny, 2.0, codec="ffv1", segment_frames=4, batch=batch, progress=seen.append)
        assert seen[-1].done == FRAMES
        with av.open(str(dst)) as c:
            outputs[batch] = [f.to_ndarray(format="rgb24").astype(int) for f in c.decode(c.streams.video[0])]
    assert len(outputs[1]) == len(outputs[3]) == FRAMES
    assert max(np.abs(a - b).max() for a, b in zip(outputs[1], outputs[3], strict=True)) <= 1
