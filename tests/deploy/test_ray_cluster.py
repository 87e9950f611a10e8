"""deploy/ray_cluster.yaml (A100) and ray_cluster_h100.yaml pass Ray 2.60's own cluster-config validation,
can host every GPU config, and pin each role to its node type where a config asks (node_resource)."""

from __future__ import annotations

import copy

import jsonschema
import pytest
from ray.autoscaler._private.util import prepare_config, validate_config

from tests.deploy.packing import DEPLOY, GPU_CONFIGS, ROOT, bundles, config, load_yaml, pack

CLUSTERS = [DEPLOY / "ray_cluster.yaml", DEPLOY / "ray_cluster_h100.yaml"]
CLUSTER = CLUSTERS[0]
each_cluster = pytest.mark.parametrize("cluster", CLUSTERS, ids=lambda p: p.stem)


def _validated(raw: dict) -> dict:
    """What `ray up` does before touching the cloud: fill provider defaults, then validate (schema + rules)."""
    prepared = prepare_config(copy.deepcopy(raw))
    validate_config(prepared)
    return prepared


@each_cluster
def test_cluster_yaml_passes_rays_validator(cluster):
    prepared = _validated(load_yaml(cluster))
    assert prepared["head_node_type"] == "head"
    assert {"rollout_gpu", "learner_gpu"} <= set(prepared["available_node_types"])


def test_validator_is_live_a_broken_copy_is_rejected():
    raw = load_yaml(CLUSTER)
    del raw["available_node_types"]["rollout_gpu"]["resources"]  # required by ray-schema.json
    with pytest.raises(jsonschema.ValidationError, match="resources"):
        _validated(raw)
    raw = load_yaml(CLUSTER)
    raw["max_workers"] = 0
    raw["available_node_types"]["learner_gpu"]["min_workers"] = 1  # more than the global cap
    with pytest.raises(ValueError, match="max_workers"):
        _validated(raw)


@each_cluster
def test_worker_caps_fit_under_the_global_cap(cluster):
    raw = load_yaml(cluster)
    types = raw["available_node_types"]
    assert sum(t.get("max_workers", 0) for n, t in types.items() if n != "head") <= raw["max_workers"]


def _gpu_nodes_at_max(raw: dict) -> list[dict]:
    nodes = []
    for name, t in raw["available_node_types"].items():
        if name != raw["head_node_type"]:
            nodes += [t["resources"]] * t.get("max_workers", 0)
    return nodes


@each_cluster
@pytest.mark.parametrize("name", GPU_CONFIGS)
def test_cluster_at_full_size_hosts_the_configs_bundles(name, cluster):
    raw = load_yaml(cluster)
    assert pack(bundles(config(name)), _gpu_nodes_at_max(raw)) is not None
    assert raw["available_node_types"]["head"]["resources"]["GPU"] == 0  # no GPU work lands on the head


@each_cluster
def test_a_config_too_big_for_the_cluster_does_not_pack(cluster):
    b = bundles(config("qwen3vl_8b_2nodes.yaml", ["rollout.num_actors=17"]))
    assert pack(b, _gpu_nodes_at_max(load_yaml(cluster))) is None


@each_cluster
def test_ray_starts_with_token_auth_and_a_local_dashboard(cluster):
    raw = load_yaml(cluster)
    head = " ".join(raw["head_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in head and "--dashboard-host=127.0.0.1" in head and "--head" in head
    worker = " ".join(raw["worker_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in worker and "$RAY_HEAD_IP:6379" in worker
    # Every node gets the same token as the laptop.
    assert raw["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"


@each_cluster
def test_setup_commands_install_this_project(cluster):
    raw = load_yaml(cluster)
    assert raw["file_mounts"]["~/coordexp-rl"] == "."
    assert any("deploy/setup_gpu.sh" in c for c in raw["worker_setup_commands"])
    assert any("deploy/setup.sh" in c for c in raw["head_setup_commands"])
    for script in ("setup_gpu.sh", "setup.sh"):
        assert (ROOT / "deploy" / script).is_file()
    # ray comes from the project venv on every node (the pinned 2.60.0), never a system install.
    for cmd in raw["head_start_ray_commands"] + raw["worker_start_ray_commands"]:
        assert "~/coordexp-rl/.venv/bin/ray " in cmd


def test_pack_respects_that_bundles_never_span_nodes():
    assert pack([{"GPU": 4}, {"GPU": 4}], [{"GPU": 6}, {"GPU": 2}]) is None
    assert pack([{"GPU": 4}, {"GPU": 2}], [{"GPU": 6}, {"GPU": 2}]) == [0, 0]
    assert pack([{"GPU": 8}] + [{"GPU": 1}] * 8, [{"GPU": 8}, {"GPU": 8}]) == [0] + [1] * 8


@each_cluster
def test_pinned_roles_land_only_on_their_node_types(cluster):
    """qwen3vl_8b_2nodes.yaml pins the rollout to coordexp_rollout (spot) and the learner to coordexp_learner
    (on demand): packed onto the cluster at full size, every bundle sits on a node of its role's type; with
    the learner type's resource removed the learner fits nowhere (so Ray would wait, not use spot GPUs)."""
    raw = load_yaml(cluster)
    cfg = config("qwen3vl_8b_2nodes.yaml")
    assert (cfg.rollout.node_resource, cfg.learner.node_resource) == ("coordexp_rollout", "coordexp_learner")
    types = {n: t for n, t in raw["available_node_types"].items() if n != raw["head_node_type"]}
    nodes = [(name, t["resources"]) for name, t in types.items() for _ in range(t.get("max_workers", 0))]
    b = bundles(cfg)
    where = pack(b, [r for _, r in nodes])
    assert where is not None
    roles = ["rollout_gpu"] * cfg.rollout.num_actors + ["learner_gpu"] * cfg.learner.world_size
    assert [nodes[i][0] for i in where] == roles
    without = [{k: v for k, v in r.items() if k != "coordexp_learner"} for _, r in nodes]
    assert pack(b, without) is None
    assert pack(bundles(config("qwen3vl_8b_2nodes.yaml", ["learner.node_resource="])), without) is not None


def test_a_cluster_without_the_role_resource_is_named_with_the_knob():
    from coordexp_rl.driver.placement import shortfall

    cfg = config("qwen3vl_8b_2nodes.yaml")
    have = {"CPU": 500.0, "GPU": 16.0, "coordexp_rollout": 8.0}
    assert "8 coordexp_learner (learner.node_resource), the cluster has 0" in shortfall(cfg, have)
    assert "learner.node_resource=''" in shortfall(cfg, have)
    assert shortfall(cfg, {**have, "coordexp_learner": 8.0}) == ""
