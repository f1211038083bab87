"""Running lmf's jobs on a Ray cluster: the batch planner's image jobs and a video's segments become
calls on a pool of model actors, each holding an Upscaler loaded once.

`connect` joins a cluster (or starts a local Ray instance), `WorkerPool` keeps the actors,
`upscale_files` and `run_video_on` drive them. The outputs are written by the driver, atomically,
from the bytes the workers encode with the very code of a local run, so they are the local run's
bytes. Ray itself restarts an actor that dies and retries its call (bounded by `MAX_RESTARTS` and
`MAX_TASK_RETRIES`); what still fails is reported as failed and the rest goes on.

Ray is an optional extra (`pip install "lmf-cli[ray]"`) and is imported only when a pool starts,
so `import lmf_cli` and the command line stay fast and work without it.
"""

from lmf_cli.cluster.connect import ClusterError, Connection, connect
from lmf_cli.cluster.images import upscale_files
from lmf_cli.cluster.pool import MAX_RESTARTS, MAX_TASK_RETRIES, PoolShape, WorkerPool
from lmf_cli.cluster.video import run_video_on

__all__ = ["MAX_RESTARTS", "MAX_TASK_RETRIES", "ClusterError", "Connection", "PoolShape", "WorkerPool", "connect",
           "run_video_on", "upscale_files"]
