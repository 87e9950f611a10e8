"""The teacher-forced side of the exposure-bias measurement (``Learner.teacher_forced_ious``), tiny model."""

import pytest
import torch

from coordexp_rl.config import load_config
from coordexp_rl.data.loader import load_samples
from learner.learner import Learner


@pytest.fixture(scope="module")
def val(synth_dir):
    return load_samples(synth_dir / "val.jsonl")[:5]


def make_learner(tiny_model_dir, *overrides):
    return Learner(load_config(None, ["optim.warmup_steps=0", "optim.batch_size=5", *overrides]), tiny_model_dir)


def mean(ious):
    flat = [v for per_image in ious for v in per_image]
    return sum(flat) / len(flat)


def test_one_iou_per_gt_box_and_no_training_state_touched(tiny_model_dir, val):
    learner = make_learner(tiny_model_dir)
    params = {n: p.detach().clone() for n, p in learner.model.named_parameters()}
    rng, mode = torch.get_rng_state(), learner.model.training
    ious = learner.teacher_forced_ious(val, batch_size=2)  # 3 batches, the last one short
    assert [len(x) for x in ious] == [len(s.objects) for s in val]
    assert all(0.0 <= v <= 1.0 for x in ious for v in x)
    assert torch.equal(torch.get_rng_state(), rng)
    assert learner.model.training == mode and learner.step == 0 and not learner.optimizer.state
    assert learner.scheduler.last_epoch == 0
    for n, p in learner.model.named_parameters():
        assert torch.equal(p, params[n]) and p.grad is None, n
    assert learner.teacher_forced_ious([], batch_size=2) == []


def test_decoded_coords_are_those_stage1_trains(tiny_model_dir, val):
    """The coordinates behind the IoUs are Stage-1's CoordExp decode at the GT's coord positions (states at
    t-1): their L1 to the targets is Stage-1's l1_coord term (x its normaliser W)."""
    learner = make_learner(tiny_model_dir, "optim.lr=1e-12", "loss.lambda_l1=1.0")
    seqs = [learner._gt_coord_sequence(s) for s in val]
    with torch.no_grad():
        coords = learner._decode_coords(seqs)
    l1 = sum(abs(c - t) for seq, cs in zip(seqs, coords) for c, t in zip(cs, seq.coord_targets))
    W = sum(float(s.ce_weights[1:].sum()) for s in seqs)
    assert learner.stage1_step(val)["loss/l1_coord"] * W == pytest.approx(l1, rel=1e-4)


@pytest.fixture(scope="module")
def trained(tiny_model_dir, val, tmp_path_factory):
    """The untrained tiny model decodes every coordinate near 0.5 (degenerate boxes, IoU 0); 16 Stage-1 steps
    at a high lr, geometry-heavy, on the first 3 images. Returns the IoUs before and after, the learner, and
    its weights exported (a model with IoUs > 0 for the tests below)."""
    learner = make_learner(tiny_model_dir, "optim.lr=1e-2", "optim.batch_size=3", "loss.lambda_coord_ce=0",
                           "loss.desc_weight=0", "loss.lambda_l1=20")
    before = learner.teacher_forced_ious(val[:3], batch_size=3)
    for _ in range(16):
        learner.stage1_step(val[:3])
    after = learner.teacher_forced_ious(val[:3], batch_size=3)
    return before, after, learner, learner.export_pretrained(tmp_path_factory.mktemp("exposure") / "model")


def test_teacher_forced_iou_rises_as_stage1_learns(trained, val):
    before, after, learner, _ = trained
    print(f"teacher-forced mean IoU: {mean(before):.4f} -> {mean(after):.4f}")
    assert mean(after) > mean(before) + 0.1, (before, after)
    assert all(0.0 <= v <= 1.0 for x in after for v in x)
    # the batching (padding) does not change the numbers
    again = learner.teacher_forced_ious(val[:3], batch_size=2)
    assert sum(again, []) == pytest.approx(sum(after, []), abs=1e-4)


def test_worker_runs_the_first_n_validation_samples(trained, synth_dir):
    from learner.ray_learner import LearnerWorker

    _, after, learner, model_dir = trained
    cfg = load_config(None, ["optim.batch_size=2"]).model_dump()
    worker = LearnerWorker(cfg, str(model_dir), str(synth_dir / "train.jsonl"))
    got = worker.teacher_forced_ious(str(synth_dir / "val.jsonl"), None, 3)
    assert sum(got, []) == pytest.approx(sum(after, []), abs=1e-4)


# --- W = 2 ranks (gloo, CPU): every rank runs the same number of forwards, rank 0 gets every IoU ---------

RANK_OVERRIDES = ["optim.warmup_steps=0", "optim.batch_size=4", "optim.lr=1e-3"]


def exposure_schedule(learner, val, train) -> dict:
    """Uneven shares (3 images: 2 + 1; 1 image: 1 + 0, a rank with nothing runs a forward anyway), then a
    training step (FSDP after a no-grad forward), then the IoUs again."""
    return {"n3_b1": learner.teacher_forced_ious(val[:3], 1), "n1_b2": learner.teacher_forced_ious(val[:1], 2),
            "loss": learner.stage1_step(train[:4])["loss/total"], "after_step": learner.teacher_forced_ious(val[:3], 2)}


def _rank_main(rank: int, world: int, port: int, model_dir: str, synth: str, out: str):
    import torch.distributed as dist

    from coordexp_rl.runtime import prepare_runtime
    from learner.distributed import ParallelPlan, init_process_group

    prepare_runtime()
    init_process_group(rank, world, "127.0.0.1", port, use_cuda=False, timeout_s=120)
    val, train = load_samples(f"{synth}/val.jsonl"), load_samples(f"{synth}/train.jsonl")
    results = {}
    for sharding in ("replicate", "fsdp"):
        learner = Learner(load_config(None, RANK_OVERRIDES), model_dir, ParallelPlan(sharding=sharding))
        results[sharding] = exposure_schedule(learner, val, train)
    torch.save(results, f"{out}.{rank}")
    dist.destroy_process_group()


def test_two_ranks_equal_one_rank(trained, synth_dir, val, tmp_path):
    import torch.multiprocessing as mp

    from learner.distributed import free_port

    model_dir = trained[3]
    want = exposure_schedule(Learner(load_config(None, RANK_OVERRIDES), model_dir), val,
                             load_samples(synth_dir / "train.jsonl"))
    assert mean(want["n3_b1"]) > 0.1  # a model with boxes to compare
    out = tmp_path / "results.pt"
    mp.spawn(_rank_main, nprocs=2, join=True, args=(2, free_port(), str(model_dir), str(synth_dir), str(out)))
    for rank in (0, 1):
        for sharding, got in torch.load(f"{out}.{rank}", weights_only=False).items():
            for key in ("n3_b1", "n1_b2", "after_step"):
                assert sum(got[key], []) == pytest.approx(sum(want[key], []), abs=1e-4), (rank, sharding, key)
            assert got["loss"] == pytest.approx(want["loss"], rel=1e-4), (rank, sharding)
