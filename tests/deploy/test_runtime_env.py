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
