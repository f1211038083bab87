"""Video files: plan a job (`plan`), read its frames (`decode`), frame its resumable segments
(`segments`) and mux the result with every other stream (`mux`). Running a job is `lmf_cli.jobs.video`."""

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

__all__ = ["CODECS", "CONTAINERS", "VideoPlan", "available_codecs", "default_suffix", "parse_time", "plan_video",
           "work_dir"]
