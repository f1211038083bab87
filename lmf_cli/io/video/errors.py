"""Why FFmpeg or an encoder library failed, in one line a user can act on: their own messages carry
error numbers, the internal call that failed and log prefixes, and the encoder libraries print their
reasons to stderr, where nothing catches them.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import av
from av.error import FFmpegError

_ERRNO = re.compile(r"\[Errno -?\d+\]\s*")
_RETURNED = re.compile(r"\s*returned -?\d+\b")
_CODE = re.compile(r"\b(error)(?: code)?[ :]+(-?\d{2,})\b", re.IGNORECASE)
_LOG_PREFIX = re.compile(r"^(?:\[[^\]]* @ 0x[0-9a-fA-F]+\]\s*)+|^(?:x26[45]|svt)\s*\[\w+\]:\s*", re.IGNORECASE)
_LOG_CHATTER = ("[info]", "[warning]", "[warn]", "[debug]", "using cpu capabilities", "profile ")
_LOG_GENERIC = ("cannot open", "error while opening", "error setting option", "error initializing")
_capture = threading.Lock()


def _ffmpeg_words(code: int) -> str:
    """FFmpeg's words for one of its error numbers (of either sign)."""
    try:
        av.error.err_check(-abs(code))
    except FFmpegError as exc:
        if exc.strerror and not re.search(r"\d{3,}", exc.strerror):
            return exc.strerror
    return "unknown error"


def _readable(text: str) -> str:
    """One line without FFmpeg's error numbers, cut to 160 characters."""
    text = _RETURNED.sub("", _ERRNO.sub("", text))
    text = _CODE.sub(lambda m: f"{m[1]} ({_lower_first(_ffmpeg_words(int(m[2])))})", text)
    text = _lower_first(" ".join(text.split()).rstrip("."))
    return text if len(text) <= 160 else text[:157] + "..."


def _lower_first(text: str) -> str:
    """'Invalid argument' -> 'invalid argument' (it follows a colon or a parenthesis); 'AAC' stays."""
    return text[0].lower() + text[1:] if len(text) > 1 and text[0].isupper() and text[1].islower() else text


def _log_reason(lines: list[str]) -> str | None:
    """The line of a library's output that says why it failed: its own error line, else the first
    that is not chatter or a generic "cannot open"."""
    lines = [line for line in lines if line.strip()]
    errors = [line for line in lines if "[error]" in line.lower()]
    said = [line for line in lines if not any(c in line.lower() for c in _LOG_CHATTER)]
    specific = [line for line in said if not any(g in line.lower() for g in _LOG_GENERIC)]
    for line in errors + specific + said:
        text = _LOG_PREFIX.sub("", line.strip()).strip()
        if text:
            return _readable(text)
    return None


def short_error(exc: BaseException, log: list[str] | None = None) -> str:
    """A readable one-line reason for a failure: what the library printed about it where that was
    caught (`log`, from `library_log`), else FFmpeg's words for the error; never its error numbers
    or the internal call that failed."""
    reason = _log_reason(log) if log else None
    if reason:
        return reason
    if isinstance(exc, FFmpegError):
        logged = getattr(exc, "log", None)
        if isinstance(logged, tuple) and len(logged) == 3 and isinstance(logged[2], str) and logged[2].strip():
            return _readable(logged[2])
        return _readable(exc.strerror or _ffmpeg_words(exc.errno or 0))
    return _readable(str(exc) or type(exc).__name__)


@contextmanager
def library_log() -> Iterator[list[str]]:
    """Keep what FFmpeg and the encoder libraries print while the block runs from the terminal and
    hand it over (in the yielded list, once the block ends): x264, x265 and SVT-AV1 print their
    reasons to the process's stderr and PyAV silences FFmpeg's own log, so a failed open says no
    more than "invalid argument" without this. One capture at a time (it redirects file 2)."""
    lines: list[str] = []
    with _capture:
        try:
            if sys.stderr is not None:
                sys.stderr.flush()
            saved = os.dup(2)
        except (OSError, ValueError):  # no stderr to take over
            saved = None
        if saved is None:
            yield lines
            return
        level = av.logging.get_level()
        try:
            with tempfile.TemporaryFile() as tmp:
                os.dup2(tmp.fileno(), 2)
                av.logging.restore_default_callback()  # FFmpeg's log to file 2, without Python in the way
                try:
                    yield lines
                finally:
                    av.logging.set_level(level)
                    os.dup2(saved, 2)
                    tmp.seek(0)
                    lines.extend(tmp.read().decode(errors="replace").splitlines())
        finally:
            os.close(saved)
