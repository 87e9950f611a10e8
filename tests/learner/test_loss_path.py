"""The learner's loss path: token CE and CoordExp in one pass over the LM head."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from coordexp_rl.config import load_config
from learner.learner import Learner


class _NewBuffersOfShape(TorchDispatchMode):
    """Distinct storages of a given shape that ops create (views and in-place results share theirs)."""

    def __init__(self, shape, skip: torch.Tensor):
        super().__init__()
        self.shape, self.storages = tuple(shape), set()
        self.skip = skip.untyped_storage().data_ptr()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and tuple(t.shape) == self.shape:
                ptr = t.untyped_storage().data_ptr()
                if ptr != self.skip:
                    self.storages.add(ptr)
        return out


def test_ce_and_coordexp_share_one_lm_head_gradient_buffer(tiny_model_dir):
    learner = Learner(load_config(None, ["loss.lambda_l1=1.0", "loss.lambda_giou=1.0"]), tiny_model_dir)
    weight = learner.lm_head_weight
    V, H = weight.shape
    g = torch.Generator().manual_seed(0)
    sup = {"ce_hidden": torch.randn(12, H, generator=g), "ce_targets": torch.randint(0, V, (12,), generator=g),
           "ce_weights": torch.ones(12), "coord_hidden": torch.randn(8, H, generator=g),
           "coord_targets": torch.rand(8, generator=g) * 0.5}
    with _NewBuffersOfShape((V, H), skip=weight) as probe:
        total, terms = learner._losses("stage1", sup, torch.tensor(12.0))
        total.backward()
    assert terms["l1_coord"] > 0 and terms["ce_all"] > 0  # both losses ran
    # One (V, H) buffer holds the CE's and CoordExp's gradient; a separate coord-row projection adds a
    # zero-filled (V, H) gradient of the slice and a third for the sum.
    assert len(probe.storages) == 1
    assert weight.grad is not None and weight.grad[list(learner.vocab.coord_ids)].abs().sum() > 0
