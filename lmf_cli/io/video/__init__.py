"""Video files: plan a job (`plan`, with the encoder's choices in `encoder` and the other streams' in
`streams`), read its frames (`decode`), frame its resumable segments (`segments`) and mux the result with
every other stream (`mux`); `timeline` mends a .ts's timestamps and `errors` says in one line why FFmpeg
failed, for all of them. Running a job is `lmf_cli.jobs.video`."""

from lmf_cli.io.video.encoder import CODECS, available_codecs
from lmf_cli.io.video.plan import CONTAINERS, VideoPlan, default_suffix, parse_time, plan_video, work_dir

__all__ = ["CODECS", "CONTAINERS", "VideoPlan", "available_codecs", "default_suffix", "parse_time", "plan_video",
           "work_dir"]
