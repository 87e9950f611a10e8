"""Imports point down the layers, function-level imports included (none may hide an upward one).

    coordexp_rl.errors, .config, .runtime        the foundation: user errors, the config schema, process set-up
    coordexp_rl.method                          the pure method: protocol, coords, CoordExp, losses, matching
    coordexp_rl.modeling                        building and feeding the model (no Ray)
    coordexp_rl.data, coordexp_rl.evaluation    the data contract, sequences; scoring predictions
    coordexp_rl.rollout                         what actors and learner share: engine interface, rows, weights
    actors, learner                             the two sides (each knows Ray; neither imports the other)
    coordexp_rl.driver                          the Ray driver of a run
    coordexp_rl.tools, .cli, .launch            commands, benchmarks, the GPU check
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = [
    ("coordexp_rl", "coordexp_rl.errors", "coordexp_rl.config", "coordexp_rl.runtime"),
    ("coordexp_rl.method",),
    ("coordexp_rl.modeling",),
    ("coordexp_rl.data", "coordexp_rl.evaluation"),
    ("coordexp_rl.rollout",),
    ("actors", "learner"),
    ("coordexp_rl.driver",),
    ("coordexp_rl.tools", "coordexp_rl.cli", "coordexp_rl.launch"),
]
NO_RAY_BELOW = 5  # layers under actors/learner never import Ray
PEERS_APART = {("actors", "learner"), ("learner", "actors")}


def layer_of(module: str) -> tuple[int, str]:
    """(layer index, the layer entry it matched); the longest matching entry wins."""
    best = (-1, "")
    for i, entries in enumerate(LAYERS):
        for e in entries:
            if (module == e or module.startswith(e + ".")) and len(e) > len(best[1]):
                best = (i, e)
    return best


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[int, str]]:
    """Every absolute import in the file (module level and inside functions): (line, module)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
            # `from coordexp_rl import tools` names a subpackage: judge it by that
            out += [(node.lineno, f"{node.module}.{a.name}") for a in node.names if node.module == "coordexp_rl"]
    return out


def violations(path: Path) -> list[str]:
    me = module_name(path)
    mine, my_entry = layer_of(me)
    found = []
    for line, target in imports(path):
        top = target.split(".")[0]
        where = f"{path.relative_to(ROOT)}:{line}: {me} imports {target}"
        if top == "ray" and mine < NO_RAY_BELOW:
            found.append(f"{where} (Ray only in actors/, learner/ and above)")
        if top not in ("coordexp_rl", "actors", "learner"):
            continue
        theirs, their_entry = layer_of(target)
        if target == "coordexp_rl" and mine >= 0:
            continue
        if theirs > mine:
            found.append(f"{where} (layer {theirs} {their_entry!r} is above layer {mine} {my_entry!r})")
        elif (my_entry, their_entry) in PEERS_APART:
            found.append(f"{where} ({my_entry} and {their_entry} never import each other)")
    return found


def library_files() -> list[Path]:
    return sorted(p for d in ("coordexp_rl", "actors", "learner") for p in (ROOT / d).rglob("*.py"))


def test_every_library_module_has_a_layer():
    assert [module_name(p) for p in library_files() if layer_of(module_name(p))[0] < 0] == []


def test_imports_point_down():
    assert [v for p in library_files() for v in violations(p)] == []


@pytest.mark.parametrize("source, expect", [
    ("def f():\n    from coordexp_rl.driver.supervisor import predict_all\n", "above layer 1"),
    ("import ray\n", "Ray only"),
    ("from learner.learner import Learner\n", "above layer 1"),
])
def test_the_scan_finds_an_upward_import_even_inside_a_function(tmp_path, monkeypatch, source, expect):
    fake = ROOT / "coordexp_rl" / "method" / "_layer_probe.py"
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: source if self == fake else _read(self))
    assert any(expect in v for v in violations(fake))


def test_the_scan_keeps_actors_and_learner_apart(monkeypatch):
    fake = ROOT / "actors" / "_layer_probe.py"
    monkeypatch.setattr(Path, "read_text",
                        lambda self, *a, **k: "from learner.batching import gather_supervision\n" if self == fake
                        else _read(self))
    assert any("never import each other" in v for v in violations(fake))


_read = Path.read_text


def test_the_readme_layout_names_every_package_and_only_paths_that_exist():
    import re

    text = (ROOT / "README.md").read_text()
    table = text[text.index("## Layout"):text.index("## Tests")]
    first_cells = [line.split("|")[1] for line in table.splitlines() if line.startswith("| `")]
    named = set()
    for cell in first_cells:
        paths = re.findall(r"`([^`]+)`", cell)
        folder = paths[0].rsplit("/", 1)[0] + "/" if "/" in paths[0].rstrip("/") else ""
        for p in paths:
            full = p if "/" in p else folder + p  # `config.py` after `coordexp_rl/errors.py`
            assert (ROOT / full).exists(), f"README layout names {full}, which is not in the tree"
            named.add(full.rstrip("/"))
    packages = {str(p.parent.relative_to(ROOT)) for p in (ROOT / "coordexp_rl").glob("*/__init__.py")}
    assert packages <= named, f"README layout misses {sorted(packages - named)}"
