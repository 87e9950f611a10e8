"""Losses: chunked weighted CE against the naive full-logits CE, position weights, box losses, combiners."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from coordexp_rl.config import LossConfig
from coordexp_rl.method.coordexp import coord_expectation
from coordexp_rl.method.coords import CoordVocab
from coordexp_rl.method.losses import (
    FLOAT32_BLOCK_ROWS,
    box_iou,
    coord_l1,
    coord_soft_ce,
    coord_terms,
    coord_w1,
    generalized_box_iou,
    geo_loss,
    giou_loss,
    l1_box_loss,
    position_weights,
    weighted_token_ce,
    weighted_total,
)


def naive_ce(hidden, W, targets, weights, bias=None):
    logits = hidden @ W.T + (0 if bias is None else bias)  # (T, V): what the chunked path avoids
    return (F.cross_entropy(logits, targets, reduction="none") * weights).sum()


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 100])
@pytest.mark.parametrize("with_bias", [False, True])
def test_chunked_ce_matches_naive_value_and_gradients(chunk_size, with_bias):
    torch.manual_seed(0)
    T, H, V = 11, 6, 40
    h = torch.randn(T, H, dtype=torch.float64, requires_grad=True)
    W = torch.randn(V, H, dtype=torch.float64, requires_grad=True)
    b = torch.randn(V, dtype=torch.float64, requires_grad=True) if with_bias else None
    y = torch.randint(0, V, (T,))
    w = torch.tensor([0, 0, 1, 1, 2.5, 1, 0, 1, 1, 3, 1], dtype=torch.float64)
    out = weighted_token_ce(h, W, y, w, bias=b, chunk_size=chunk_size)
    (2.0 * out.loss_sum).backward()  # a non-unit upstream grad must be propagated
    grads = [t.grad.clone() for t in (h, W, b) if t is not None]
    for t in (h, W, b):
        if t is not None:
            t.grad = None
    ref = naive_ce(h, W, y, w, b)
    (2.0 * ref).backward()
    torch.testing.assert_close(out.loss_sum.double(), ref.double(), rtol=1e-6, atol=1e-6)
    for got, t in zip(grads, [t for t in (h, W, b) if t is not None]):
        torch.testing.assert_close(got, t.grad, rtol=1e-6, atol=1e-8)
    assert out.weight_sum.item() == pytest.approx(11.5)
    # skipped positions: no NLL reported and exactly zero gradient
    assert out.token_nll[[0, 1, 6]].abs().max() == 0
    assert grads[0][[0, 1, 6]].abs().max() == 0


@pytest.mark.parametrize("contiguous", [True, False])
def test_fused_coord_logits_match_naive_gather_with_gradients(contiguous):
    # CE + a CoordExp loss on the same forward: value and gradients equal the full-logits way.
    from coordexp_rl.method.coordexp import coord_expectation

    torch.manual_seed(3)
    T, H, V, K = 9, 5, 60, 20
    ids = list(range(30, 30 + K)) if contiguous else torch.randperm(V)[:K].tolist()
    h = torch.randn(T, H, dtype=torch.float64, requires_grad=True)
    W = torch.randn(V, H, dtype=torch.float64, requires_grad=True)
    b = torch.randn(V, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, V, (T,))
    w = torch.tensor([0, 1, 1, 1, 2, 2, 1, 0, 1], dtype=torch.float64)
    pos = torch.tensor([3, 4, 7, 8])  # position 7 has CE weight 0 but is still a coord position

    def loss_from(ce_sum, coord_logits):
        return ce_sum / 10 + 3.0 * coord_expectation(coord_logits, tau=0.5).expectation.pow(2).sum()

    out = weighted_token_ce(h, W, y, w, bias=b, chunk_size=4, coord_positions=pos, coord_ids=ids)
    loss_from(out.loss_sum, out.coord_logits).backward()
    got = [t.grad.clone() for t in (h, W, b)]
    for t in (h, W, b):
        t.grad = None
    full = h @ W.T + b
    ref = loss_from(naive_ce(h, W, y, w, b), full[pos][:, ids])
    ref.backward()
    for g, t in zip(got, (h, W, b)):
        torch.testing.assert_close(g, t.grad, rtol=1e-7, atol=1e-10)
    with pytest.raises(RuntimeError, match="one backward per forward"):
        out2 = weighted_token_ce(h, W, y, w, coord_positions=pos, coord_ids=ids)
        out2.loss_sum.backward(retain_graph=True)
        out2.loss_sum.backward()


def test_token_nll_by_hand():
    # 2 classes, logits (0, ln 3) -> p(class 1) = 3/4, NLL = ln(4/3); target 0 -> NLL = ln 4
    W = torch.tensor([[0.0], [1.0]])
    h = torch.tensor([[math.log(3)], [math.log(3)]])
    out = weighted_token_ce(h, W, torch.tensor([1, 0]), torch.tensor([1.0, 2.0]))
    assert out.token_nll.tolist() == pytest.approx([math.log(4 / 3), math.log(4)])
    assert out.loss_sum.item() == pytest.approx(math.log(4 / 3) + 2 * math.log(4))


def test_all_zero_weights_gives_zero_loss_that_backprops():
    h = torch.randn(4, 3, requires_grad=True)
    W = torch.randn(10, 3, requires_grad=True)
    out = weighted_token_ce(h, W, torch.zeros(4, dtype=torch.long), torch.zeros(4))
    out.loss_sum.backward()
    assert out.loss_sum.item() == 0.0 and h.grad.abs().max() == 0 and W.grad.abs().max() == 0


def test_frozen_lm_head_gets_no_gradient():
    h = torch.randn(5, 3, requires_grad=True)
    W = torch.randn(10, 3)  # frozen
    out = weighted_token_ce(h, W, torch.arange(5), torch.ones(5), chunk_size=2)
    out.loss_sum.backward()
    assert W.grad is None and h.grad.abs().max() > 0


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="expected hidden"):
        weighted_token_ce(torch.randn(4, 3), torch.randn(10, 3), torch.arange(3), torch.ones(4))


VOCAB = CoordVocab(tuple(range(100, 1100)), obj_open=1, obj_close=2, desc_open=3, desc_close=4,
                   box_open=5, box_close=6, eos_id=9)


def test_position_weights_by_hand():
    #      prompt | <obj> <desc> cat </desc> <box> c c c c </box> </obj> eos | "\n"
    ids = [7, 7, 7, 1, 3, 50, 4, 5, 110, 310, 410, 705, 6, 2, 9, 8]
    w = position_weights(ids, VOCAB, prompt_len=3, lambda_coord_ce=0.5, eos_weight=3.0)
    assert w.tolist() == [0, 0, 0, 1, 1, 1, 1, 1, 1.5, 1.5, 1.5, 1.5, 1, 1, 3.0, 0]
    # an eos inside the prompt does not count; no eos in the assistant part: everything supervised
    w = position_weights([9, 1, 3, 50], VOCAB, prompt_len=1, eos_weight=5.0)
    assert w.tolist() == [0, 1, 1, 1]
    with pytest.raises(ValueError, match="prompt_len 9"):
        position_weights([1, 2], VOCAB, prompt_len=9)


def test_desc_weight_covers_exactly_the_description_tokens():
    #      prompt | <obj> <desc> red  sq  </desc> <box> c c c c </box> </obj> <obj> <desc> cat </desc> ... eos
    ids = [7, 7, 1, 3, 50, 51, 4, 5, 110, 310, 410, 705, 6, 2, 1, 3, 52, 4, 5, 100, 100, 200, 200, 6, 2, 9]
    w = position_weights(ids, VOCAB, prompt_len=2, lambda_coord_ce=1.0, desc_weight=4.0)
    obj1 = [1, 1, 4, 4, 1, 1, 2, 2, 2, 2, 1, 1]
    obj2 = [1, 1, 4, 1, 1, 2, 2, 2, 2, 1, 1]
    assert w.tolist() == [0, 0, *obj1, *obj2, 1]
    # None keeps the text weight on descriptions (the old behaviour)
    assert position_weights(ids, VOCAB, prompt_len=2)[4].item() == 1.0


# ---- boxes ---------------------------------------------------------------------------------------------


def test_giou_hand_values():
    a = torch.tensor([[0.0, 0.0, 0.1, 0.1]])
    assert generalized_box_iou(a, a).item() == pytest.approx(1.0)
    # disjoint: union 0.02, hull 0.3 x 0.1 = 0.03 -> GIoU = 0 - 0.01 / 0.03 = -1/3
    b = torch.tensor([[0.2, 0.0, 0.3, 0.1]])
    assert box_iou(a, b).item() == 0.0
    assert generalized_box_iou(a, b).item() == pytest.approx(-1 / 3, abs=1e-5)
    # shifted by half a width: intersection 2, union 6 (in units of 0.01) -> IoU 1/3, GIoU 1/3 (hull = union)
    c, d = torch.tensor([[0.0, 0.0, 0.2, 0.2]]), torch.tensor([[0.1, 0.0, 0.3, 0.2]])
    assert box_iou(c, d).item() == pytest.approx(1 / 3, abs=1e-5)
    assert giou_loss(c, d).item() == pytest.approx(2 / 3, abs=1e-5)


def test_pairwise_shapes_and_values():
    a = torch.tensor([[0.0, 0.0, 0.2, 0.2], [0.5, 0.5, 0.6, 0.6]])
    b = torch.tensor([[0.0, 0.0, 0.2, 0.2], [0.1, 0.0, 0.3, 0.2], [0.5, 0.5, 0.6, 0.6]])
    iou = box_iou(a, b)
    assert iou.shape == (2, 3)
    torch.testing.assert_close(iou, torch.tensor([[1.0, 1 / 3, 0.0], [0.0, 0.0, 1.0]]), atol=1e-5, rtol=0)


def test_inverted_box_counts_as_empty_and_its_gradient_uninverts():
    gt = torch.tensor([[0.2, 0.2, 0.4, 0.4]])
    inverted = torch.tensor([[0.4, 0.4, 0.2, 0.2]], requires_grad=True)
    # Evaluation gives an inverted box IoU 0: here area 0, IoU 0, hull = gt -> GIoU 0; loss 1 + depth 0.4
    assert box_iou(inverted.detach(), gt).item() == 0.0
    loss = giou_loss(inverted, gt)
    assert loss.item() == pytest.approx(1.0 + 0.2 + 0.2, abs=1e-5)
    loss.backward()
    # x1 (0.4) must move left and x2 (0.2) right: d loss / d x1 > 0, d loss / d x2 < 0 (same for y)
    gx1, gy1, gx2, gy2 = inverted.grad[0].tolist()
    assert gx1 > 0 and gy1 > 0 and gx2 < 0 and gy2 < 0
    # a sorted-coordinates GIoU would have called this box perfect (loss 0) and locked it in
    collapsed = torch.tensor([[0.3, 0.3, 0.3, 0.3]], requires_grad=True)  # zero area
    loss = geo_loss(collapsed, gt)
    loss.backward()
    assert torch.isfinite(collapsed.grad).all() and collapsed.grad.abs().max() > 0
    # L1 = 0.1 * 4 = 0.4; IoU = 0; hull = gt (0.04), union 0.04 -> GIoU 0 -> 1 - GIoU = 1
    assert loss.item() == pytest.approx(1.4, abs=1e-5)


def test_geo_loss_weights_and_reductions():
    pred = torch.tensor([[0.1, 0.1, 0.3, 0.3], [0.5, 0.5, 0.7, 0.7]])
    gt = torch.tensor([[0.1, 0.1, 0.3, 0.3], [0.5, 0.5, 0.7, 0.8]])
    l1 = l1_box_loss(pred, gt, "none")
    torch.testing.assert_close(l1, torch.tensor([0.0, 0.1]))
    gl = giou_loss(pred, gt, "none")  # second: IoU = 0.04 / 0.06, hull = union -> 1 - 2/3
    torch.testing.assert_close(gl, torch.tensor([0.0, 1 / 3]), atol=1e-5, rtol=0)
    total = geo_loss(pred, gt, alpha=2.0, beta=0.5)
    assert total.item() == pytest.approx(2.0 * 0.1 + 0.5 / 3, abs=1e-5)
    assert geo_loss(pred, gt, reduction="mean").item() == pytest.approx((0.1 + 1 / 3) / 2, abs=1e-5)
    empty = torch.zeros(0, 4, requires_grad=True)
    assert geo_loss(empty, torch.zeros(0, 4)).item() == 0.0


def test_coord_l1():
    c = torch.tensor([0.1, 0.5])
    assert coord_l1(c, torch.tensor([120, 500])).item() == pytest.approx(0.02)


def test_weighted_total():
    ce = torch.tensor(1.0, requires_grad=True)
    geo = torch.tensor(0.4, requires_grad=True)
    total, terms = weighted_total(ce, {"geo": (geo, 2.0), "ent": (torch.tensor(3.0), 0.1), "w1": (None, 5.0),
                                       "off": (torch.tensor(9.0), 0.0)}, "ce_gt")
    assert total.item() == pytest.approx(1.0 + 0.8 + 0.3)
    assert terms == pytest.approx({"ce_gt": 1.0, "geo": 0.4, "ent": 3.0, "w1": 0.0, "off": 9.0, "total": 2.1})
    total.backward()
    assert geo.grad.item() == pytest.approx(2.0) and ce.grad.item() == 1.0


def test_coord_terms_per_stage_are_the_sums_of_the_module_docstring():
    cfg = LossConfig(lambda_l1=4.0, lambda_giou=8.0, lambda_w1=0.5, lambda_geo=3.0, alpha_l1=1.0, beta_giou=2.0)
    # one box, one bin off on x1 only: L1 sum = 1e-3; (1 - GIoU) = 1 - 0.199 / 0.2 (areas 0.2 x 0.2 / 0.199 x 0.2)
    target = torch.tensor([0.100, 0.100, 0.300, 0.300])
    logits = torch.full((4, 1000), -1e4)
    logits[torch.arange(4), torch.tensor([101, 100, 300, 300])] = 0.0  # one-hot at the predicted bins
    out = coord_expectation(logits)
    giou = 1 - 0.199 / 0.2
    stage1 = coord_terms("stage1", cfg, out, target)
    assert {k: lam for k, (_, lam) in stage1.items()} == {"l1_coord": 4.0, "giou_coord": 8.0, "soft_ce_coord": 0.0,
                                                          "w1_coord": 0.5}
    assert stage1["l1_coord"][0].item() == pytest.approx(1e-3, abs=1e-6)
    assert stage1["giou_coord"][0].item() == pytest.approx(giou, abs=1e-5)
    assert stage1["w1_coord"][0].item() == pytest.approx(1e-3, abs=1e-6)  # one-hot: W1 = |bin distance| / 1000
    assert stage1["soft_ce_coord"][0] is None  # not weighed -> not computed
    stage2 = coord_terms("stage2", cfg, out, target)
    assert stage2["geo_self"] == (pytest.approx(1e-3 + 2 * giou, abs=1e-5), 3.0)
    assert stage2["entropy"][0].item() == pytest.approx(0.0, abs=1e-6)
    assert coord_terms("stage2", cfg) == {"geo_self": (None, 3.0), "entropy": (None, 0.0)}


def test_soft_ce_by_hand():
    # K = 3 bins, target bin 1, sigma 1: q = [e^-.5, 1, e^-.5] / (1 + 2 e^-.5)
    e = math.exp(-0.5)
    q = [e / (1 + 2 * e), 1 / (1 + 2 * e), e / (1 + 2 * e)]
    logits = torch.tensor([[0.0, math.log(2.0), 0.0]])  # p = [1/4, 1/2, 1/4]
    expected = q[0] * math.log(4) + q[1] * math.log(2) + q[2] * math.log(4)
    assert coord_soft_ce(logits, torch.tensor([1]), sigma=1.0).item() == pytest.approx(expected, rel=1e-5)
    # its minimum is the soft target itself (CE >= entropy of q), below a one-hot peak and a uniform guess
    at_q = coord_soft_ce(torch.tensor([q]).log(), torch.tensor([1]), 1.0)
    entropy_q = -sum(x * math.log(x) for x in q)
    assert at_q.item() == pytest.approx(entropy_q, rel=1e-5)
    for other in (torch.tensor([[-5.0, 5.0, -5.0]]), torch.zeros(1, 3)):
        assert at_q < coord_soft_ce(other, torch.tensor([1]), 1.0)
    # a tiny sigma tends to the hard CE
    hard = -torch.log_softmax(logits, -1)[0, 1].item()
    assert coord_soft_ce(logits, torch.tensor([1]), sigma=0.05).item() == pytest.approx(hard, rel=1e-5)
    with pytest.raises(ValueError, match="sigma"):
        coord_soft_ce(logits, torch.tensor([1]), sigma=0.0)


def test_w1_by_hand_and_against_l1_of_the_expectation():
    # p = [0.25, 0.5, 0.25] over bins 0..2, target bin 0: W1 = (0.5 * 1 + 0.25 * 2) / 1000
    logits = torch.tensor([[0.0, math.log(2.0), 0.0]], requires_grad=True)
    w1 = coord_w1(logits, torch.tensor([0]))
    assert w1.item() == pytest.approx(1.0 / 1000, rel=1e-5)
    w1.backward()
    assert logits.grad[0, 0] < 0 < logits.grad[0, 2]  # mass moves toward the target bin
    # two peaks around the target: the expectation sits on it (L1 0), W1 charges the spread
    two = torch.tensor([[0.0, -1e4, 0.0]])
    assert coord_w1(two, torch.tensor([1])).item() == pytest.approx(1e-3, rel=1e-5)


def test_sum_normalisation_hand_worked_two_objects():
    """METHOD 12's two objects as the learner weighs them: every term summed, one divisor W (losses.py)."""
    # Per object: 2 desc tokens x desc_weight 4 + 6 structure x 1 + 4 coords x (1 + 1); then eos 1 once.
    ids = [7, 1, 3, 50, 51, 4, 5, 210, 310, 410, 705, 6, 2, 1, 3, 52, 53, 4, 5, 620, 385, 990, 760, 6, 2, 9]
    w = position_weights(ids, VOCAB, prompt_len=1, lambda_coord_ce=1.0, desc_weight=4.0)
    assert w.sum().item() == 2 * (2 * 4 + 6 + 4 * 2) + 1 == 45
    # This W divides every term of the step (Stage-1: CE sum, lambda_L1 x L1 sum, lambda_GIoU x GIoU sum;
    # tests/learner/test_learner.py checks the Learner's terms against it).


def test_bf16_inputs_give_fp32_loss_close_to_fp32_reference():
    torch.manual_seed(4)
    h, W = torch.randn(6, 8), torch.randn(30, 8)
    y, w = torch.randint(0, 30, (6,)), torch.ones(6)
    out = weighted_token_ce(h.bfloat16().requires_grad_(), W.bfloat16().requires_grad_(), y, w, chunk_size=4)
    out.loss_sum.backward()
    assert out.loss_sum.dtype == torch.float32
    assert out.loss_sum.item() == pytest.approx(naive_ce(h, W, y, w).item(), rel=0.05)


class _LargestFloat32(TorchDispatchMode):
    """Records the element count of the largest float32 tensor any op creates."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                self.largest = max(self.largest, t.numel())
        return out


def _naive_ce_with_coords(h, W, y, w, pos, ids):
    """The reference: full (T, V) logits in the input dtype, float32 CE, coord columns gathered from them."""
    logits = h @ W.T
    ce = (F.cross_entropy(logits.float(), y, reduction="none") * w).sum()
    return ce, logits[pos][:, ids]


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("chunk_size", [64, 256])
def test_chunked_ce_and_coord_logits_match_naive_full_logits(dtype, rtol, chunk_size):
    # 100 positions: chunk 64 gives a full and a partial chunk, each over several float32 blocks (bf16)
    torch.manual_seed(5)
    T, H, V = 100, 32, 1200
    h0, W0 = torch.randn(T, H) * 0.5, torch.randn(V, H) * H ** -0.5
    y, w = torch.randint(0, V, (T,)), torch.rand(T) * 2
    w[::7] = 0.0  # skipped positions
    pos, ids = torch.arange(3, 43, 2), torch.arange(100, 1100)
    phi = torch.rand(len(ids))  # any function of the coord logits: a random linear read-out of softmax

    def run(fused: bool):
        h, W = h0.to(dtype).requires_grad_(), W0.to(dtype).requires_grad_()
        if fused:
            out = weighted_token_ce(h, W, y, w, chunk_size=chunk_size, coord_positions=pos, coord_ids=ids)
            ce, coord = out.loss_sum, out.coord_logits
        else:
            ce, coord = _naive_ce_with_coords(h, W, y, w, pos, ids)
        loss = ce / w.sum() + (coord.float().softmax(-1) @ phi).sum()
        loss.backward()
        return [loss.detach().float(), h.grad.float(), W.grad.float()]

    for got, ref in zip(run(True), run(False)):
        assert float((got - ref).abs().max() / ref.abs().max()) <= rtol


def test_bf16_ce_never_holds_float32_logits_of_a_whole_chunk():
    torch.manual_seed(6)
    T, H, V, chunk = 256, 16, 2000, 256
    h = torch.randn(T, H).bfloat16().requires_grad_()
    W = (torch.randn(V, H) * 0.25).bfloat16().requires_grad_()
    y, w = torch.randint(0, V, (T,)), torch.ones(T)
    with _LargestFloat32() as probe:
        weighted_token_ce(h, W, y, w, chunk_size=chunk).loss_sum.backward()
    # one float32 block of rows at a time; the chunk's (256, V) logits stay bf16
    assert probe.largest == FLOAT32_BLOCK_ROWS * V < chunk * V
