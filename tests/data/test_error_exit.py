"""Config and data errors end `coordexp-rl` and the launcher with the message and exit code 2, no traceback;
``--debug`` adds the traceback. No Ray: the launcher's Driver is replaced by one that only loads the data."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from coordexp_rl.cli import main
from coordexp_rl.data.loader import DataError, load_samples
from coordexp_rl.driver import driver as driver_module
from tests.data._util import write_jsonl, write_png

REPO = Path(__file__).resolve().parents[2]
GOOD = {"images": ["a.png"], "width": 8, "height": 6, "objects": [{"desc": "x", "bbox_2d": [1, 1, 4, 4]}]}


@pytest.fixture
def bad_file(tmp_path: Path) -> Path:
    write_png(tmp_path / "a.png", 8, 6)
    bad_box = {**GOOD, "objects": [{"desc": "x", "bbox_2d": [1, 1, 9, 4]}]}
    return write_jsonl(tmp_path / "train.jsonl", [GOOD, bad_box, "not json", {**GOOD, "images": ["gone.png"]}])


class DataCheckingDriver:
    """The launcher's Driver up to its data check (the real one starts Ray first)."""

    def __init__(self, cfg, *_, **__):
        self.cfg = cfg

    def run(self):
        load_samples(self.cfg.data.train, skip_bbox_norm=self.cfg.data.skip_bbox_norm)
        raise AssertionError("the data check passed")


@pytest.fixture
def launch_args(bad_file: Path, tmp_path: Path, monkeypatch) -> list[str]:
    monkeypatch.setattr(driver_module, "Driver", DataCheckingDriver)
    return [f"data.train={bad_file}", f"run.out_dir={tmp_path / 'run'}"]


def test_launch_data_error_is_the_message_alone(bad_file, launch_args, capsys):
    assert main(["launch", *launch_args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"data error: {bad_file}: 3 problems with the data")
    assert f"\n  {bad_file}:2: objects[0].bbox_2d: [1, 1, 9, 4] lies outside the image" in err
    assert f"\n  {bad_file}:3: json: malformed JSON: Expecting value at column 1" in err
    assert f"\n  {bad_file}:4: images[0]: 'gone.png' under " in err and "no such file" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("argv", [["--debug", "launch"], ["launch", "--debug"]])
def test_launch_debug_adds_the_traceback(argv, launch_args, capsys):
    assert main([*argv, *launch_args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and "DataError" in err and "\ndata error: " in err


def test_launcher_main_data_and_config_errors(launch_args, capsys):
    assert driver_module.main(launch_args) == 2  # `python -m coordexp_rl.launch ...`
    assert capsys.readouterr().err.startswith("data error: ")
    assert driver_module.main(["data.no_such_key=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("config error: ") and "data.no_such_key" in err and "Traceback" not in err


def test_launch_error_from_a_ray_task_reports_its_cause(monkeypatch, tmp_path, capsys):
    """A DataError raised inside a Ray actor reaches the driver wrapped (RayTaskError): the cause is shown."""
    from ray.exceptions import RayTaskError

    class RemoteFailure:
        def __init__(self, cfg, *_, **__):
            pass

        def run(self):
            cause = DataError("train.jsonl:7: objects[0].bbox_2d: has zero or negative area")
            raise RayTaskError("LearnerActor.__init__", "Traceback (most recent call last): ...", cause
                               ).as_instanceof_cause()

    monkeypatch.setattr(driver_module, "Driver", RemoteFailure)
    assert main(["launch", f"run.out_dir={tmp_path}"]) == 2
    assert capsys.readouterr().err == "data error: train.jsonl:7: objects[0].bbox_2d: has zero or negative area\n"


def test_other_errors_keep_their_traceback(monkeypatch, tmp_path):
    class Bug:
        def __init__(self, cfg, *_, **__):
            pass

        def run(self):
            raise ValueError("a bug, not a data error")

    monkeypatch.setattr(driver_module, "Driver", Bug)
    with pytest.raises(ValueError, match="a bug"):
        main(["launch", f"run.out_dir={tmp_path}"])


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "coordexp_rl.cli", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def test_convert_bad_annotation_file_in_a_real_process(tmp_path: Path):
    """The console script's own handler (any subcommand), as a user sees it."""
    (tmp_path / "ann").mkdir()
    (tmp_path / "ann" / "x.xml").write_text("<annotation><filename>a.jpg</filename>\n<object>\n")
    args = ["convert", "voc", "--xml-dir", str(tmp_path / "ann"), "--image-root", str(tmp_path),
            "--out", str(tmp_path / "out.jsonl")]
    plain = _cli(*args)
    assert plain.returncode == 2, plain.stderr
    assert plain.stderr.startswith(f"data error: {tmp_path / 'ann' / 'x.xml'}:3: xml: malformed XML: ")
    assert "Traceback" not in plain.stderr
    debug = _cli("--debug", *args)
    assert debug.returncode == 2 and "Traceback (most recent call last)" in debug.stderr
    assert debug.stderr.rstrip().splitlines()[-1] == plain.stderr.rstrip()


def test_unreadable_configs_and_damaged_checkpoints_are_one_line_errors(tmp_path: Path, capsys):
    """Before Ray starts: a config file that is not UTF-8, a checkpoint to resume whose state is torn."""
    config = tmp_path / "run.yaml"
    config.write_bytes(b"optim:\n  lr: 0.001 \xff\xfe\n")
    assert main(["launch", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"config error: {config}: cannot be read as UTF-8 text") and "Traceback" not in err
    checkpoint = tmp_path / "ck"
    checkpoint.mkdir()
    for name in ("model.safetensors", "optim.pt", "rng.pt", "COMPLETE"):
        (checkpoint / name).write_text("junk")
    (checkpoint / "state.json").write_text("garbage")
    assert main(["launch", f"run.resume={checkpoint}", f"run.out_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"checkpoint error: {checkpoint / 'state.json'}: damaged") and "Traceback" not in err


def test_a_model_folder_without_coord_tokens_is_refused_before_ray(tmp_path: Path, capsys):
    """A stock Qwen3-VL folder (here the tiny model built without coord tokens) names the fix."""
    from coordexp_rl.modeling.tiny import make_tiny_model

    stock = make_tiny_model(tmp_path / "stock", coord_tokens=False)
    capsys.readouterr()  # the build's progress bar
    assert main(["launch", f"model.path={stock}", f"run.out_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # after the launch's own progress lines
    assert last.startswith(f"config error: model.path={stock}: tokenizer lacks 1006 coord/structure tokens")
    assert "add-coord-tokens" in err and "Traceback" not in err
