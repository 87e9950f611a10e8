"""deploy/runtime_env.yaml: valid for Ray, and the package Ray builds from it has the code but no venv/runs."""

from __future__ import annotations

import zipfile

from ray._private.runtime_env.packaging import create_package
from ray.runtime_env import RuntimeEnv

from tests.deploy.packing import DEPLOY, ROOT, load_yaml

ENV = DEPLOY / "runtime_env.yaml"


def test_runtime_env_validates_with_ray():
    env = load_yaml(ENV)
    assert env["working_dir"] == "."
    RuntimeEnv(**{**env, "working_dir": str(ROOT)})  # `ray job submit` resolves "." against the repo root
    assert env["env_vars"]["HF_HUB_OFFLINE"] == "1"
    assert all(isinstance(v, str) for v in env["env_vars"].values())  # Ray rejects non-string values


def _package_names(tmp_path, root, excludes) -> set[str]:
    # The same zip `ray job submit` uploads; include_gitignore=False so only our excludes act.
    target = tmp_path / "pkg.zip"
    create_package(str(root), target, include_gitignore=False, excludes=excludes)
    with zipfile.ZipFile(target) as z:
        return set(z.namelist())


def test_excludes_drop_heavy_folders_but_keep_every_package(tmp_path):
    root = tmp_path / "repo"
    for rel in [".venv/lib/torch.so", "runs/default/checkpoints/step-000100/model.safetensors",
                ".git/objects/ab", "data/coco/train2017.jsonl", "models/tiny/config.json",
                "coordexp_rl/__pycache__/x.pyc", "coordexp_rl/data/loader.py", "coordexp_rl/launch.py",
                "actors/buffer.py", "learner/learner.py", "configs/qwen3vl_2b_1node.yaml",
                "coordexp_rl.egg-info/PKG-INFO"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("x")
    names = _package_names(tmp_path, root, load_yaml(ENV)["excludes"])
    files = {n for n in names if not n.endswith("/")}
    assert files == {"coordexp_rl/data/loader.py", "coordexp_rl/launch.py", "actors/buffer.py",
                     "learner/learner.py", "configs/qwen3vl_2b_1node.yaml"}


def test_the_real_checkout_packages_small_with_configs_and_code(tmp_path):
    names = _package_names(tmp_path, ROOT, load_yaml(ENV)["excludes"])
    assert {"coordexp_rl/launch.py", "configs/qwen3vl_2b_1node.yaml", "actors/rollout_actor.py",
            "learner/ray_learner.py"} <= names
    assert not any(n.startswith((".venv/", "runs/", ".git/")) for n in names)
    assert (tmp_path / "pkg.zip").stat().st_size < 50 * 2**20  # far below Ray's ~500 MiB upload cap


def test_the_stop_wait_covers_a_checkpoint_of_the_largest_config():
    """RAY_JOB_STOP_WAIT_TIME_S in deploy/runtime_env.yaml (and the KubeRay jobs, which copy its env_vars):
    the 8B configs' checkpoint size (memory.checkpoint_gb) at 250 MB/s to shared storage, through the
    driver's own rule (run_control.stop_wait_seconds)."""
    from coordexp_rl.driver.run_control import stop_wait_seconds
    from coordexp_rl.modeling.memory import checkpoint_gb
    from tests.deploy.packing import GPU_CONFIGS, config

    wait = float(load_yaml(DEPLOY / "runtime_env.yaml")["env_vars"]["RAY_JOB_STOP_WAIT_TIME_S"])
    largest = max(checkpoint_gb(config(name)) for name in GPU_CONFIGS)
    assert 100 < largest < 102  # Qwen3-VL-8B: float32 weights + AdamW moments
    need = stop_wait_seconds(largest * 1e9 / 250e6)
    assert need == 836 and need <= wait < need + 100


def test_the_driver_warns_when_the_stop_wait_is_shorter_than_its_checkpoints(monkeypatch):
    from coordexp_rl.driver.run_control import stop_wait_warning

    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert stop_wait_warning(400.0) is None  # not a submitted job: nothing to warn about
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")  # set by Ray's job supervisor
    monkeypatch.delenv("RAY_JOB_STOP_WAIT_TIME_S", raising=False)
    assert "RAY_JOB_STOP_WAIT_TIME_S=3 s: set RAY_JOB_STOP_WAIT_TIME_S >= 830" in stop_wait_warning(400.0)
    monkeypatch.setenv("RAY_JOB_STOP_WAIT_TIME_S", "900")
    assert stop_wait_warning(400.0) is None and stop_wait_warning(450.0) is not None
