"""Model FLOPs (pipelines/training/efficiency.py) counted on the meta-device UNet equal those of a real forward +
backward at the same shapes. Integration tier only for time: torch's flop counter takes seconds on its first use."""

from __future__ import annotations

import pytest
import torch


def test_meta_flop_count_equals_a_real_step_and_scales_with_the_batch(small_model):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from model.registry import get_config
    from model.unet import UNet3D
    from pipelines.training.efficiency import step_flops, unet_sample_flops

    mc = get_config("tiny", small_model)
    u = mc.unet
    torch.manual_seed(0)
    net = UNet3D(u).train()
    x = torch.randn(3, u.in_channels, mc.num_frames, mc.height, mc.width)  # tiny: pixel space
    image = torch.randn(3, u.image_embed_dim) if u.image_embed_dim else None
    counter = FlopCounterMode(display=False)
    # the math kernel is plain matmuls: model FLOPs; the fused CPU kernel's backward would add its recomputation
    with counter, sdpa_kernel(SDPBackend.MATH):
        out = net(
            x,
            torch.tensor([1, 50, 900]),
            context=torch.randn(3, u.num_text_tokens, u.context_dim),
            image_embedding=image,
        )
        out.square().mean().backward()
    real = counter.get_total_flops()
    assert unet_sample_flops(mc, mc.num_frames) * 3 == pytest.approx(real, rel=1e-6)

    flops = step_flops(mc, image_batch=2, video_batch=3)
    assert flops.step == pytest.approx(real + 2 * flops.image_sample, rel=1e-6)
    # a clip costs more than one image, though less than num_frames images: temporal layers, shared text tokens
    assert flops.image_sample < flops.video_sample
    assert step_flops(mc, image_batch=0, video_batch=3).image_sample == 0.0
