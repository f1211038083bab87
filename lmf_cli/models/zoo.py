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
    inputs: str = "clean"  # what it was trained for: "clean" (bicubic LR) or "compressed" (degraded LR)
    light: bool = False  # a small encoder: the choice for video on a CPU


SHIPPED: dict[str, ShippedModel] = {
    "lmf-edsr": ShippedModel("lmf-edsr", "lmf-edsr.safetensors",
                             "LM-LIIF on EDSR-baseline: the paper's configuration, best quality"),
    "lmf-lite": ShippedModel("lmf-lite", "lmf-lite.safetensors",
                             "LM-LIIF on a small EDSR: several times faster, for CPUs and video", light=True),
    "lmf-real": ShippedModel("lmf-real", "lmf-real.safetensors",
                             "lmf-edsr fine-tuned on degraded inputs: for JPEGs, noisy photos and video frames",
                             inputs="compressed"),
    "lmf-real-lite": ShippedModel("lmf-real-lite", "lmf-real-lite.safetensors",
                                  "lmf-lite fine-tuned on degraded inputs: compressed video on a CPU",
                                  inputs="compressed", light=True),
    "diif-edsr": ShippedModel("diif-edsr", "diif-edsr.safetensors",
                              "DIIF (coarse-to-fine MLP over coordinate slices) on EDSR-baseline"),
}
DEFAULT_MODEL = "lmf-edsr"
INPUT_QUALITIES = ("auto", "clean", "compressed")


@dataclass(frozen=True)
class Choice:
    name: str
    reason: str  # one line for the user: why this model


def choose_model(inputs: str, light: bool) -> Choice:
    """The shipped model for `inputs` ("clean" or "compressed"), light (small encoder) or not.

    A robust model where the input is compressed (it removes blocking that a clean model sharpens),
    the clean model otherwise (the robust one gives up 1-2 dB of detail on clean input); the
    light one where speed matters (video on a CPU). A model this build lacks falls back to the
    nearest one that exists: same kind of input first, then any.
    """
    if inputs not in ("clean", "compressed"):
        raise ValueError(f"inputs must be 'clean' or 'compressed', not {inputs!r}")
    wanted = [m for m in SHIPPED.values() if m.name.startswith("lmf-") and m.inputs == inputs]
    others = [m for m in SHIPPED.values() if m.name.startswith("lmf-") and m.inputs != inputs]
    ranked = sorted(wanted, key=lambda m: m.light != light) + sorted(others, key=lambda m: m.light != light)
    for rank, entry in enumerate(ranked):
        if shipped_path(entry.name) is not None:
            kind = f"trained for {inputs} input"
            size = "light, for speed" if entry.light else "full size"
            reason = f"{kind}, {size}" if rank == 0 else f"{kind}; the better fit is missing from this build"
            return Choice(entry.name, reason)
    return Choice(ranked[0].name, "the best fit (this build has no shipped weights)")


# What `lmf upscale --input-quality auto` and `lmf video` pick without --model: situation -> (inputs, light).
AUTOMATIC: dict[str, tuple[str, bool]] = {
    "clean images (PNG, TIFF, JPEG q90+)": ("clean", False),
    "compressed images (JPEG, lossy WebP, HEIC, AVIF)": ("compressed", False),
    "video on a GPU": ("compressed", False),
    "video on a CPU": ("compressed", True),
}


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


@dataclass(frozen=True)
class FamilyFacts:
    """What a decoder family lmf loads can do, as its Capabilities declare it (for `lmf models`)."""

    name: str
    tiling: str
    cmsr: str
    renderer: str


# Architectures with official checkpoints lmf loads, named as in their `model.name`.
FAMILY_NAMES = {"lmliif": "LM-LIIF", "lmlte": "LM-LTE", "lmciaosr": "LM-CiaoSR", "liif": "LIIF", "lte": "LTE",
                "ciaosr": "CiaoSR", "diif": "DIIF"}


def family_facts() -> list[FamilyFacts]:
    """Each registered family's declared abilities, read from a small instance of it (EDSR-baseline
    with one block: the abilities do not depend on the encoder's size). With a SwinIR encoder,
    exact tiles also start on its 8-pixel window grid."""
    from lmf_cli import models

    encoder = {"name": "edsr-baseline", "args": {"n_resblocks": 1, "n_feats": 64}}
    builders = {"lmliif": models.lmliif_spec, "lmlte": models.lmlte_spec, "lmciaosr": models.lmciaosr_spec,
                "liif": models.liif_spec, "lte": models.lte_spec, "ciaosr": models.ciaosr_spec,
                "diif": models.diif_spec}
    facts = []
    for family, build in builders.items():
        caps = models.make(build(encoder)).capabilities
        tiling = ("not exact: attends over the whole image, so rendered whole (tiles only with a warning)"
                  if caps.tile_grid is None else "exact (tiled = whole image)")
        cmsr = "yes (calibrated tables)" if caps.cmsr else "no"
        renderer = "compiled kernel on CPUs" if caps.kernel_width is not None else "PyTorch"
        facts.append(FamilyFacts(FAMILY_NAMES.get(family, family), tiling, cmsr, renderer))
    return facts
