"""Old home of the video API, kept importable for one release: use `lmf_cli.io.video` (planning) and
`lmf_cli.jobs.video` (running a job)."""

import warnings

from lmf_cli.io.video import *  # noqa: F403
from lmf_cli.io.video import __all__ as _planning
from lmf_cli.jobs.video import VideoProgress, VideoResult, run_video, upscale_video

__all__ = [*_planning, "VideoProgress", "VideoResult", "run_video", "upscale_video"]

warnings.warn("lmf_cli.video moved to lmf_cli.io.video and lmf_cli.jobs.video; the old name goes away in the next "
              "release", DeprecationWarning, stacklevel=2)
