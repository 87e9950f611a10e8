"""The Learner on the tiny model, in one process (no Ray)."""

import dataclasses
import time

import pytest
import torch

from coordexp_rl.config import load_config
from coordexp_rl.data.loader import load_image, load_samples
from coordexp_rl.method.protocol import BoxObject, build_assistant_ids, parse_ids
from coordexp_rl.modeling.inputs import encode_prompt
from coordexp_rl.rollout.schema import RolloutRow
from learner.learner import Learner
from learner.step_timer import PhaseTimer


@pytest.fixture(scope="module")
def samples(synth_dir):
    return load_samples(synth_dir / "train.jsonl")[:4]


def make_learner(tiny_model_dir, *overrides):
    cfg = load_config(None, ["optim.warmup_steps=0", "optim.batch_size=4", *overrides])
    return Learner(cfg, tiny_model_dir)


def rollout_of(learner, sample, objects):
    """A rollout row whose generated ids write ``objects`` (as the rollout actor would store it)."""
    prompt = encode_prompt(learner.processor, load_image(sample), learner.cfg.data.prompt)["input_ids"].tolist()
    generated = build_assistant_ids(objects, learner.tokenizer, learner.vocab)
    parsed = parse_ids(generated, learner.tokenizer, learner.vocab)
    return RolloutRow(sample_id=sample.sample_id, prompt_ids=prompt, generated_ids=generated, objects=parsed.objects,
                      parse_status=parsed.status)


def test_stage1_steps_lower_the_loss_on_a_fixed_batch(tiny_model_dir, samples):
    learner = make_learner(tiny_model_dir, "optim.lr=3e-3", "loss.lambda_l1=1.0")
    losses = [learner.stage1_step(samples)["loss/total"] for _ in range(6)]
    assert losses[-1] < losses[0] - 0.5, losses
    assert learner.step == 6


def test_prefetching_stage1_steps_equal_one_step_at_a_time(tiny_model_dir, synth_dir):
    """``stage1_steps`` builds the next batch on a thread: same batches, orders, weights and stream state."""
    from coordexp_rl.data.stream import BatchStream

    train = load_samples(synth_dir / "train.jsonl")[:12]
    overrides = ("stage1.order=random", "optim.batch_size=3")  # random order: the step number reaches the data
    a, b = make_learner(tiny_model_dir, *overrides), make_learner(tiny_model_dir, *overrides)
    stream_a, stream_b = BatchStream(train, 3, seed=1), BatchStream(train, 3, seed=1)
    losses_a = [a.stage1_step(stream_a.next_batch())["loss/total"] for _ in range(5)]
    losses_b = [m["loss/total"] for m in b.stage1_steps(stream_b.next_batch, 5)]
    assert losses_a == losses_b and b.step == 5
    assert stream_a.state() == stream_b.state()  # no batch drawn beyond the n steps
    for (name, wa), (_, wb) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert torch.equal(wa, wb), name


def test_stage1_terms_are_sums_over_the_batch_ce_weight(tiny_model_dir, samples):
    """Every Stage-1 term is summed over the batch and divided by one number, its CE weight W."""
    learner = make_learner(tiny_model_dir, "loss.lambda_l1=0", "loss.lambda_giou=1.0", "loss.lambda_w1=0.5",
                           "optim.lr=1e-12")
    W = sum(float(learner.sequences.gt_sequence(s, s.objects, eos_weight=1.0).ce_weights[1:].sum()) for s in samples)
    boxes = sum(len(s.objects) for s in samples)
    m = learner.stage1_step(samples)
    assert 0 < m["loss/giou_coord"] * W <= 4 * boxes  # per box: 1 - GIoU <= 2, inversion <= 2 (x and y)
    assert 0 < m["loss/w1_coord"] * W <= 4 * boxes and m["loss/l1_coord"] > 0
    assert m["loss/total"] == pytest.approx(m["loss/ce_all"] + m["loss/giou_coord"] + 0.5 * m["loss/w1_coord"],
                                            rel=1e-5)


def test_every_step_reports_its_peak_memory(tiny_model_dir, samples):
    """On the CPU the process's peak resident memory (GiB); on a GPU the step's peak allocation."""
    learner = make_learner(tiny_model_dir)
    m = learner.stage1_step(samples)
    assert 0.1 < m["memory/peak_rss_gib"] < 64 and "memory/peak_device_gib" not in m
    row = rollout_of(learner, samples[0], samples[0].objects)
    later = learner.stage2_step([row], {samples[0].sample_id: samples[0]})["memory/peak_rss_gib"]
    assert later >= m["memory/peak_rss_gib"]


def test_every_step_reports_where_its_time_went(tiny_model_dir, samples):
    """time/*: the phases of the step (learner/step_timer.py), each positive, inside the step's wall time;
    Stage-2 adds the host time of matching and building the sequences."""
    learner = make_learner(tiny_model_dir, "learner.accum_steps=2")
    t0 = time.perf_counter()
    m = learner.stage1_step(samples)
    wall = time.perf_counter() - t0
    phases = {k: v for k, v in m.items() if k.startswith("time/")}
    assert set(phases) == {"time/prepare_s", "time/forward_s", "time/backward_s", "time/optimizer_s"}
    assert all(v > 0 for v in phases.values()) and sum(phases.values()) <= wall
    row = rollout_of(learner, samples[0], samples[0].objects)
    t0 = time.perf_counter()
    m2 = learner.stage2_step([row], {samples[0].sample_id: samples[0]})
    wall = time.perf_counter() - t0
    stage2 = {k: v for k, v in m2.items() if k.startswith("time/")}
    assert set(stage2) == set(phases) | {"time/sequences_s"} and all(v > 0 for v in stage2.values())
    assert sum(stage2.values()) <= wall


def test_phase_timer_adds_up_a_phase_marked_twice():
    timer = PhaseTimer(torch.device("cpu"))
    for _ in range(2):
        time.sleep(0.02)
        timer.mark("a")
        time.sleep(0.01)
        timer.mark("b")
    got = timer.seconds()
    assert set(got) == {"a", "b"} and got["a"] >= 0.04 and 0.02 <= got["b"] < got["a"]


def test_stage2_runs_at_its_own_learning_rate(tiny_model_dir, samples):
    learner = make_learner(tiny_model_dir, "optim.lr=1e-3", "stage1.steps=3", "stage2.lr=4e-4")
    lrs = [learner.stage1_step(samples)["lr"] for _ in range(3)]
    assert lrs[0] < 1e-3 and lrs[-1] == pytest.approx(4e-4)  # the cosine ends, Stage-2's own lr begins
    row = rollout_of(learner, samples[0], samples[0].objects)
    assert learner.stage2_step([row], {samples[0].sample_id: samples[0]})["lr"] == pytest.approx(4e-4)


def test_stage2_step_matches_and_sends_finite_gradients_to_coord_rows(tiny_model_dir, samples):
    learner = make_learner(tiny_model_dir)
    rows = [rollout_of(learner, s, [BoxObject(o.desc, tuple(min(999, b + 5) for b in o.bins))
                                    for o in reversed(s.objects)]) for s in samples]
    by_id = {s.sample_id: s for s in samples}
    metrics = learner.stage2_step(rows, by_id)
    n_objects = sum(len(s.objects) for s in samples)
    assert metrics["match/matched"] * len(rows) == n_objects
    assert metrics["match/missed"] == 0 and metrics["match/extra"] == 0
    assert metrics["match/mean_iou"] > 0.8 and metrics["loss/geo_self"] > 0
    grad = learner.model.lm_head.weight.grad[list(learner.vocab.coord_ids)]
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_gt_geometry_supervises_every_gt_box_in_stage2(tiny_model_dir, samples):
    """stage2.gt_geometry: a rollout whose boxes all miss (nothing gated in) still gets a geometric loss,
    from every GT box teacher-forced on the CE path's sequence."""
    sample = samples[0]
    far = [BoxObject(o.desc, (990, 990, 999, 999)) for o in sample.objects]

    def geo(*overrides):
        learner = make_learner(tiny_model_dir, *overrides)
        m = learner.stage2_step([rollout_of(learner, sample, far)], {sample.sample_id: sample})
        return m["match/matched"], m["loss/geo_self"]

    assert geo() == (0, 0)
    matched, loss = geo("stage2.gt_geometry=true")
    assert matched == 0 and loss > 0


def test_geometric_loss_alone_moves_coordexp_toward_gt(tiny_model_dir, samples):
    """With CE switched off, Stage-2 steps only follow L1 + GIoU: the decoded box approaches the GT box."""
    learner = make_learner(tiny_model_dir, "optim.lr=1e-3", "loss.eos_weight=0", "loss.lambda_coord_ce=0")
    head = learner._lm_head_losses  # geometry only: every CE weight 0 (the coord logits still come out)
    learner._lm_head_losses = lambda sup: head({**sup, "ce_weights": sup["ce_weights"] * 0})
    sample = samples[0]
    row = rollout_of(learner, sample, sample.objects)
    losses = [learner.stage2_step([row], {sample.sample_id: sample})["loss/geo_self"] for _ in range(10)]
    assert max(losses[-3:]) < 0.75 * losses[0], losses


def test_failed_parse_falls_back_to_stage1_loss(tiny_model_dir, samples):
    learner = make_learner(tiny_model_dir)
    sample = samples[0]
    row = dataclasses.replace(rollout_of(learner, sample, []), generated_ids=[1, 2, 3], objects=[],
                              parse_status="failed")
    metrics = learner.stage2_step([row], {sample.sample_id: sample})
    assert metrics["match/parse_failure_rate"] == 1.0
    assert metrics["loss/geo_self"] == 0.0 and metrics["loss/ce_gt"] > 0


def test_resume_continues_bit_for_bit(tiny_model_dir, synth_dir, tmp_path):
    from learner.ray_learner import LearnerWorker

    cfg = load_config(None, ["optim.batch_size=2", "optim.warmup_steps=2", "stage1.order=random",
                             "stage1.steps=5", "loss.lambda_l1=0.5"]).model_dump()
    train = str(synth_dir / "train.jsonl")
    a = LearnerWorker(cfg, str(tiny_model_dir), train)
    a.stage1_steps(3)
    a.save_checkpoint(str(tmp_path / "ckpt"))
    losses_a = [m["loss/total"] for m in a.stage1_steps(2)]
    b = LearnerWorker(cfg, str(tiny_model_dir), train)
    assert b.load_checkpoint(str(tmp_path / "ckpt"))["step"] == 3
    losses_b = [m["loss/total"] for m in b.stage1_steps(2)]
    assert losses_a == losses_b
    for (name, wa), (_, wb) in zip(a.learner.model.state_dict().items(), b.learner.model.state_dict().items()):
        assert torch.equal(wa, wb), name
    assert a.learner.scheduler.get_last_lr() == b.learner.scheduler.get_last_lr()


def test_export_loads_back_in_transformers(tiny_model_dir, tmp_path, samples):
    from coordexp_rl.modeling.load import load_model_and_processor

    learner = make_learner(tiny_model_dir, "optim.lr=1e-2")
    learner.stage1_step(samples)
    model, _, vocab = load_model_and_processor(learner.export_pretrained(tmp_path / "export"))
    assert vocab == learner.vocab
    for name, w in learner.model.state_dict().items():
        assert torch.equal(w, model.state_dict()[name]), name
