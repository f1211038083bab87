"""The models lmf ships, found by name from any working directory.

Weights live in the repository's `weights/` folder; a wheel carries them inside the
package as `lmf_cli/weights/` (see pyproject.toml), so both layouts are searched.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lmf_cli.errors import CheckpointError

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # lmf_cli/


@dataclass(frozen=True)
class ShippedModel:
    name: str
    filename: str
    summary: str


SHIPPED: dict[str, ShippedModel] = {
    "lmf-edsr": ShippedModel("lmf-edsr", "lmf-edsr.safetensors",
                             "LM-LIIF on EDSR-baseline: the paper's configuration, best quality"),
    "lmf-lite": ShippedModel("lmf-lite", "lmf-lite.safetensors",
                             "LM-LIIF on a small EDSR: several times faster, for CPUs and video"),
    "lmf-real": ShippedModel("lmf-real", "lmf-real.safetensors",
                             "lmf-edsr fine-tuned on degraded inputs: for JPEGs, noisy photos and video frames"),
    "diif-edsr": ShippedModel("diif-edsr", "diif-edsr.safetensors",
                              "DIIF (coarse-to-fine MLP over coordinate slices) on EDSR-baseline"),
}
DEFAULT_MODEL = "lmf-edsr"


def weights_dirs() -> list[Path]:
    return [PACKAGE_DIR / "weights", PACKAGE_DIR.parent / "weights"]


def shipped_path(name: str) -> Path | None:
    """The weights file of a shipped model, or None if this build has none yet."""
    entry = SHIPPED[name]
    for folder in weights_dirs():
        candidate = folder / entry.filename
        if candidate.is_file():
            return candidate
    return None


def resolve(name_or_path: str | Path) -> Path:
    """A shipped model name or a path to a weights file -> an existing path."""
    key = str(name_or_path)
    if key in SHIPPED:
        path = shipped_path(key)
        if path is None:
            raise CheckpointError(
                f"model {key!r} has no trained weights in this build yet "
                f"({SHIPPED[key].filename} is missing); train it with `lmf train` or pass a weights file")
        return path
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    known = ", ".join(SHIPPED)
    raise CheckpointError(f"{key}: no such weights file or model name (shipped models: {known})")
