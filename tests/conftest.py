"""Shared fixtures. prepare_runtime() runs before any test module imports transformers or vLLM."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordexp_rl.runtime import prepare_runtime

prepare_runtime()


# The longest files, longest first (seconds on one xdist worker beside the other, 2 cores; README "Tests"),
# except that the fault runs (busy on both cores) start beside the two-node runs (mostly waiting on Ray).
LONGEST_FILES = ("distributed/test_faults.py", "distributed/test_two_nodes.py", "distributed/test_actor_restart.py",
                 "distributed/test_resume.py", "distributed/test_lost_learner_node.py", "deploy/test_gpu_check.py",
                 "deploy/test_ablate.py",
                 "distributed/test_ray_job.py", "distributed/test_reproducible.py", "distributed/test_sync_faults.py",
                 "distributed/test_placement_wait.py")


def pytest_collection_modifyitems(config, items):
    """The longest files first, then the other files with integration tests, then the rest (each file kept
    whole, in its own order): xdist's --dist loadfile hands files out in this order to whichever worker is
    free, so the long ones start early and the short ones fill the gaps at the end (longest first keeps
    the two workers' ends close). gpu-marked tests skip, with the reason, where torch sees no CUDA device."""
    import torch

    tests = Path(__file__).parent
    if missing := [name for name in LONGEST_FILES if not (tests / name).is_file()]:
        raise pytest.UsageError(f"tests/conftest.py LONGEST_FILES names files that are not there: {missing}")
    slow_files = {item.path for item in items if "integration" in item.keywords}

    def rank(item) -> int:
        name = item.path.relative_to(tests).as_posix()
        if name in LONGEST_FILES:
            return LONGEST_FILES.index(name)
        return len(LONGEST_FILES) + (item.path not in slow_files)

    items.sort(key=rank)  # stable: files stay whole and in order
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def ray_local():
    """A local 2-CPU Ray instance for the module (on 127.0.0.1), or the one already up (left to its owner)."""
    import os

    import ray

    own = not ray.is_initialized()
    if own:
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # else Ray binds the external interface
        ray.init(num_cpus=2, include_dashboard=False, address="local", _node_ip_address="127.0.0.1",
                 log_to_driver=False)
    yield ray
    if own:
        ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The default tiny Qwen3-VL folder (seed 0, local tokenizer, coord tokens), built once per session."""
    from coordexp_rl.modeling.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny_model") / "model", seed=0)


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    """A small synthetic shapes set: 32 train, 8 val images of 128 px, 1-3 objects."""
    from coordexp_rl.data.synth import make_synthetic_set

    out = tmp_path_factory.mktemp("synth")
    make_synthetic_set(out, n_train=32, n_val=8, seed=0, image_size=128, min_objects=1, max_objects=3)
    return out


@pytest.fixture
def no_tf32(monkeypatch):
    """Full fp32 on the GPU for CUDA-vs-CPU comparisons: cuDNN convolutions (the patch embedding) and
    matmuls may default to TF32's 10-bit mantissa."""
    import torch

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
