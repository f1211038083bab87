"""`lmf video` against inputs, settings and events that used to fail late, lose work or say too
little. Planning and muxing: PCM without a channel layout, streams a container lists but cannot
write, out-of-range --crf, subtitles past --end, FFmpeg's error numbers, frames too large for the
encoder (no model runs there: blank frames go through the real segment writer and mux). The job:
read-only folders, a second command on the same output, reruns that would throw finished segments
away, -o a folder, streams that change size midway, corrupt packets, SIGTERM, an unbounded --batch,
-q, and progress in a log file (the tiny model, through the command line).

Clips are made here with PyAV."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import av
import numpy as np
import pytest
from av.error import FFmpegError
from click.testing import Result
from typer.testing import CliRunner

from lmf_cli.cli import app
from lmf_cli.errors import InputError, option_name
from lmf_cli.io.video import plan as planning
from lmf_cli.io.video.decode import DecodeReport, frames_after
from lmf_cli.io.video.mux import mux
from lmf_cli.io.video.plan import StreamPlan, VideoPlan, plan_video, short_error
from lmf_cli.io.video.segments import MANIFEST, Manifest, SegmentWriter, headers

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
            total, done = int(audio_seconds * 48000), 0
            while done < total:
                n = min(1024, total - done)
                chunk = av.AudioFrame.from_ndarray(np.full((1, 2 * n), 128 if kind is np.uint8 else 0, kind),
                                                   format=sound.format.name, layout="stereo")
                chunk.sample_rate, chunk.pts = 48000, done
                out.mux(sound.encode(chunk))
                done += n
            out.mux(sound.encode(None))
        if text is not None:
            for packet in sub_in.demux(sub_in.streams.subtitles[0]):
                if packet.dts is not None:
                    packet.stream = text
                    out.mux(packet)
    return path


def encode(plan: VideoPlan, dst: Path) -> Path:
    """The job without a model: the range's frames as blank pictures through one segment, then the mux."""
    work = dst.with_name(dst.name + ".parts")
    work.mkdir()
    manifest = Manifest(work / MANIFEST, {})
    writer = SegmentWriter(work / "segment-00000.bin", plan)
    start = plan.shift if plan.start else None
    end = round(plan.end / plan.time_base) if plan.end is not None else None
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
    monkeypatch.setattr(planning, "AUDIO_CODECS", ("aac",))
    monkeypatch.setattr(planning, "default_layout", lambda layout: layout, raising=False)
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
    assert "1 finished segment is kept" in done.stderr
    parts = sorted(p.name for p in work_dir(dst).iterdir())
    assert parts == [MANIFEST, "segment-00000.bin"] and (work_dir(dst) / "segment-00000.bin").stat().st_size
    assert not dst.exists() and not list(tmp_path.glob("*.part")) and not list(tmp_path.glob(".*.part"))
    resumed = lmf_video(weights, src, "--scale", "2", "--segment-frames", "3", "-o", dst, "--resume")
    assert resumed.exit_code == 0 and len(decoded(dst)) == 10
