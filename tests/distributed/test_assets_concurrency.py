"""Two processes that build the same cached asset at once (two jobs, or parallel ablation arms).

Before the fix both built into the same ``<name>.tmp`` folder and the second died on the rename
(``FileNotFoundError ... tiny-model-<key>.tmp -> tiny-model-<key>``).
"""

from __future__ import annotations

import multiprocessing as mp
import os
from pathlib import Path

import pytest

from coordexp_rl.driver.assets import _build_once


def _slow_build(folder: Path, barrier) -> None:
    """Write a build in two halves with both processes in the middle at the same moment."""
    (folder / "part1").write_text(str(os.getpid()))
    barrier.wait(timeout=60)  # both builders are now half-way: a shared temp folder would collide here
    (folder / "part2").write_text(str(os.getpid()))


def _build_in_child(target: str, barrier, results) -> None:
    path = _build_once(Path(target), lambda d: _slow_build(d, barrier))
    results.put((os.getpid(), str(path)))


def _in_two_processes(child, arg: str, timeout: float) -> list[tuple[int, str]]:
    """``child(arg, barrier, results)`` in two spawned processes at once; their (pid, path) results."""
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=child, args=(arg, barrier, results)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=timeout)
    assert [p.exitcode for p in procs] == [0, 0], "a builder process failed (see its traceback above)"
    return [results.get(timeout=5) for _ in procs]


def test_two_processes_building_at_once_both_get_one_finished_folder(tmp_path):
    target = tmp_path / "cache" / "thing-abc"
    got = _in_two_processes(_build_in_child, str(target), timeout=120)
    assert {path for _, path in got} == {str(target)}
    # The folder is one builder's complete output, not a mix of both.
    owner = (target / "part1").read_text()
    assert (target / "part2").read_text() == owner and int(owner) in {pid for pid, _ in got}
    assert sorted(p.name for p in target.parent.iterdir()) == ["thing-abc"]  # no temporary folder left


def test_a_finished_folder_is_used_without_building(tmp_path):
    target = tmp_path / "thing"
    target.mkdir()
    (target / "done").write_text("x")
    assert _build_once(target, lambda d: pytest.fail("built again")) == target


def test_a_failed_build_leaves_nothing_behind(tmp_path):
    def broken(folder: Path) -> None:
        (folder / "half").write_text("x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        _build_once(tmp_path / "thing", broken)
    assert list(tmp_path.iterdir()) == []  # neither a target nor a temporary folder


def _tiny_model_in_child(cache: str, barrier, results) -> None:
    os.environ["COORDEXP_CACHE"] = cache
    from coordexp_rl.runtime import prepare_runtime

    prepare_runtime()  # a spawned child starts bare (the torchvision fix)
    from coordexp_rl.config import load_config
    from coordexp_rl.driver.assets import tiny_model

    cfg = load_config(None, [])
    barrier.wait(timeout=120)  # both start building the same model at once
    results.put((os.getpid(), str(tiny_model(cfg))))


@pytest.mark.integration
def test_two_processes_build_the_real_tiny_model_into_one_cache(tmp_path):
    from safetensors.torch import load_file

    paths = {path for _, path in _in_two_processes(_tiny_model_in_child, str(tmp_path), timeout=300)}
    assert len(paths) == 1
    folder = Path(paths.pop())
    assert load_file(str(folder / "model.safetensors"))  # a complete, loadable model
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
