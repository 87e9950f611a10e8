"""W&B and MLflow beside metrics.jsonl (run.loggers), offline: what each received is read back from its own
store (MLflow's SQLite database through its client; W&B's offline run file, a LevelDB-style log of
protobuf records), including a resumed run that continues the same tracker runs."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from PIL import Image

from coordexp_rl.config import ConfigError, flat_settings, load_config
from coordexp_rl.driver import trackers as trackers_module
from coordexp_rl.driver.run_log import RunLog
from coordexp_rl.driver.trackers import open_trackers

pytest.importorskip("wandb")
pytest.importorskip("mlflow")
LOGGERS = ["jsonl", "tensorboard", "wandb", "mlflow"]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    for var in ("WANDB_DIR", "WANDB_PROJECT", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)


def wandb_records(run_dir: Path) -> list:
    """The protobuf records of a W&B offline run file (``run-<id>.wandb``: a 7-byte ":W&B" header, then
    LevelDB log blocks of 32 KiB, each record in chunks with a 7-byte header: crc, length, type)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = run_dir.glob("run-*.wandb")
    data, pos, pending, records = path.read_bytes(), 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if left < 7 or (length == 0 and kind == 0):  # block trailer / padding
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk  # 1 full, 2 first, 3 middle, 4 last
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def wandb_logged(run_dir: Path) -> tuple[dict, list[dict]]:
    """(config, history rows) of one offline run."""
    config, rows = {}, []
    for r in wandb_records(run_dir):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            config.update({i.key: json.loads(i.value_json) for i in r.run.config.update})
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in r.config.update})
        elif kind == "history":
            rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
    return config, rows


def an_evaluation(out: Path) -> Path:
    folder = out / "eval" / "stage1"
    (folder / "overlays").mkdir(parents=True)
    Image.new("RGB", (8, 8), (255, 0, 0)).save(folder / "overlays" / "000_a.png")
    return folder


def one_run(out: Path, resume_step: int | None = None) -> None:
    cfg = load_config(None, [f"run.out_dir={out}", f"run.loggers={LOGGERS}".replace("'", "")])
    log = RunLog(out, resume_step, open_trackers(cfg.run.loggers, out, flat_settings(cfg.model_dump()), resume_step))
    start = resume_step or 0
    for step in (start + 1, start + 2):
        log.log("stage1", step, {"loss/total": 1.0 / step, "lr": 1e-3, "note": "text is left out"})
    headline = {"f1@0.5/f1": 0.5, "object_prob/AP50": 0.25}
    log.log("eval", start, {"label": "stage1", **{f"eval/{k}": v for k, v in headline.items()}})  # out of order
    log.evaluation("stage1", start, headline, an_evaluation(out) if resume_step is None else out / "eval" / "stage1")
    log.close()


def test_wandb_and_mlflow_receive_config_metrics_and_evaluations_and_a_resume_continues_them(tmp_path):
    from mlflow.tracking import MlflowClient

    out = tmp_path / "run"
    one_run(out)
    ids = json.loads((out / "trackers.json").read_text())

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    run = client.get_run(ids["mlflow"])
    assert run.data.params["optim.lr"] == "0.001" and run.data.params["run.loggers"].startswith("['jsonl'")
    assert run.data.tags["git_commit"] and run.data.tags["run_folder"] == str(out.resolve())
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "stage1/loss/total")] == \
        [(1, 1.0), (2, 0.5)]
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "eval/eval/f1_0.5/f1")] == [(0, 0.5)]
    assert "stage1/note" not in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "eval/stage1")}
    assert artifacts == {"eval/stage1/metrics.json", "eval/stage1/overlays"}
    assert run.info.artifact_uri.startswith((out.resolve() / "mlartifacts").as_uri())

    (first,) = (out / "wandb").glob("offline-run-*")
    assert first.name.endswith(ids["wandb"])
    config, rows = wandb_logged(first)
    assert config["optim.lr"] == 0.001 and config["git_commit"]
    steps = [(r["learner_step"], r.get("stage1/loss/total")) for r in rows if "stage1/loss/total" in r]
    assert steps == [(1, 1.0), (2, 0.5)]
    evals = [r for r in rows if "eval/stage1/table/_type" in r]  # the table, with the overlays beside it
    assert len(evals) == 1 and evals[0]["learner_step"] == 0 and "eval/stage1/overlays/count" in evals[0]
    assert [r["eval/eval/f1@0.5/f1"] for r in rows if "eval/eval/f1@0.5/f1" in r] == [0.5]

    one_run(out, resume_step=2)  # the resumed run: the same tracker runs go on
    assert json.loads((out / "trackers.json").read_text()) == ids
    assert len(client.search_runs([run.info.experiment_id])) == 1
    assert [m.step for m in client.get_metric_history(run.info.run_id, "stage1/loss/total")] == [1, 2, 3, 4]
    assert sorted(p.name.rsplit("-", 1)[1] for p in (out / "wandb").glob("offline-run-*")) == [ids["wandb"]] * 2


def test_the_trackers_honour_their_environment(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)  # a user's own MLFLOW_TRACKING_URI keeps MLflow's artifact default (./mlruns)

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'shared.db'}")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "mine")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_here"))
    out = tmp_path / "run"
    one_run(out)
    assert not (out / "mlflow.db").exists() and not (out / "wandb").exists()
    assert MlflowClient(f"sqlite:///{tmp_path / 'shared.db'}").get_experiment_by_name("mine") is not None
    assert list((tmp_path / "wandb_here" / "wandb").glob("offline-run-*"))
    assert (tmp_path / "mlruns").is_dir()


def test_a_missing_tracker_library_is_refused_naming_the_package(monkeypatch):
    real = trackers_module.importlib.util.find_spec
    monkeypatch.setattr(trackers_module.importlib.util, "find_spec", lambda m: None if m == "mlflow" else real(m))
    trackers_module.check_installed(["jsonl", "wandb"])
    with pytest.raises(ConfigError, match="run.loggers includes mlflow.*`pip install mlflow`"):
        trackers_module.check_installed(["jsonl", "mlflow"])


def test_jsonl_cannot_be_left_out():
    with pytest.raises(ConfigError, match="run.loggers: .*must include jsonl"):
        load_config(None, ["run.loggers=[wandb]"])
