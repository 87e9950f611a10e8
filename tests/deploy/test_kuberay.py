"""deploy/kuberay/rayjob.yaml (2B, one node) and rayjob_8b.yaml (8B, two nodes pinned by role): each parses,
runs an existing config, and its pods cover that config's bundles (custom role resources included)."""

from __future__ import annotations

import json
import shlex

import pytest
import ray
import yaml
from ray.runtime_env import RuntimeEnv

from coordexp_rl.config import load_config
from tests.deploy.packing import DEPLOY, ROOT, bundles, load_yaml, pack

JOBS = [DEPLOY / "kuberay" / "rayjob.yaml", DEPLOY / "kuberay" / "rayjob_8b.yaml"]
each_job = pytest.mark.parametrize("job", JOBS, ids=lambda p: p.stem, indirect=True)


@pytest.fixture
def job(request) -> dict:
    return load_yaml(request.param)


def _config_of(job: dict):
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "coordexp_rl.launch"]
    path = argv[argv.index("--config") + 1]
    assert (ROOT / path).is_file(), path
    return load_config(ROOT / path, [a for a in argv[3:] if "=" in a])


def _quantity(v) -> float:
    return float(str(v))


def _custom(params: dict) -> dict:
    """rayStartParams.resources, KubeRay's form '"{\\"name\\": n}"' (passed to `ray start --resources`)."""
    text = params.get("resources")
    if not text:
        return {}
    assert text.startswith('"') and text.endswith('"'), text
    return {k: float(v) for k, v in json.loads(text[1:-1].replace('\\"', '"')).items()}


def _pods(job: dict) -> list[tuple[str, dict]]:
    """(image, Ray resources) of every Ray pod at the group's replica count."""
    spec = job["spec"]["rayClusterSpec"]
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    pods = [(head["image"], {"CPU": _quantity(head["resources"]["limits"]["cpu"]), "GPU": 0.0})]
    for group in spec["workerGroupSpecs"]:
        c = group["template"]["spec"]["containers"][0]
        lim = c["resources"]["limits"]
        res = {"CPU": _quantity(lim["cpu"]), "GPU": _quantity(lim.get("nvidia.com/gpu", 0)),
               **_custom(group["rayStartParams"])}
        pods += [(c["image"], res)] * group["replicas"]
    return pods


@each_job
def test_rayjob_shape(job):
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert job["spec"]["shutdownAfterJobFinishes"] is True


@each_job
def test_entrypoint_names_an_existing_config_that_loads(job):
    cfg = _config_of(job)
    assert cfg.rollout.engine == "vllm" and cfg.model.dtype == "bfloat16"


@each_job
def test_worker_pods_cover_the_configs_bundles(job):
    cfg = _config_of(job)
    pods = _pods(job)
    b = bundles(cfg)
    want_gpu = cfg.rollout.num_actors * cfg.rollout.gpus_per_actor + cfg.learner.gpus * cfg.learner.world_size
    assert sum(r["GPU"] for _, r in pods) >= want_gpu in (8, 16)
    assert pack(b, [r for _, r in pods]) is not None
    # GPU requests equal limits (Kubernetes requires it for extended resources).
    for group in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        res = group["template"]["spec"]["containers"][0]["resources"]
        assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"]


@each_job
def test_one_image_everywhere_and_the_ray_version_we_pin(job):
    images = {img for img, _ in _pods(job)}
    images.add(job["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["image"])
    assert len(images) == 1
    assert job["spec"]["rayClusterSpec"]["rayVersion"] == ray.__version__ == "2.60.0"
    assert f"ray{ray.__version__}" in images.pop()


@each_job
def test_every_pod_uses_the_same_token_auth(job):
    spec = job["spec"]["rayClusterSpec"]
    containers = [spec["headGroupSpec"]["template"]["spec"]["containers"][0],
                  job["spec"]["submitterPodTemplate"]["spec"]["containers"][0]]
    containers += [g["template"]["spec"]["containers"][0] for g in spec["workerGroupSpecs"]]
    for c in containers:
        env = {e["name"]: e for e in c["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token", c["name"]
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "coordexp-ray-token", "key": "token"}


@each_job
def test_runtime_env_is_valid_and_matches_the_cli_one(job):
    env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert env["working_dir"] == "/home/ray/coordexp-rl"  # the checkout inside the image
    RuntimeEnv(**{**env, "working_dir": str(ROOT)})  # Ray's own validation; it checks the folder exists
    cli = load_yaml(DEPLOY / "runtime_env.yaml")
    assert env["env_vars"] == cli["env_vars"]
    # The data and run paths the config names are mounted in every Ray pod.
    cfg = _config_of(job)
    spec = job["spec"]["rayClusterSpec"]
    for tpl in [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]:
        mounts = [m["mountPath"] for m in tpl["spec"]["containers"][0]["volumeMounts"]]
        for path in (cfg.data.train, cfg.data.train_image_root, cfg.data.val_image_root, cfg.run.out_dir):
            assert any(path.startswith(m + "/") for m in mounts), (path, mounts)


def test_the_8b_job_pins_each_role_to_its_own_worker_group():
    """rayjob_8b.yaml: the learner's bundles need coordexp_learner, which only the learner group declares,
    and the rollout's need coordexp_rollout, only on the (spot) rollout group; model.path is set."""
    job = load_yaml(JOBS[1])
    cfg = _config_of(job)
    assert cfg.model.path == "/data/models/Qwen3-VL-8B-Instruct-coord"
    groups = {g["groupName"]: _custom(g["rayStartParams"]) for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]}
    assert groups == {"rollout": {cfg.rollout.node_resource: 8.0}, "learner": {cfg.learner.node_resource: 8.0}}
    pods = _pods(job)
    where = pack(bundles(cfg), [r for _, r in pods])
    names = ["head", *(g["groupName"] for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"])]
    assert [names[i] for i in where] == ["rollout"] * cfg.rollout.num_actors + ["learner"] * cfg.learner.world_size
