"""The package's shape, kept by tests: imports run one way along the flow (models <- engine <- api and
jobs <- cluster <- cli, with io, evaluation and training beside) with no cycles; no command-line flag
is spelled below cli/; nothing outside models/ looks inside a network for what it can do."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import lmf_cli

PACKAGE = Path(lmf_cli.__file__).parent
# Rank of each top-level part: a module may import its own part and parts of lower rank only.
RANKS = {
    "errors": 0, "files": 0, "hardware": 0,   # facts and helpers every layer may use
    "process": 0,                             # malloc and OpenMP settings the command and Ray workers make
    "options": 0.5, "sizes": 0.5,             # EngineOptions; output sizes and the cell (their errors are errors')
    "imaging": 1, "models": 1,                # pixels in numpy; networks, weights files, shipped names
    "engine": 2,                              # sizes, tiling, rendering, CMSR at inference
    "io": 3,                                  # image and video files
    "evaluation": 4, "training": 4,           # beside each other: neither imports the other
    "api": 5, "jobs": 5,                      # the Upscaler; the runners (image batch, video), which use io
    "cluster": 6,                             # Ray: actors holding Upscalers, running the runners' jobs
    "cli": 7, "video": 7, "__init__": 7,      # the command line; the old video import path; the package
    "__main__": 8,                            # `python -m lmf_cli` runs the command line
}


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _target(module: str, name: str) -> str:
    """`from a.b import c` imports the module a.b.c where it exists, else a name of a.b."""
    candidate = PACKAGE.parent / f"{module}.{name}".replace(".", "/")
    return f"{module}.{name}" if candidate.with_suffix(".py").exists() or candidate.is_dir() else module


def _imports() -> dict[str, set[str]]:
    """lmf_cli module -> the lmf_cli modules it imports, at the top or inside functions."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lmf_cli"):
                found |= {_target(node.module, alias.name) for alias in node.names}
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("lmf_cli")}
        graph[name] = found - {name}
    return graph


def test_every_part_has_a_rank():
    parts = {_part(m) for m in _imports()}
    assert parts <= set(RANKS), f"give these parts a rank: {parts - set(RANKS)}"


def test_imports_point_down_the_flow():
    wrong = []
    for module, targets in _imports().items():
        for target in targets:
            mine, theirs = _part(module), _part(target)
            if mine != theirs and RANKS[theirs] >= RANKS[mine]:
                wrong.append(f"{module} imports {target} ({mine} {RANKS[mine]} -> {theirs} {RANKS[theirs]})")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_cycles():
    graph = _imports()
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*trail[trail.index(nxt):], nxt]))
            if nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = 2

    for module in graph:
        if module not in state:
            visit(module, [module])


def test_the_rule_catches_a_wrong_import(tmp_path, monkeypatch):
    """The checker itself: a model that imports the API is reported."""
    fake = tmp_path / "lmf_cli"
    (fake / "models").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "api.py").write_text("")
    (fake / "models" / "__init__.py").write_text("")
    (fake / "models" / "bad.py").write_text("def f():\n    from lmf_cli.api import Upscaler\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    try:
        test_imports_point_down_the_flow()
    except AssertionError as exc:
        assert "lmf_cli.models.bad imports lmf_cli.api" in str(exc)
    else:
        raise AssertionError("the wrong import was not caught")


def test_old_video_import_path_works_for_one_release():
    import importlib
    import sys

    import pytest

    sys.modules.pop("lmf_cli.video", None)
    with pytest.warns(DeprecationWarning, match="lmf_cli.io.video"):
        old = importlib.import_module("lmf_cli.video")
    from lmf_cli.io.video import plan_video
    from lmf_cli.jobs.video import upscale_video

    assert old.upscale_video is upscale_video and old.plan_video is plan_video


def _sources(skip: str) -> dict[str, ast.Module]:
    """Parsed modules of the package outside the part `skip`."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] != skip:
            found[str(rel)] = ast.parse(path.read_text())
    return found


def _docstrings(tree: ast.Module) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def flag_strings(trees: dict[str, ast.Module]) -> list[str]:
    """Strings (docstrings aside) that spell a command-line flag."""
    wrong = []
    for name, tree in trees.items():
        docs = _docstrings(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
                if FLAG.search(node.value):
                    wrong.append(f"{name}:{node.lineno}: {node.value!r}")
    return wrong


def test_no_flag_is_spelled_below_the_command_line():
    """Messages below cli/ name options with errors.option_name, so a flag is renamed in one place."""
    wrong = flag_strings(_sources("cli"))
    assert not wrong, "\n".join(wrong)


NETWORK_PARTS = ("imnet", "hypernet", "renders_pairs", "can_fuse", "receptive_radius", "out_dim", "mod_dim",
                 "hidden_dim", "hidden_depth", "decoder_macs")


def probes(trees: dict[str, ast.Module]) -> list[str]:
    """hasattr/getattr on a model, or a reach into a network's parts, outside models/."""
    wrong = []
    for name, tree in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
                    node.func.id in ("hasattr", "getattr") and node.args:
                subject = ast.unparse(node.args[0]).lower()
                if any(word in subject for word in ("model", "encoder", "net", "up")):
                    wrong.append(f"{name}:{node.lineno}: {ast.unparse(node)}")
            elif isinstance(node, ast.Attribute) and node.attr in NETWORK_PARTS and not (
                    isinstance(node.value, ast.Attribute) and node.value.attr == "capabilities"):
                wrong.append(f"{name}:{node.lineno}: {ast.unparse(node)}")
    return wrong


def test_models_are_not_probed_outside_models():
    """What a model can do is declared (`model.capabilities`, `stage_macs`, `modulation_intensity`)."""
    wrong = probes(_sources("models"))
    assert not wrong, "\n".join(wrong)


def test_the_shape_rules_catch_what_they_forbid():
    bad = ast.parse('''"""A docstring may say --tile."""
def f(model, up):
    if hasattr(model, "hypernet"):
        return model.imnet.hidden_dim
    raise ValueError("try a smaller --tile")
''')
    assert len(flag_strings({"bad.py": bad})) == 1
    found = probes({"bad.py": bad})
    assert any("hasattr(model" in w for w in found) and any("imnet" in w for w in found)
