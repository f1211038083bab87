"""Video files: plan a job (`plan`), run the overlapped decode/model/encode pipeline in
resumable segments (`pipeline`, `segments`), and mux the result with every other stream (`mux`)."""

from lmf_cli.io.video.pipeline import VideoProgress, VideoResult, run_video, upscale_video
from lmf_cli.io.video.plan import (
    CODECS,
    CONTAINERS,
    VideoPlan,
    available_codecs,
    default_suffix,
    parse_time,
    plan_video,
    work_dir,
)

__all__ = ["CODECS", "CONTAINERS", "VideoPlan", "VideoProgress", "VideoResult", "available_codecs", "default_suffix",
           "parse_time", "plan_video", "run_video", "upscale_video", "work_dir"]
