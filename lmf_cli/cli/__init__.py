"""The `lmf` command: one thin module per command group over the Python API.

upscale -> `upscale`, video -> `video`, models -> `models`, train, pack-data and calibrate -> `train`,
eval and benchmark -> `evaluate`; what they share (consoles, errors, size options) -> `common`.
"""

import typer

from lmf_cli.cli.evaluate import benchmark, evaluate_cmd
from lmf_cli.cli.models import models
from lmf_cli.cli.train import calibrate, pack_data, train
from lmf_cli.cli.upscale import upscale
from lmf_cli.cli.video import video
from lmf_cli.process import prepare_process

app = typer.Typer(help="Upscale images to any size with Latent Modulated Functions.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
app.callback()(prepare_process)  # before every command, and before PyTorch loads: see lmf_cli.process
app.command()(upscale)
app.command()(models)
app.command()(train)
app.command("pack-data")(pack_data)
app.command("eval")(evaluate_cmd)
app.command()(calibrate)
app.command()(benchmark)
app.command()(video)

__all__ = ["app"]
