"""`lmf models`: the shipped models and the key facts of their cards."""

from __future__ import annotations

from rich.table import Table

from lmf_cli.cli.common import stdout
from lmf_cli.errors import LmfError


def models() -> None:
    """List the shipped models and the key facts of their cards."""
    from lmf_cli.models.checkpoints import card_facts
    from lmf_cli.models.zoo import AUTOMATIC, SHIPPED, choose_model, family_facts, shipped_path

    table = Table("name", "status", "model / encoder", "parameters", "training", "Set5 PSNR x2 / x3 / x4", "summary")
    for entry in SHIPPED.values():
        path = shipped_path(entry.name)
        if path is None:
            table.add_row(entry.name, "not trained yet", "", "", "", "", entry.summary)
            continue
        try:
            table.add_row(entry.name, "ready", *card_facts(path), entry.summary)
        except LmfError as exc:
            table.add_row(entry.name, f"unreadable: {exc}", "", "", "", "", entry.summary)
    stdout.print(table)
    families = Table("family", "tiling", "CMSR", "renderer", title="What each decoder family lmf loads can do")
    for facts in family_facts():
        families.add_row(facts.name, facts.tiling, facts.cmsr, facts.renderer)
    stdout.print(families)
    stdout.print("Chosen without --model (lmf upscale --input-quality auto, lmf video):")
    for situation, (inputs, light) in AUTOMATIC.items():
        choice = choose_model(inputs, light)
        stdout.print(f"  {situation}: {choice.name} ({choice.reason})", highlight=False)
