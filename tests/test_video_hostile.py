"""`lmf video` against inputs, settings and events that used to fail late, lose work or say too
little. Planning and muxing: PCM without a channel layout, streams a container lists but cannot
write, out-of-range --crf, subtitles past --end, FFmpeg's error numbers, frames too large for the
encoder (no model runs there: blank frames go through the real segment writer and mux). The job:
read-only folders, a second command on the same output, reruns that would throw finished segments
away, -o a folder, streams that change size midway, corrupt packets, SIGTERM, an unbounded --batch,
-q, and progress in a log file (the tiny model, through the command line).

Clips are made here with PyAV."""

from __future__ import annotations

import io
import json
import os
import re
import struct
import subprocess
import sys
import textwrap
from dataclasses import replace
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from av.error import FFmpegError
from click.testing import Result
from test_video import mux_audio, mux_subtitles
from typer.testing import CliRunner

from lmf_cli.cli import app
from lmf_cli.errors import InputError, option_name
from lmf_cli.io.video import streams as stream_planning
from lmf_cli.io.video.decode import DecodeReport, frames_after
from lmf_cli.io.video.errors import short_error
from lmf_cli.io.video.mux import mux
from lmf_cli.io.video.plan import VideoPlan, plan_video
from lmf_cli.io.video.segments import MANIFEST, Manifest, SegmentWriter, headers
from lmf_cli.io.video.streams import StreamPlan

SRT = "1\n00:00:00,100 --> 00:00:00,200\nearly\n\n2\n00:00:00,300 --> 00:00:01,020\nlate\n"


def needs(*codecs: str) -> None:
    missing = [c for c in codecs if c not in av.codecs_available]
    if missing:
        pytest.skip(f"this FFmpeg build has no {', '.join(missing)}")


def make_clip(path: Path, *, size: tuple[int, int] = (48, 32), frames: int = 5, rate: int = 25,
              audio: str | None = None, audio_seconds: float = 1.0, subtitles: bool = False) -> Path:
    """A libx264 clip (`size` is width, height) with, optionally, stereo PCM audio of `audio`
    codec (pcm_s16le, pcm_u8, ...) and an SRT subtitle stream whose second cue lasts to 1.02 s."""
    needs("libx264", *([audio] if audio else []))
    srt = path.with_suffix(".srt")
    srt.write_text(SRT)
    w, h = size
    with av.open(str(srt)) as sub_in, av.open(str(path), "w") as out:
        video = out.add_stream("libx264", rate=rate)
        video.width, video.height, video.pix_fmt = w, h, "yuv420p"
        sound = None
        if audio is not None:
            sound = out.add_stream(audio, rate=48000)
            sound.layout = "stereo"
            sound.format = "u8" if audio == "pcm_u8" else "s16"
        text = out.add_stream_from_template(sub_in.streams.subtitles[0]) if subtitles else None
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((h, w, 3), i * 20 % 256, np.uint8), format="rgb24")
            frame.pts = i
            out.mux(video.encode(frame))
        out.mux(video.encode(None))
        if sound is not None:
            kind = np.uint8 if audio == "pcm_u8" else np.int16
            mux_audio(out, sound, int(audio_seconds * 48000),
                      lambda n: np.full((1, 2 * n), 128 if kind is np.uint8 else 0, kind))
        if text is not None:
            mux_subtitles(out, sub_in, text)
    return path


def encode(plan: VideoPlan, dst: Path) -> Path:
    """The job without a model: the range's frames as blank pictures through one segment, then the mux."""
    work = dst.with_name(dst.name + ".parts")
    work.mkdir()
    manifest = Manifest(work / MANIFEST, {})
    writer = SegmentWriter(work / "segment-00000.bin", plan)
    start = plan.shift if plan.start else None
    end = plan.ticks(plan.end, plan.time_base)
    with av.open(str(plan.source)) as inp:
        for frame in inp.decode(inp.streams[plan.video_index]):
            if (start is None or frame.pts >= start) and (end is None or frame.pts < end):
                writer.add(frame.pts, frame.duration or 1, np.zeros((*plan.out_hw, 3), np.uint8))
    manifest.add({**writer.close(), "index": 0}, headers(writer), plan.codec)
    mux(plan, manifest, dst)
    return dst


def streams(path: Path) -> list[tuple[str, str, str | None]]:
    with av.open(str(path)) as c:
        return [(s.type, s.codec_context.name, s.codec_context.layout.name if s.type == "audio" else None)
                for s in c.streams if s.type in ("video", "audio", "subtitle")]


def ends(path: Path) -> dict[str, float]:
    """The latest end (pts + duration, seconds) of each stream kind's packets."""
    out: dict[str, float] = {}
    with av.open(str(path)) as c:
        for packet in c.demux():
            if packet.pts is None or not packet.size:
                continue
            kind = packet.stream.type
            end = float((packet.pts + (packet.duration or 0)) * packet.time_base)
            out[kind] = max(out.get(kind, 0.0), end)
    return out


def test_pcm_without_a_layout_is_reencoded_to_aac(tmp_path):
    """PCM from Matroska only counts its channels: AAC got that bare count and refused to open at
    the end of the job. It now gets the usual layout for the count, and is opened while planning."""
    needs("aac")
    src = make_clip(tmp_path / "u8.mkv", audio="pcm_u8")
    with av.open(str(src)) as c:
        assert c.streams.audio[0].codec_context.layout.name == "2 channels"  # no layout, as ffmpeg writes it
    plan = plan_video(src, 2.0, suffix=".mp4", codec="libx264")
    assert [(s.kind, s.action, s.codec) for s in plan.streams] == [("audio", "encode", "aac")]
    out = encode(plan, tmp_path / "out.mp4")
    assert streams(out) == [("video", "h264", None), ("audio", "aac", "stereo")]


def test_an_encoder_that_will_not_open_fails_the_plan(tmp_path, monkeypatch):
    """Were the layout still missing, the failure is a one-line error while planning, with the
    encoder's reason, not a crash in the mux after every frame is upscaled."""
    needs("aac")
    src = make_clip(tmp_path / "u8.mkv", audio="pcm_u8")
    monkeypatch.setattr(stream_planning, "AUDIO_CODECS", ("aac",))
    monkeypatch.setattr(stream_planning, "default_layout", lambda layout: layout, raising=False)
    with pytest.raises(InputError) as caught:
        plan_video(src, 2.0, suffix=".mp4", codec="libx264")
    message = str(caught.value)
    assert message.startswith("audio stream #1 (pcm_u8) cannot be written: mp4 files cannot hold pcm_u8")
    assert "aac: " in message and "layout" in message and "\n" not in message
    assert "avcodec_open2" not in message and not re.search(r"Errno|-?\d{3,}", message)


def test_a_stream_the_container_cannot_write_is_not_copied(tmp_path):
    """MP4 lists pcm_s16le but cannot write it without a channel layout: the trial write while
    planning says so, and the audio is re-encoded instead of failing the mux at the end."""
    needs("aac")
    src = make_clip(tmp_path / "s16.mkv", audio="pcm_s16le")
    plan = plan_video(src, 2.0, suffix=".mp4", codec="libx264")
    assert [(s.kind, s.action, s.codec) for s in plan.streams] == [("audio", "encode", "aac")]
    assert any("re-encoded to aac" in note and "layout" in note for note in plan.notes)
    assert streams(encode(plan, tmp_path / "out.mp4")) == [("video", "h264", None), ("audio", "aac", "stereo")]
    kept = plan_video(src, 2.0, suffix=".mkv", codec="libx264")  # Matroska holds it as it is
    assert [(s.kind, s.action) for s in kept.streams] == [("audio", "copy")]


@pytest.mark.parametrize(("codec", "top"), [("libx264", 51), ("libx265", 51), ("libsvtav1", 63)])
def test_crf_outside_the_encoders_range_is_refused(tmp_path, codec, top):
    needs(codec)
    src = make_clip(tmp_path / "clip.mkv", size=(64, 64))
    for crf in (top + 1, 99, -1):
        with pytest.raises(InputError, match=rf"^{option_name('crf')} {crf}: {codec} takes 0 to {top} "
                                             r"\(lower is better\)$"):
            plan_video(src, 2.0, codec=codec, crf=crf)
    assert plan_video(src, 2.0, codec=codec, crf=top).options["crf"] == str(top)


@pytest.mark.parametrize("suffix", [".mkv", ".mp4"])
def test_subtitles_and_audio_end_with_the_video_at_end(tmp_path, suffix):
    """The cue on screen at --end leaves with the video (it lasted to 1.02 s, the video 0.5 s); the
    audio ends there too: copied, within one packet; re-encoded (MP4), within one AAC frame."""
    needs("aac", "mov_text")
    src = make_clip(tmp_path / "clip.mkv", frames=25, audio="pcm_s16le", subtitles=True)
    plan = plan_video(src, 2.0, suffix=suffix, codec="libx264", end=0.5)
    out = encode(plan, tmp_path / f"cut{suffix}")
    spans = ends(out)
    assert spans["video"] == pytest.approx(0.52, abs=1e-3)  # frames starting before 0.5 s, the last lasts 0.04 s
    assert spans["subtitle"] == pytest.approx(0.5, abs=1e-3)
    if suffix == ".mp4":  # PCM re-encoded to AAC: the decoded samples are cut at the end
        assert spans["audio"] == pytest.approx(0.5, abs=1e-3)
    else:  # copied: whole packets, the last one starting before the end (1024 samples, 21 ms)
        assert 0.5 <= spans["audio"] < 0.5 + 1024 / 48000
    with av.open(str(out)) as c:
        assert c.duration / 1e6 < 0.55
    start = plan_video(src, 2.0, suffix=suffix, codec="libx264", start=0.2, end=0.4)
    spans = ends(encode(start, tmp_path / f"middle{suffix}"))
    assert spans["subtitle"] == pytest.approx(0.2, abs=1e-3)  # "late" from 0.3: 0.1 to 0.2 after the cut


def test_errors_never_show_ffmpeg_numbers(tmp_path):
    def caught(code: int) -> FFmpegError:
        try:
            av.error.err_check(code)
        except FFmpegError as exc:
            return exc
        raise AssertionError(code)

    assert short_error(caught(-22)) == "invalid argument"
    assert short_error(caught(-1094995529)) == "invalid data found when processing input"
    assert short_error(OSError("[Errno -22] Invalid argument")) == "invalid argument"
    assert short_error(RuntimeError("muxing failed with error -1094995529")) == \
        "muxing failed with error (invalid data found when processing input)"
    assert short_error(caught(-22), ["[aac @ 0x55d0c0ffee00] Encoder requires channel layout to be set"]) == \
        "encoder requires channel layout to be set"
    needs("aac")
    src = make_clip(tmp_path / "s16.mkv", audio="pcm_s16le")
    plan = plan_video(src, 2.0, suffix=".mp4", codec="libx264")
    forced = replace(plan, streams=(StreamPlan(1, "audio", "copy", "pcm_s16le"),))  # what planning used to do
    with pytest.raises(OSError) as late:  # which the job reports as "cannot write <output> (...)"
        encode(forced, tmp_path / "late.mp4")
    assert str(late.value) == "cannot finish the mp4 file: unsupported channel layout 2 channels"
    text = tmp_path / "notes.txt"
    text.write_text("not a video")
    with pytest.raises(InputError) as bad:
        plan_video(text, 2.0)
    assert str(bad.value) == f"{text}: not a readable video (invalid data found when processing input)"


def test_encoder_refusals_give_the_encoders_reason(tmp_path):
    """What the encoder prints about a refusal is the message (FFmpeg's log is off in PyAV, and
    x264, x265 and SVT-AV1 print to stderr), not 'Function not implemented' and the call that failed."""
    needs("ffv1")
    src = make_clip(tmp_path / "clip.mkv", size=(48, 32))
    with pytest.raises(InputError) as caught:
        plan_video(src, (16000, 16000), codec="ffv1")  # more than ffv1's slices can cover
    message = str(caught.value)
    assert message.startswith("ffv1 cannot encode 16000 x 16000 yuv420p video: ") and "slices" in message
    assert "avcodec_open2" not in message and "Errno" not in message and "check " not in message
    if "libsvtav1" in av.codecs_available:
        with pytest.raises(InputError, match=r"^libsvtav1 cannot encode 96 x 64 yuv420p video: .*preset.*"
                                             rf"; check {option_name('preset')} 99$"):
            plan_video(src, 2.0, codec="libsvtav1", preset="99")
    if "libx264" in av.codecs_available:
        with pytest.raises(InputError, match=rf"^{option_name('preset')} nope: libx264 takes ultrafast, .*, placebo$"):
            plan_video(src, 2.0, codec="libx264", preset="nope")


@pytest.mark.parametrize(("codec", "limit"), [
    ("libx264", "at most 16384 pixels a side"),
    ("libx265", "at most 142,606,336 pixels a frame (16384 x 8704, HEVC level 7.2)"),
    ("libsvtav1", "at most 16384 x 8704 (width x height)"),
])
def test_a_frame_too_large_for_the_encoder_names_the_size_and_limit(tmp_path, codec, limit):
    """--scale 60 on 320 x 180 is 19200 x 10800: too large for every lossy encoder, and not a
    matter of --crf, --preset or --pix-fmt."""
    needs(codec)
    src = make_clip(tmp_path / "clip.mkv", size=(320, 180), frames=1)
    with pytest.raises(InputError) as caught:
        plan_video(src, 60.0, codec=codec)
    assert str(caught.value) == f"19200 x 10800 is too large for {codec}: it encodes {limit}; ask for a smaller size"


def test_trial_writes_leave_nothing_behind(tmp_path, capfd):
    """Planning opens encoders and writes containers in memory: no files, and the libraries' chatter
    does not reach the terminal."""
    needs("aac")
    src = make_clip(tmp_path / "s16.mkv", audio="pcm_s16le", subtitles=True)
    before = sorted(p.name for p in tmp_path.iterdir())
    capfd.readouterr()
    level = av.logging.get_level()
    plan_video(src, 2.0, suffix=".mp4", codec="libx264")
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert capfd.readouterr().err == ""
    assert av.logging.get_level() == level  # PyAV's logging is as it was


# The job, through the command line -------------------------------------------------------------------------

runner = CliRunner()


def lmf_video(weights: Path, *args: object) -> Result:
    return runner.invoke(app, ["video", *map(str, args), "--model", str(weights), "--device", "cpu"])


def two_sizes(path: Path) -> Path:
    """A clip whose frames are 48 x 32, then 24 x 24 from the sixth (as `cat a.ts b.ts` of two parts of one
    recording gives: the timestamps go on)."""
    needs("mpeg2video")
    with av.open(str(path), "w", format="mpegts") as out:
        stream = out.add_stream("mpeg2video", rate=25)
        stream.width, stream.height, stream.pix_fmt = 48, 32, "yuv420p"
        for i in range(5):
            frame = av.VideoFrame.from_ndarray(np.full((32, 48, 3), 60 + i * 10, np.uint8), format="rgb24")
            frame.pts = i
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    second = path.with_name("second.ts")
    with av.open(str(second), "w", format="mpegts") as out:
        stream = out.add_stream("mpeg2video", rate=25)
        stream.width, stream.height, stream.pix_fmt = 24, 24, "yuv420p"
        for i in range(5):
            frame = av.VideoFrame.from_ndarray(np.full((24, 24, 3), 200, np.uint8), format="rgb24")
            frame.pts = 5 + i
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    path.write_bytes(path.read_bytes() + second.read_bytes())
    return path


def decoded(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])]


def test_a_size_change_midway_is_fitted_with_bars_and_said(weights, tmp_path):
    src = two_sizes(tmp_path / "joined.ts")
    done = lmf_video(weights, src, "--scale", "2", "--batch", "4", "--codec", "ffv1", "-o", tmp_path / "out.mkv")
    assert done.exit_code == 0, done.output  # was a traceback from np.stack with --batch 4
    assert "Traceback" not in done.output and "frames are 24 x 24, not 48 x 32" in done.output
    frames = decoded(tmp_path / "out.mkv")
    assert len(frames) >= 9 and all(f.shape == (64, 96, 3) for f in frames)  # the join may cost one frame
    plan = plan_video(src, 2.0, suffix=".mkv")
    report = DecodeReport()
    last = [pixels for _, _, pixels in frames_after(plan, None, report=report)][-1].astype(int)
    assert last.shape == (32, 48, 3) and report.resized[0][1] == (24, 24)
    assert last[:, :8].max() == 0 and last[:, -8:].max() == 0  # pillarbox: black bars left and right
    assert abs(last[16, 24] - 200).max() < 10  # the 24 x 24 picture, as a 32 x 32 square (was stretched to 48 wide)


def test_corrupt_packets_are_counted_with_their_times_and_set_the_exit_code(weights, tmp_path):
    src = make_clip(tmp_path / "c.mkv", frames=30, size=(48, 32))
    data = bytearray(src.read_bytes())
    at = len(data) * 7 // 10
    data[at:at + 400] = bytes(400)  # zeros inside the stream (was: 12 of 30 frames, exit 0 and no word)
    src.write_bytes(bytes(data))
    done = lmf_video(weights, src, "--scale", "2", "--codec", "ffv1", "-o", tmp_path / "a.mkv")
    assert done.exit_code == 1 and re.search(r"damaged data near \d+\.\d\d s", done.output), done.output
    assert (tmp_path / "a.mkv").exists()  # every frame that decodes is kept
    accepted = lmf_video(weights, src, "--scale", "2", "--codec", "ffv1", "-o", tmp_path / "b.mkv",
                         "--ignore-errors", "--json")
    assert accepted.exit_code == 0 and "damaged data near" in accepted.output
    record = json.loads(next(line for line in accepted.stdout.splitlines() if line.startswith("{")))
    assert record["frames"] < 30 and record["lost"] and record["output_size"] == [96, 64]


def test_an_output_folder_that_cannot_be_written_is_one_line(weights, tmp_path):
    src = make_clip(tmp_path / "c.mkv")
    (tmp_path / "a-file").write_text("not a folder")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)  # read-only (root may write there anyway; the file-as-folder case holds for everyone)
    try:
        runs = [lmf_video(weights, src, "--scale", "2", "-o", folder / "out.mkv")
                for folder in (tmp_path / "a-file", locked)]
    finally:
        locked.chmod(0o700)
    for done in runs[:1] + [r for r in runs[1:] if r.exit_code != 0]:
        assert done.exit_code == 1 and "cannot write" in done.output and "Traceback" not in done.output, done.output


def test_a_second_command_on_the_same_output_is_refused(weights, tmp_path):
    from lmf_cli.jobs.video import job_lock

    src = make_clip(tmp_path / "c.mkv")
    with job_lock(tmp_path / "out.mkv"):  # as a first lmf holds it
        done = lmf_video(weights, src, "--scale", "2", "-o", tmp_path / "out.mkv")
    assert done.exit_code == 1 and f"another lmf is writing {tmp_path / 'out.mkv'}" in done.output
    assert not (tmp_path / "out.mkv").exists()
    again = lmf_video(weights, src, "--scale", "2", "-o", tmp_path / "out.mkv")  # the lock went with the first
    assert again.exit_code == 0, again.output


def test_finished_segments_are_never_thrown_away_by_a_rerun(weights, tmp_path, monkeypatch):
    from lmf_cli.io.video import work_dir
    from lmf_cli.io.video.segments import SegmentWriter as Writer

    src = make_clip(tmp_path / "c.mkv", frames=10)
    real = Writer.close
    closed = []

    def close_then_stop(self):
        record = real(self)
        closed.append(record)
        if len(closed) == 2:
            raise KeyboardInterrupt
        return record

    monkeypatch.setattr(Writer, "close", close_then_stop)
    stopped = lmf_video(weights, src, "--scale", "2", "--segment-frames", "3", "-o", tmp_path / "out.mkv")
    monkeypatch.undo()
    assert stopped.exit_code == 130 and "1 finished segment is kept" in stopped.output, stopped.output
    rerun = lmf_video(weights, src, "--scale", "2", "--segment-frames", "3", "-o", tmp_path / "out.mkv")
    assert rerun.exit_code == 1 and "--resume continues it; remove the folder to start over" in rerun.output
    assert work_dir(tmp_path / "out.mkv").is_dir()  # was deleted after a mere note
    resumed = lmf_video(weights, src, "--scale", "2", "--segment-frames", "3", "-o", tmp_path / "out.mkv",
                        "--resume")
    assert resumed.exit_code == 0 and "resumed" in resumed.output, resumed.output


def test_output_folder_quiet_and_plain_progress(weights, tmp_path, monkeypatch):
    video_command = sys.modules["lmf_cli.cli.video"]  # the package exports the command under that name

    src = make_clip(tmp_path / "c.mkv", audio="pcm_s16le")
    (tmp_path / "out").mkdir()
    quiet = lmf_video(weights, src, "--scale", "2", "-o", f"{tmp_path / 'out'}/", "--codec", "ffv1", "--crf", "20",
                      "-q")
    assert quiet.exit_code == 0, quiet.output  # was "cannot tell the container from ''"
    assert (tmp_path / "out" / "c_x2.mkv").exists() and quiet.output.strip() == ""  # -q: no note: lines
    monkeypatch.setattr(video_command.PlainProgress, "EVERY_S", 0.0)
    logged = lmf_video(weights, src, "--scale", "2", "-o", tmp_path / "out" / "again.mkv")
    assert re.search(r"video: \d+ of ~\d+ frames, [\d.]+ fps", logged.output), logged.output


def test_an_unbounded_batch_is_capped_by_the_memory_budget(weights, tmp_path):
    src = make_clip(tmp_path / "c.mkv", frames=8)
    done = lmf_video(weights, src, "--scale", "2", "--batch", "1000000000", "--max-memory", "64M",
                     "-o", tmp_path / "out.mkv")
    assert done.exit_code == 0 and "--batch 1000000000:" in done.output and "fit the memory budget" in done.output


def test_sigterm_keeps_finished_segments_and_leaves_no_partial_file(weights, tmp_path):
    from lmf_cli.io.video import work_dir

    src = make_clip(tmp_path / "c.mkv", frames=10)
    dst = tmp_path / "out.mkv"
    script = textwrap.dedent(f"""
        import os, signal
        from lmf_cli.io.video import segments
        real = segments.SegmentWriter.add
        count = []

        def add_then_die(self, *args):
            real(self, *args)
            count.append(1)
            if len(count) == 5:  # one segment of 3 finished, the second half written
                os.kill(os.getpid(), signal.SIGTERM)

        segments.SegmentWriter.add = add_then_die
        from lmf_cli.cli import app
        app(["video", {str(src)!r}, "--scale", "2", "--segment-frames", "3", "-o", {str(dst)!r},
             "--model", {str(weights)!r}, "--device", "cpu"])
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 143, done.stderr  # was killed outright, a 0-byte segment left behind
    # the encoder thread may close a second segment before the main thread takes the signal
    assert re.search(r"[12] finished segments? (is|are) kept", done.stderr), done.stderr
    parts = sorted(p.name for p in work_dir(dst).iterdir())
    finished = [s["file"] for s in json.loads((work_dir(dst) / MANIFEST).read_text())["segments"]]
    assert finished and sorted(parts) == sorted([MANIFEST, *finished])  # no partial segment beside them
    assert not dst.exists() and not list(tmp_path.glob("*.part")) and not list(tmp_path.glob(".*.part"))
    resumed = lmf_video(weights, src, "--scale", "2", "--segment-frames", "3", "-o", dst, "--resume")
    assert resumed.exit_code == 0 and len(decoded(dst)) == 10


# What else a file holds, and clocks that misbehave ---------------------------------------------------------

FONT = b"\x00\x01\x00\x00\x00\x0cOS/2" + bytes(range(256)) * 4  # the bytes stand for a font; nothing reads them
MASTERING = "G(13250,34500)B(7500,3000)R(34000,16000)WP(15635,16450)L(10000000,1)"  # BT.2020, 1000 cd/m2


def add_video(out: av.container.OutputContainer, *, size: tuple[int, int] = (48, 32), codec: str = "libx264",
              gop: int | None = None, pix_fmt: str = "yuv420p", **options: str) -> av.video.stream.VideoStream:
    """A 25 fps video stream; `gop`: frames from one keyframe to the next, exactly."""
    needs(codec)
    if gop is not None:
        options.update(g=str(gop), keyint_min=str(gop), sc_threshold="0")
    stream = out.add_stream(codec, rate=25, options=options)
    stream.width, stream.height, stream.pix_fmt = *size, pix_fmt
    return stream


def put_frames(out: av.container.OutputContainer, stream: av.video.stream.VideoStream, frames: int,
               first: int = 0, flush: bool = True) -> None:
    """Frames of a different grey each (frame i: 20 i), pts first, first + 1, ..."""
    w, h = stream.width, stream.height
    for i in range(frames):
        frame = av.VideoFrame.from_ndarray(np.full((h, w, 3), i * 20 % 256, np.uint8), format="rgb24")
        frame.pts = first + i
        out.mux(stream.encode(frame))
    if flush:
        out.mux(stream.encode(None))


def ts_clip(path: Path, *, first: int = 0, frames: int = 25, gop: int | None = None, audio: bool = True) -> Path:
    """An MPEG-TS of libx264 frames whose timestamps begin `first` frames in, with mp2 audio as long."""
    needs("libx264", *(["mp2"] if audio else []))
    with av.open(str(path), "w", format="mpegts") as out:
        video = add_video(out, gop=gop)
        sound = None
        if audio:
            sound = out.add_stream("mp2", rate=48000)
            sound.layout = "stereo"
        put_frames(out, video, frames, first)
        if sound is not None:
            for n in range(0, frames * 1920, 1152):
                chunk = av.AudioFrame.from_ndarray(np.zeros((1, 2304), np.int16), format="s16", layout="stereo")
                chunk.sample_rate, chunk.pts = 48000, first * 1920 + n
                out.mux(sound.encode(chunk))
            out.mux(sound.encode(None))
    return path


def note_lines(result: Result) -> list[str]:
    return [line for line in result.output.splitlines() if line.startswith("note:")]


def test_fonts_attached_to_an_mkv_are_kept_and_named_where_they_cannot_be(weights, tmp_path):
    """Styled (ASS) subtitles need the fonts an MKV carries: they stay in an .mkv, same name, type and
    bytes. MP4 and WebM cannot hold attachments: the note names the font and says that .mkv keeps it
    (it said 'attachment stream #1 (attachment) is not copied')."""
    src = tmp_path / "fonts.mkv"
    with av.open(str(src), "w") as out:
        video = add_video(out)
        out.add_attachment("Styled Sans.ttf", "font/ttf", FONT)
        put_frames(out, video, 5)
    done = lmf_video(weights, src, "--scale", "2", "-o", tmp_path / "out.mkv")
    assert done.exit_code == 0, done.output
    with av.open(str(tmp_path / "out.mkv")) as c:
        assert [(s.name, s.mimetype, bytes(s.data)) for s in c.streams if s.type == "attachment"] == \
            [("Styled Sans.ttf", "font/ttf", FONT)]
    dropped = lmf_video(weights, src, "--scale", "2", "-o", tmp_path / "out.mp4")
    assert dropped.exit_code == 0, dropped.output
    assert "note: attachment #1 (Styled Sans.ttf) dropped: mp4 files cannot hold attachments (.mkv files can)" \
        in note_lines(dropped)


def test_cover_art_is_kept(weights, tmp_path):
    """MP4 cover art is a picture stream whose one packet has no timestamp: the mux skipped it as
    timeless, so every MP4 lost its cover without a word (with --start it went too, being before
    the cut). It is kept in MP4 for any range, and in MKV, which keeps cover art as attachments,
    as cover.png (the copy used to be refused: 'matroska files cannot hold png')."""
    from av.stream import Disposition
    from PIL import Image

    needs("png")
    picture = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(picture, "PNG")
    src = tmp_path / "album.mp4"
    with av.open(str(src), "w") as out:
        video = add_video(out)
        cover = out.add_stream("png")
        cover.width, cover.height, cover.pix_fmt = 16, 16, "rgb24"
        cover.disposition = Disposition.attached_pic
        packet = av.Packet(picture.getvalue())
        packet.stream, packet.pts, packet.dts, packet.time_base = cover, 0, 0, Fraction(1, 90000)
        out.mux(packet)
        put_frames(out, video, 25)

    def covers(path: Path) -> list[bytes]:
        with av.open(str(path)) as c:
            pictures = [s.index for s in c.streams.video if s.disposition & Disposition.attached_pic]
            return [bytes(p) for p in c.demux() if p.stream_index in pictures and p.size]

    assert covers(src) == [picture.getvalue()]
    for dst, args in ((tmp_path / "out.mp4", ()), (tmp_path / "cut.mp4", ("--start", "0.5")),
                      (tmp_path / "out.mkv", ())):
        done = lmf_video(weights, src, "--scale", "2", *args, "-o", dst)
        assert done.exit_code == 0, done.output
        assert covers(dst) == [picture.getvalue()], dst.name
    assert "note: video stream #1 (png, cover art) is kept as the attachment cover.png" in note_lines(done)
    with av.open(str(tmp_path / "out.mkv")) as c:
        assert [dict(s.metadata) for s in c.streams if s.disposition & Disposition.attached_pic] == \
            [{"filename": "cover.png", "mimetype": "image/png"}]


def test_data_streams_are_copied_where_the_container_holds_them(weights, tmp_path):
    """Telemetry (a GoPro's GPMF is a bin_data stream in MP4) was dropped from every output with 'data
    stream #1 (data) is not copied'. MP4 holds it: it is copied, its bytes and times intact. KLV (drone
    and broadcast metadata in a .ts) goes into no container lmf writes: dropped, and the note says
    which stream and why."""
    src = tmp_path / "telemetry.mp4"
    with av.open(str(src), "w") as out:
        video = add_video(out)
        data = out.add_data_stream("bin_data")
        data.time_base = Fraction(1, 1000)
        put_frames(out, video, 5)
        for i in range(5):
            packet = av.Packet(bytes([i]) * 16)
            packet.stream, packet.pts, packet.dts, packet.time_base = data, i * 40, i * 40, data.time_base
            out.mux(packet)
    done = lmf_video(weights, src, "--scale", "2", "-o", tmp_path / "out.mp4")
    assert done.exit_code == 0 and "data stream" not in done.output, done.output

    def data_packets(path: Path) -> list[tuple[float, bytes]]:
        with av.open(str(path)) as c:
            return [(float(p.pts * p.time_base), bytes(p)) for p in c.demux(c.streams.data[0]) if p.size]

    assert data_packets(tmp_path / "out.mp4") == data_packets(src) == [(i * 0.04, bytes([i]) * 16) for i in range(4)]

    klv = tmp_path / "drone.ts"
    with av.open(str(klv), "w", format="mpegts") as out:
        video = add_video(out)
        data = out.add_data_stream("klv")
        data.time_base = Fraction(1, 90000)
        put_frames(out, video, 5, flush=False)
        packet = av.Packet(b"\x06\x0e\x2b\x34" + bytes(12))
        packet.stream, packet.pts, packet.dts, packet.time_base = data, 0, 0, data.time_base
        out.mux(packet)
        out.mux(video.encode(None))
    dropped = lmf_video(weights, klv, "--scale", "2", "-o", tmp_path / "drone.mkv")
    assert dropped.exit_code == 0, dropped.output
    assert "note: data stream #1 (klv) dropped: matroska files cannot hold it" in note_lines(dropped)


def test_a_timecode_track_is_kept_and_moves_with_start(weights, tmp_path):
    """Cameras write a timecode track (tmcd) in MOV and MP4. It is rebuilt from the video's timecode
    tag rather than copied; the note used to call it 'data stream #1 (data) is not copied', and with
    --start the output kept the input's first timecode, 1 s off its first frame. It now moves with
    --start: 01:00:00:00 becomes 01:00:01:00, a track in MOV, the video's tag in MKV."""
    src = tmp_path / "camera.mov"
    with av.open(str(src), "w") as out:
        video = add_video(out)
        video.metadata["timecode"] = "01:00:00:00"
        put_frames(out, video, 50)
    with av.open(str(src)) as c:
        assert [s.type for s in c.streams] == ["video", "data"]  # the muxer wrote the tmcd track
    for suffix in (".mov", ".mkv"):
        done = lmf_video(weights, src, "--scale", "2", "--start", "1", "-o", tmp_path / f"out{suffix}")
        assert done.exit_code == 0, done.output
        assert "note: the timecode 01:00:00:00 becomes 01:00:01:00: the output begins 1 s in" in note_lines(done)
        with av.open(str(tmp_path / f"out{suffix}")) as c:
            tags = {s.type: {k.lower(): v for k, v in s.metadata.items()} for s in c.streams}
        assert tags["video"]["timecode"] == "01:00:01:00"
        if suffix == ".mov":
            assert tags["data"]["timecode"] == "01:00:01:00"
        else:
            assert "data" not in tags and any("kept as the video's timecode tag" in n for n in note_lines(done))


def test_a_second_video_stream_is_copied_from_its_first_keyframe_after_start(weights, tmp_path):
    """Only the first video stream is upscaled; a second one (picture-in-picture, a camera's proxy) is
    copied as it is, and the note says which and its size. Cut by --start between two of its keyframes
    it used to begin with frames that cannot decode (their keyframe lies before the cut), without a
    word: it now begins at its first keyframe after the start (every packet decodes), and a note says
    how much later that is."""
    src = tmp_path / "two.mkv"
    with av.open(str(src), "w") as out:
        main = add_video(out, gop=250)
        inset = add_video(out, size=(32, 24), gop=10)  # keyframes at 0, 0.4, 0.8, 1.2, ... s
        put_frames(out, main, 60)
        put_frames(out, inset, 60)
    done = lmf_video(weights, src, "--scale", "2", "--start", "1.1", "-o", tmp_path / "out.mkv")
    assert done.exit_code == 0, done.output
    notes = note_lines(done)
    assert "note: video stream #1 (h264, 32 x 24) is copied as it is: only stream #0 is upscaled" in notes
    assert "note: video stream #1 (h264) begins 0.10 s after the start, at its first keyframe: its frames " \
           "before that need frames from before the start" in notes
    with av.open(str(tmp_path / "out.mkv")) as c:
        packets = [p for p in c.demux(c.streams.video[1]) if p.size]
    with av.open(str(tmp_path / "out.mkv")) as c:
        pictures = list(c.decode(c.streams.video[1]))
    assert packets[0].is_keyframe and len(pictures) == len(packets) == 30  # frames 30 to 59
    assert len(decoded(tmp_path / "out.mkv")) == 32  # the upscaled stream: frames 28 (1.12 s) to 59
    assert float(pictures[0].time) == pytest.approx(0.1, abs=1e-3)


def hdr_clip(path: Path, transfer: int) -> Path:
    """64 x 64 10-bit HEVC, BT.2020 primaries and matrix, PQ (16) or HLG (18), with HDR10's static
    metadata (a 1000 cd/m2 mastering display, MaxCLL 1000, MaxFALL 400) in the stream."""
    params = f"log-level=error:master-display={MASTERING}:max-cll=1000,400"
    with av.open(str(path), "w") as out:
        video = add_video(out, size=(64, 64), codec="libx265", pix_fmt="yuv420p10le", **{"x265-params": params})
        ctx = video.codec_context
        ctx.color_primaries, ctx.color_trc, ctx.colorspace, ctx.color_range = 9, transfer, 9, 1
        for i in range(5):
            rgb = av.VideoFrame.from_ndarray(np.full((64, 64, 3), 9000 + 4000 * i, np.uint16), format="rgb48le")
            frame = rgb.reformat(format="yuv420p10le", dst_colorspace="BT2020", dst_color_range=1)
            frame.color_primaries, frame.color_trc, frame.colorspace, frame.color_range = 9, transfer, 9, 1
            frame.pts = i
            out.mux(video.encode(frame))
        out.mux(video.encode(None))
    return path


def hdr10(frame: av.VideoFrame) -> tuple[list[float] | None, list[float] | None, tuple[int, int] | None]:
    """A frame's HDR10 metadata: the mastering display's xy (red, green, blue, white) and luminance
    (max, min), and the light levels (MaxCLL, MaxFALL), read from FFmpeg's side data structures."""
    from av.sidedata.sidedata import Type

    mdcv, cll = (frame.side_data.get(kind) for kind in (Type.MASTERING_DISPLAY_METADATA, Type.CONTENT_LIGHT_LEVEL))
    xy = luminance = light = None
    if mdcv is not None:
        v = struct.unpack("<22i", bytes(mdcv)[:88])
        q = [v[i] / v[i + 1] for i in range(0, 20, 2)]
        xy, luminance = q[:8], [q[9], q[8]]
    if cll is not None:
        light = struct.unpack("<2I", bytes(cll)[:8])
    return xy, luminance, light


def test_hdr_colour_tags_10_bits_and_mastering_metadata_are_kept(weights, tmp_path):
    """PQ and HLG video keeps what makes it HDR: 10 bits, BT.2020 primaries and matrix, its transfer
    and range, as tags of the stream and of every frame; and HDR10's mastering display and light
    levels, which x265, x264 and SVT-AV1 write in the stream (they were lost without a word, so
    players tone-mapped for a 10000 cd/m2 display). ffv1 has no place for them: a note says so."""
    needs("libx265")
    runs = [(16, codec) for codec in ("libx265", "libx264", "libsvtav1", "ffv1") if codec in av.codecs_available]
    for transfer, codec in [*runs, (18, "libx265")]:
        src = hdr_clip(tmp_path / f"hdr{transfer}.mkv", transfer)
        with av.open(str(src)) as c:
            xy, luminance, light = hdr10(next(c.decode(c.streams.video[0])))
        assert light == (1000, 400) and luminance == [1000, 1e-4] and xy[:2] == [0.68, 0.32]  # red first
        dst = tmp_path / f"out{transfer}-{codec}.mkv"
        done = lmf_video(weights, src, "--scale", "2", "--codec", codec, "-o", dst)
        assert done.exit_code == 0, done.output
        with av.open(str(dst)) as c:
            ctx = c.streams.video[0].codec_context
            frame = next(c.decode(c.streams.video[0]))
        assert frame.format.name == "yuv420p10le"
        for tags in (ctx, frame):
            assert (tags.color_primaries, tags.color_trc, tags.colorspace, tags.color_range) == (9, transfer, 9, 1)
        kept = hdr10(frame)
        if codec == "ffv1":
            assert kept == (None, None, None) and "the HDR10 mastering display and light levels are not kept: " \
                   "ffv1 has no place for them" in " ".join(note_lines(done))
            continue
        assert kept[2] == (1000, 400) and kept[0] is not None, codec
        assert kept[0] == pytest.approx(xy, abs=1e-4) and kept[1] == pytest.approx([1000, 1e-4], abs=1e-3)


@pytest.mark.parametrize("suffix", [".ts", ".mkv"])
def test_start_inside_a_long_gop_gives_exactly_the_frames_from_start(weights, tmp_path, suffix):
    """One keyframe for all 60 frames, --start 1 in the middle: the output is the full run's frames
    from the 26th on, exactly. A .ts has no index: FFmpeg's seek landed mid-GOP, where nothing
    decodes, and the job ended 'no video frames in the requested range'; now a seek that lands past
    its target, or where nothing decodes, is undone by decoding from the start."""
    src = tmp_path / f"gop{suffix}"
    if suffix == ".ts":
        ts_clip(src, frames=60, gop=250, audio=False)
    else:
        with av.open(str(src), "w") as out:
            put_frames(out, add_video(out, gop=250), 60)
    full = lmf_video(weights, src, "--scale", "2", "--codec", "ffv1", "-o", tmp_path / "full.mkv")
    cut = lmf_video(weights, src, "--scale", "2", "--codec", "ffv1", "--start", "1", "-o", tmp_path / "cut.mkv")
    assert full.exit_code == 0 and cut.exit_code == 0, cut.output
    assert "~35 frames" in cut.output and "damaged" not in cut.output  # a seek's mid-GOP start is no damage
    frames, cut_frames = decoded(tmp_path / "full.mkv"), decoded(tmp_path / "cut.mkv")
    assert len(frames) == 60 and len(cut_frames) == 35
    assert all(np.array_equal(a, b) for a, b in zip(frames[25:], cut_frames, strict=True))


def frame_times(path: Path) -> list[float]:
    with av.open(str(path)) as c:
        return [float(f.time) for f in c.decode(c.streams.video[0])]


@pytest.mark.parametrize("second", [0, 25 * 3600], ids=["restarts", "leaps-an-hour"])
def test_ts_timestamp_discontinuities_are_joined_up_and_said(weights, tmp_path, second):
    """Two .ts files joined with `cat` (the clock restarts) or a broadcast splice (it leaps an hour
    ahead): the mux failed at the very end ('video: invalid argument') after every frame was
    upscaled, or the output held an hour of frozen picture. The timeline is now joined up where the
    video's clock jumps, as ffmpeg does for .ts, every stream by the same amount: 50 frames over 2 s
    with the audio alongside, and a note says where; --start and --end count along the joined clock."""
    a, b = ts_clip(tmp_path / "a.ts"), ts_clip(tmp_path / "b.ts", first=second)
    joined = tmp_path / "joined.ts"
    joined.write_bytes(a.read_bytes() + b.read_bytes())
    done = lmf_video(weights, joined, "--scale", "2", "-o", tmp_path / "out.mkv")
    assert done.exit_code == 0, done.output
    assert "~50 frames" in done.output
    assert any(re.match(r"note: the input's timestamps jump 1 time \(at 1\.0\d s", n) for n in note_lines(done))
    times = frame_times(tmp_path / "out.mkv")
    assert len(times) == 50 and times == sorted(set(times)) and times[-1] < 2.05
    spans = ends(tmp_path / "out.mkv")
    assert spans["video"] == pytest.approx(2.0, abs=0.05) and spans["audio"] == pytest.approx(2.0, abs=0.05)
    middle = lmf_video(weights, joined, "--scale", "2", "--start", "1.2", "--end", "1.6", "-o", tmp_path / "cut.mp4")
    assert middle.exit_code == 0, middle.output
    assert len(frame_times(tmp_path / "cut.mp4")) == 10


@pytest.mark.parametrize("first", [3600 * 25, (1 << 33) // 3600 - 12], ids=["an-hour-in", "wraps"])
def test_a_ts_is_timed_from_its_first_timestamp(weights, tmp_path, first):
    """A .ts from a broadcast starts anywhere on its 26.5-hour clock, and wraps past 2^33 ticks. The
    output used to start where the input's clock stood (an MKV an hour long holding 1 s of video),
    and --start counted from the clock's zero (so --start 0.5 kept everything). Both now count from
    the input's first timestamp, as players show it, and the wrap is crossed smoothly."""
    src = ts_clip(tmp_path / "broadcast.ts", first=first)
    done = lmf_video(weights, src, "--scale", "2", "-o", tmp_path / "out.mkv")
    assert done.exit_code == 0, done.output
    times = frame_times(tmp_path / "out.mkv")
    assert len(times) == 25 and times == sorted(times) and times[0] < 0.05 and times[-1] < 1.0
    with av.open(str(tmp_path / "out.mkv")) as c:
        assert c.duration / 1e6 < 1.1
    with av.open(str(src)) as c:
        begin = Fraction(c.start_time, 1_000_000)
        expected = sum(1 for p in c.demux(c.streams.video[0]) if p.pts is not None and
                       p.pts * p.time_base - begin >= Fraction(1, 2))
    cut = lmf_video(weights, src, "--scale", "2", "--start", "0.5", "-o", tmp_path / "cut.mkv")
    assert cut.exit_code == 0, cut.output
    assert len(frame_times(tmp_path / "cut.mkv")) == expected == 12


def test_audio_longer_than_the_video_is_kept_whole_and_said(weights, tmp_path):
    """5 frames (0.2 s) and 1 s of audio: the first line said '~25 frames' (the container's duration,
    which is the audio's). The count now comes from the video's own duration (Matroska's DURATION
    tag; where a container keeps none, as FLV, from its last packets). The audio is kept whole, as
    ffmpeg keeps it: speech or music is not cut where the pictures stop, and players show the last
    frame meanwhile; a note says so, and how --end cuts it."""
    src = make_clip(tmp_path / "short.mkv", frames=5, audio="pcm_s16le", audio_seconds=1.0)
    for suffix in (".mkv", ".mp4"):
        done = lmf_video(weights, src, "--scale", "2", "-o", tmp_path / f"out{suffix}")
        assert done.exit_code == 0, done.output
        assert "~5 frames" in done.output
        assert "note: audio stream #1 lasts to 1.00 s, the video to 0.20 s: kept whole, players show the last " \
               f"frame meanwhile ({option_name('end')} 0.20 ends it with the video)" in note_lines(done)
        spans = ends(tmp_path / f"out{suffix}")
        assert spans["video"] == pytest.approx(0.2, abs=1e-3) and spans["audio"] == pytest.approx(1.0, abs=0.01)
    needs("aac")
    flv = tmp_path / "short.flv"
    with av.open(str(flv), "w") as out:
        video = add_video(out)
        sound = out.add_stream("aac", rate=48000)
        sound.layout = "stereo"
        put_frames(out, video, 5)
        for n in range(0, 48000, 1024):
            chunk = av.AudioFrame.from_ndarray(np.zeros((2, 1024), np.float32), format="fltp", layout="stereo")
            chunk.sample_rate, chunk.pts = 48000, n
            out.mux(sound.encode(chunk))
        out.mux(sound.encode(None))
    with av.open(str(flv)) as c:
        assert c.streams.video[0].duration is None and c.duration / 1e6 > 1  # nothing but the container's
    assert plan_video(flv, 2.0).total == 5
