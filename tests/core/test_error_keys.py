"""Every config key the library's strings name (messages, warnings, docstrings) exists in the schema.

A message that tells users to set ``data.no_such_key`` sends them to a key the config refuses. The scan
reads every string literal (f-strings: their constant parts) of coordexp_rl/, actors/ and learner/ and
checks each ``<section>.<field>[.<sub>]`` whose section is one of ``Config``'s against the pydantic
models. Not keys: module paths (``learner.group.LearnerGroup``), file names (``model.safetensors``),
calls (``learner.stage2_step.remote(...)``), names inside a longer dotted name (``coordexp_rl.data.loader``,
``self.cfg.data.prompt``) and the few attribute references listed in NOT_KEYS. A second check catches
a key put under a section that does not exist (``custom.coord_tokens.skip_bbox_norm``, the slip that
started this test): a dotted name of three or more parts that ends in a config field but names no section.
"""

from __future__ import annotations

import ast
import re
import typing
from pathlib import Path

from pydantic import BaseModel

from coordexp_rl import config as config_module
from coordexp_rl.config import Config

REPO = Path(__file__).resolve().parents[2]
LIBRARY = ("coordexp_rl", "actors", "learner")
SECTIONS = tuple(Config.model_fields)
FILE_SUFFIXES = {"py", "pt", "safetensors", "json", "jsonl", "yaml", "yml", "md", "png", "jpg", "txt", "csv",
                 "parquet", "log", "bin", "xml", "html"}
# Attribute references in docstrings and messages that share a section's name (objects, not config keys).
NOT_KEYS = {
    "buffer.put",  # RolloutBuffer.put (actors/rollout_actor.py)
    "model.load_weights",  # vLLM's model method (actors/vllm_worker_ext.py)
    "model.model",  # the Qwen3-VL decoder inside the HF model (learner/distributed.py)
    "model.lm_head.weight",
}

_KEY = re.compile(r"(?<![\w.])(" + "|".join(SECTIONS) + r")((?:\.[A-Za-z_]\w*)+)(\()?")
_DOTTED = re.compile(r"(?<![\w.])[a-z_]\w*(?:\.[A-Za-z_]\w*){2,}")


def _fields(model: type[BaseModel]) -> dict[str, typing.Any]:
    return {name: info.annotation for name, info in model.model_fields.items()}


def _model_of(annotation) -> type[BaseModel] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def resolve_key(dotted: str, root: type[BaseModel] = Config) -> bool:
    """``"optim.batch_size"`` -> True when each part is a field of the model above it; a dict-typed field
    (``model.tiny_size.hidden``) takes any key below it."""
    model: type[BaseModel] | None = root
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if model is None:
            return False
        annotation = _fields(model).get(part)
        if annotation is None:
            return False
        if typing.get_origin(annotation) is dict:
            return i + 1 >= len(parts) - 1  # one key below a dict field at most
        model = _model_of(annotation)
    return True


def _is_module_or_file(dotted: str) -> bool:
    parts = dotted.split(".")
    if parts[-1] in FILE_SUFFIXES:
        return True
    for top in ("", *LIBRARY):  # learner.group -> learner/group.py; data.loader -> coordexp_rl/data/loader.py
        module = (REPO / top).joinpath(*parts[:2])
        if module.with_suffix(".py").is_file() or (module / "__init__.py").is_file():
            return True
    return False


def _all_field_names() -> set[str]:
    names: set[str] = set()
    for annotation in _fields(Config).values():
        names |= set(_fields(_model_of(annotation)))
    return names


def bad_keys(text: str, renamed: typing.Iterable[str] = ()) -> list[str]:
    """The dotted names in ``text`` that look like config keys but are not in the schema."""
    bad = []
    for m in _KEY.finditer(text):
        dotted, is_call = m.group(1) + m.group(2), m.group(3)
        if is_call or dotted in NOT_KEYS or _is_module_or_file(dotted) or dotted in renamed:
            continue
        if not resolve_key(dotted):
            bad.append(dotted)
    fields = _all_field_names()
    for m in _DOTTED.finditer(text):
        parts = m.group(0).split(".")
        if parts[-1] in fields and not set(parts) & set(SECTIONS) and not _is_module_or_file(m.group(0)):
            bad.append(m.group(0))
    return bad


def _strings(tree: ast.AST):
    """(line, text) of every string constant, f-strings' constant parts included."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node.lineno, node.value


def scan(paths: typing.Iterable[Path], root: Path = REPO) -> list[str]:
    """``FILE:LINE: key`` (FILE relative to ``root``) for every unknown key in the string literals of ``paths``."""
    renamed = set(getattr(config_module, "RENAMED", {}))  # old names, refused with a hint (config.py)
    config_file = Path(config_module.__file__).resolve()
    found = []
    for path in paths:
        allowed = renamed if path.resolve() == config_file else set()
        for line, text in _strings(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            for key in bad_keys(text, allowed):
                offset = text[:text.find(key)].count("\n")
                found.append(f"{path.relative_to(root)}:{line + offset}: {key}")
    return found


def library_files() -> list[Path]:
    return sorted(p for top in LIBRARY for p in (REPO / top).rglob("*.py"))


def test_every_key_named_in_the_library_exists():
    assert scan(library_files()) == []


def test_the_scan_sees_the_library():
    files = library_files()
    assert len(files) > 50 and {p.relative_to(REPO).parts[0] for p in files} == set(LIBRARY)
    # and it does find keys: the data checks name real ones
    text = "\n".join(t for p in files for _, t in _strings(ast.parse(p.read_text(encoding="utf-8"))))
    assert {"data.max_target_tokens", "rollout.max_model_len", "optim.batch_size"} <= {
        m.group(1) + m.group(2) for m in _KEY.finditer(text)}


def test_checker_finds_unknown_keys(tmp_path):
    assert bad_keys("raise data.max_target_tokens, or set data.too_many_objects=truncate") == []
    assert bad_keys("set data.no_such_key: true") == ["data.no_such_key"]
    assert bad_keys("see optim.batch_size and learner.max_retries") == ["learner.max_retries"]
    assert bad_keys("rollout.max_restarts=3; model.tiny_size.hidden=64; model.tiny_size.a.b") == [
        "model.tiny_size.a.b"]
    assert bad_keys("expects data.skip_bbox_norm.extra") == ["data.skip_bbox_norm.extra"]
    assert bad_keys("(custom.coord_tokens.skip_bbox_norm)") == ["custom.coord_tokens.skip_bbox_norm"]
    # f-strings: the constant parts around the values
    src = tmp_path / "m.py"
    src.write_text('def f(n):\n    raise ValueError(f"data.no_such_key={n} > rollout.max_model_len={n}")\n')
    assert scan([src], root=tmp_path) == ["m.py:2: data.no_such_key"]


def test_checker_skips_modules_files_and_calls():
    assert bad_keys("coordexp_rl.data.loader.DataError and learner.group.LearnerGroup") == []
    assert bad_keys("writes eval.jsonl, model.safetensors and optim.pt; see weight_sync.py") == []
    assert bad_keys(">>> learner.stage2_step.remote(buffer)") == []
    assert bad_keys("self.cfg.data.prompt, cfg.optim.lr") == []
    assert bad_keys("``buffer.put`` then ``model.model``") == []
    assert bad_keys("matching.lambda_geo", renamed={"matching.lambda_geo"}) == []
