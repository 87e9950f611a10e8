"""CUDA variants of the loss tests: the chunked CE, CoordExp and the box losses agree on CUDA and CPU.

Skipped without a CUDA device (tests/conftest.py); `pytest -m gpu` and deploy/gpu_check.sh run them.
"""

import pytest
import torch

from coordexp_rl.method.coordexp import coord_expectation, coordexp
from coordexp_rl.method.losses import geo_loss, giou_loss, weighted_token_ce

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("no_tf32")]  # fixture: tests/conftest.py


T, H, V, K = 300, 256, 8192, 1000
COORD_START = V - 1006  # coord ids one contiguous range near the end, as in a real vocabulary


def _inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(T, H, generator=g, dtype=dtype) * 0.5
    weight = torch.randn(V, H, generator=g, dtype=dtype) * H ** -0.5
    targets = torch.randint(0, V, (T,), generator=g)
    weights = torch.rand(T, generator=g) * 2
    weights[:40] = 0  # prompt positions: skipped
    pos = torch.arange(60, 100)
    return hidden, weight, targets, weights, pos


def _ce_with_coords(hidden, weight, targets, weights, pos, device, chunk_size=64):
    h = hidden.to(device).detach().requires_grad_()  # a leaf of its own (never the caller's tensor)
    w = weight.to(device).detach().requires_grad_()
    out = weighted_token_ce(h, w, targets.to(device), weights.to(device), chunk_size=chunk_size,
                            coord_positions=pos.to(device), coord_ids=torch.arange(COORD_START, COORD_START + K))
    boxes = coord_expectation(out.coord_logits).expectation.view(-1, 4)
    gt = torch.linspace(0.1, 0.9, boxes.numel(), device=device).view(-1, 4).sort(-1).values
    total = out.loss_sum / out.weight_sum + geo_loss(boxes, gt)
    total.backward()
    return total.detach().cpu(), h.grad.cpu(), w.grad.cpu(), out.token_nll.cpu()


@pytest.mark.parametrize("chunk_size", [64, 256])
def test_chunked_ce_with_coordexp_matches_cpu_on_cuda(chunk_size):
    x = _inputs()
    cpu = _ce_with_coords(*x, "cpu", chunk_size)
    cuda = _ce_with_coords(*x, "cuda", chunk_size)
    torch.testing.assert_close(cuda[0], cpu[0], rtol=1e-4, atol=1e-5)
    for got, want in zip(cuda[1:], cpu[1:]):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-5)
    assert cuda[3][:40].abs().max() == 0  # skipped positions: no NLL


def test_chunked_ce_bf16_on_cuda_is_close_to_fp32():
    """bf16 hidden + LM head (the bench's --dtype bfloat16): the softmax runs in fp32, the loss stays close."""
    x = _inputs()
    ref = _ce_with_coords(*x, "cuda")[0]
    bf = _ce_with_coords(*(t.to(torch.bfloat16) if t.is_floating_point() and t.dim() == 2 else t for t in x), "cuda")
    assert torch.isfinite(bf[0])
    assert abs(float(bf[0]) - float(ref)) < 2e-2 * abs(float(ref))
    assert bf[2].dtype == torch.bfloat16 and torch.isfinite(bf[2].float()).all()


def test_coordexp_top_k_and_entropy_match_cpu_on_cuda():
    g = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(16, 64, generator=g), torch.randn(1200, 64, generator=g)
    ids = list(range(100, 1100))
    outs = {}
    for device in ("cpu", "cuda"):
        h = hidden.detach().to(device).requires_grad_()  # a fresh leaf per device (.to("cpu") is `hidden` itself)
        out = coordexp(h, weight.to(device), ids, tau=0.7, top_k=50)
        (out.expectation.sum() + out.entropy.sum()).backward()
        outs[device] = (out.expectation.detach().cpu(), out.entropy.detach().cpu(), h.grad.cpu())
    for got, want in zip(outs["cuda"], outs["cpu"]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_giou_loss_matches_cpu_on_cuda():
    g = torch.Generator().manual_seed(2)
    a = torch.rand(64, 4, generator=g).sort(-1).values  # x1 <= y1 <= x2 <= y2: valid boxes
    b = torch.rand(64, 4, generator=g).sort(-1).values
    want = giou_loss(a, b)
    got = giou_loss(a.cuda(), b.cuda())
    assert got.device.type == "cuda"
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-6)
