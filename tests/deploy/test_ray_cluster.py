"""deploy/ray_cluster.yaml passes Ray 2.60's own cluster-config validation and can host every GPU config."""

from __future__ import annotations

import copy

import jsonschema
import pytest
from ray.autoscaler._private.util import prepare_config, validate_config

from tests.deploy.packing import DEPLOY, GPU_CONFIGS, ROOT, bundles, config, load_yaml, pack

CLUSTER = DEPLOY / "ray_cluster.yaml"


def _validated(raw: dict) -> dict:
    """What `ray up` does before touching the cloud: fill provider defaults, then validate (schema + rules)."""
    prepared = prepare_config(copy.deepcopy(raw))
    validate_config(prepared)
    return prepared


def test_cluster_yaml_passes_rays_validator():
    prepared = _validated(load_yaml(CLUSTER))
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


def test_worker_caps_fit_under_the_global_cap():
    raw = load_yaml(CLUSTER)
    types = raw["available_node_types"]
    assert sum(t.get("max_workers", 0) for n, t in types.items() if n != "head") <= raw["max_workers"]


def _gpu_nodes_at_max(raw: dict) -> list[dict]:
    nodes = []
    for name, t in raw["available_node_types"].items():
        if name != raw["head_node_type"]:
            nodes += [t["resources"]] * t.get("max_workers", 0)
    return nodes


@pytest.mark.parametrize("name", GPU_CONFIGS)
def test_cluster_at_full_size_hosts_the_configs_bundles(name):
    raw = load_yaml(CLUSTER)
    assert pack(bundles(config(name)), _gpu_nodes_at_max(raw)) is not None
    assert raw["available_node_types"]["head"]["resources"]["GPU"] == 0  # no GPU work lands on the head


def test_a_config_too_big_for_the_cluster_does_not_pack():
    b = bundles(config("qwen3vl_8b_2nodes.yaml", ["rollout.num_actors=17"]))
    assert pack(b, _gpu_nodes_at_max(load_yaml(CLUSTER))) is None


def test_ray_starts_with_token_auth_and_a_local_dashboard():
    raw = load_yaml(CLUSTER)
    head = " ".join(raw["head_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in head and "--dashboard-host=127.0.0.1" in head and "--head" in head
    worker = " ".join(raw["worker_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in worker and "$RAY_HEAD_IP:6379" in worker
    # Every node gets the same token as the laptop.
    assert raw["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"


def test_setup_commands_install_this_project():
    raw = load_yaml(CLUSTER)
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
