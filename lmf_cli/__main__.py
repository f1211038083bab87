"""`python -m lmf_cli ...` runs the `lmf` command (for machines where it is not installed)."""

from lmf_cli.cli import app

app(prog_name="lmf")
