"""The vision patch embedding runs as one matmul (modeling/load.py): the same outputs and gradients as
transformers' Conv3d, on the same parameter, so checkpoints and weight sync are untouched."""

from __future__ import annotations

import torch

from coordexp_rl.modeling.load import load_model_and_processor


def test_linear_patch_embed_matches_the_conv(tiny_model_dir):
    model, _, _ = load_model_and_processor(tiny_model_dir)
    embed = model.model.visual.patch_embed
    assert "forward" in vars(embed), "the loader should install the linear forward"
    conv = embed.proj
    patches = torch.randn(12, conv.in_channels * embed.temporal_patch_size * embed.patch_size ** 2,
                          generator=torch.Generator().manual_seed(0))

    linear_out = embed(patches)
    linear_grad = torch.autograd.grad(linear_out.square().sum(), conv.weight)[0]
    conv_out = type(embed).forward(embed, patches)  # transformers' Conv3d forward
    conv_grad = torch.autograd.grad(conv_out.square().sum(), conv.weight)[0]

    assert linear_out.shape == conv_out.shape == (12, conv.out_channels)
    torch.testing.assert_close(linear_out, conv_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(linear_grad, conv_grad, rtol=1e-4, atol=1e-4)  # float summation order
    assert set(model.state_dict()) >= {"model.visual.patch_embed.proj.weight"}  # the key the checkpoints use
