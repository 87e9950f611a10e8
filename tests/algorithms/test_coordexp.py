"""CoordExp (METHOD 2): projection, expectation, gradient identity, top-k, entropy, tau schedule."""

import math

import pytest
import torch

from coordexp_rl.method.coordexp import bin_values, coord_expectation, coord_logits, coordexp, tau_at

K = 1000


def two_hot_logits(a: int, b: int, pa: float) -> torch.Tensor:
    """(1, K) logits whose softmax puts pa on bin a, 1 - pa on bin b and ~0 elsewhere."""
    s = torch.full((1, K), -1e4, dtype=torch.float64)
    s[0, a], s[0, b] = math.log(pa), math.log(1 - pa)
    return s


def test_two_hot_expectation_by_hand():
    # 0.25 * 100/1000 + 0.75 * 300/1000 = 0.025 + 0.225 = 0.25
    out = coord_expectation(two_hot_logits(100, 300, 0.25))
    assert out.expectation.item() == pytest.approx(0.25, abs=1e-9)
    # entropy of (0.25, 0.75) = -(0.25 ln 0.25 + 0.75 ln 0.75) = 0.562335
    assert out.entropy.item() == pytest.approx(0.5623351446, abs=1e-6)


def test_uniform_and_one_hot_extremes():
    out = coord_expectation(torch.zeros(1, K, dtype=torch.float64))
    assert out.expectation.item() == pytest.approx(0.4995)  # mean of 0, 0.001, ..., 0.999
    assert out.entropy.item() == pytest.approx(math.log(K))
    one_hot = torch.full((1, K), -1e4, dtype=torch.float64)
    one_hot[0, 999] = 0.0
    assert coord_expectation(one_hot).expectation.item() == pytest.approx(0.999)


def test_gradient_identity_matches_autograd():
    # METHOD 2.4: d c / d s_k = (1 / tau) * p_k * (phi_k - c)
    torch.manual_seed(0)
    tau = 0.7
    s = (3 * torch.randn(4, K, dtype=torch.float64)).requires_grad_()
    out = coord_expectation(s, tau=tau)
    phi = bin_values(dtype=torch.float64)
    for i in range(4):
        (grad,) = torch.autograd.grad(out.expectation[i], s, retain_graph=True)
        p, c = out.probs[i].detach(), out.expectation[i].detach()
        expected = (1 / tau) * p * (phi - c)
        torch.testing.assert_close(grad[i], expected, rtol=1e-9, atol=1e-12)
        assert grad[[j for j in range(4) if j != i]].abs().max() == 0  # rows are independent


def test_top_k_full_equals_plain_and_small_k_renormalises():
    torch.manual_seed(1)
    s = torch.randn(3, K, dtype=torch.float64)
    plain = coord_expectation(s, tau=0.5)
    full = coord_expectation(s, tau=0.5, top_k=K)
    torch.testing.assert_close(full.expectation, plain.expectation)
    # top-2 of a 3-peak distribution: the third peak is dropped, the two kept are renormalised.
    s = torch.full((1, K), -1e4, dtype=torch.float64)
    s[0, 100], s[0, 200], s[0, 900] = math.log(0.5), math.log(0.3), math.log(0.2)
    top2 = coord_expectation(s, top_k=2)
    assert top2.expectation.item() == pytest.approx((0.5 * 0.1 + 0.3 * 0.2) / 0.8)  # 0.1375
    assert top2.probs[0, 900].item() == 0.0


def test_top_k_entropy_has_finite_gradient():
    s = torch.randn(2, K, requires_grad=True)
    out = coord_expectation(s, top_k=5)
    (out.entropy.sum() + out.expectation.sum()).backward()
    assert torch.isfinite(s.grad).all()
    assert (s.grad[0] != 0).sum() <= 5  # only the kept logits receive gradient


def test_projection_equals_gathering_full_logits():
    torch.manual_seed(2)
    V, H = 1500, 16
    W, b, h = torch.randn(V, H), torch.randn(V), torch.randn(5, H)
    full = h @ W.T + b  # (5, V)
    contiguous = list(range(400, 1400))
    scattered = torch.randperm(V)[:K].tolist()
    for ids in (contiguous, scattered):
        torch.testing.assert_close(coord_logits(h, W, ids, b), full[:, ids])
        torch.testing.assert_close(coordexp(h, W, ids, bias=b, tau=2.0).expectation,
                                   coord_expectation(full[:, ids], tau=2.0).expectation)


def test_gradient_reaches_only_coord_rows_of_lm_head():
    V, H = 1200, 8
    W = torch.randn(V, H, requires_grad=True)
    h = torch.randn(3, H, requires_grad=True)
    coordexp(h, W, list(range(100, 1100))).expectation.sum().backward()
    assert W.grad[:100].abs().max() == 0 and W.grad[1100:].abs().max() == 0
    assert W.grad[100:1100].abs().max() > 0 and h.grad.abs().max() > 0


def test_bf16_logits_are_upcast():
    s = torch.randn(2, K).to(torch.bfloat16)
    out = coord_expectation(s)
    assert out.expectation.dtype == torch.float32
    torch.testing.assert_close(out.probs.sum(-1), torch.ones(2))


@pytest.mark.parametrize("step,schedule,expected", [
    (0, "linear", 2.0), (5, "linear", 1.5), (10, "linear", 1.0), (99, "linear", 1.0),
    (0, "cosine", 2.0), (5, "cosine", 1.5), (10, "cosine", 1.0),
    (2, "cosine", 2.0 - 0.5 * (1 - math.cos(math.pi * 0.2))),
])
def test_tau_schedule(step, schedule, expected):
    assert tau_at(step, 2.0, 1.0, 10, schedule) == pytest.approx(expected)


def test_tau_errors():
    assert tau_at(3, 2.0, 1.0, 0) == 1.0
    with pytest.raises(ValueError, match="unknown tau schedule"):
        tau_at(1, 2.0, 1.0, 10, "exp")
    with pytest.raises(ValueError, match="tau must be > 0"):
        coord_expectation(torch.zeros(1, K), tau=0.0)
