"""Second-order MLNT on tiny configurations of the common timm families."""

from __future__ import annotations

import copy

import pytest
import timm
import torch

from noisy_meta import MetaNoiseWrapper

from helpers import FROM_FIRST_UPDATE

# (model name, constructor overrides that make it tiny, input size)
REQUIRED = {
    "resnet": ("resnet18", dict(layers=(1, 1, 1, 1), stem_width=8, channels=(8, 16, 16, 32)), 32),
    "efficientnet": ("tinynet_e", {}, 32),  # BatchNorm, squeeze-excite, SiLU
    "mobilenetv3": ("mobilenetv3_small_050", {}, 32),  # hardswish, hardsigmoid gates
    "convnext": ("convnext_atto", dict(depths=(1, 1, 1, 1), dims=(8, 16, 16, 32), drop_path_rate=0.1), 32),
    "vit": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2), 32),
}

# One small model of each further family, at its default width. Families whose smallest
# model is too slow for the suite (EfficientFormer, TinyViT at 224 px) are covered by
# benchmarks/second_order_sweep.py.
SWEEP = {
    "regnet": ("regnetx_002", {}, 32),
    "ghostnet": ("ghostnet_050", {}, 32),
    "lcnet": ("lcnet_050", {}, 32),
    "mobilenetv2": ("mobilenetv2_050", {}, 32),
    "mobilenetv4": ("mobilenetv4_conv_small", {}, 32),
    "mnasnet": ("mnasnet_small", {}, 32),
    "hardcorenas": ("hardcorenas_a", {}, 32),
    "repvgg": ("repvgg_a0", {}, 32),
    "nfnet": ("nf_resnet26", {}, 32),
    "cspnet": ("cspresnet50", {}, 32),
    "densenet": ("densenet121", dict(growth_rate=8, block_config=(1, 1, 1, 1)), 32),
    "dla": ("dla34", {}, 32),
    "rexnet": ("rexnet_100", {}, 32),
    "hgnet": ("hgnetv2_b0", {}, 32),
    "edgenext": ("edgenext_xx_small", {}, 32),
    "poolformer": ("poolformer_s12", {}, 32),
    "deit": ("deit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=1), 32),
    "eva": ("eva02_tiny_patch14_224", dict(img_size=28, depth=1), 28),
    "beit": ("beit_base_patch16_224", dict(img_size=32, patch_size=8, depth=1, embed_dim=32, num_heads=2), 32),
    "swin": (
        "swin_tiny_patch4_window7_224",
        dict(img_size=32, window_size=2, depths=(1, 1, 1, 1), embed_dim=16, num_heads=(1, 1, 2, 2)),
        32,
    ),
    "levit": ("levit_128s", {}, 224),
    "mixer": ("mixer_s16_224", dict(img_size=32), 32),
    "mobilevit": ("mobilevit_xxs", {}, 64),
    "fastvit": ("fastvit_t8", {}, 64),
    "xcit": ("xcit_nano_12_p16_224", dict(img_size=32, depth=1), 32),
    "cait": ("cait_xxs24_224", dict(img_size=32, patch_size=8, depth=1, depth_token_only=1), 32),
    "coatnet": ("coatnet_nano_rw_224", dict(img_size=64), 64),
    "efficientvit": ("efficientvit_b0", {}, 64),
}


def second_order_step(name, overrides, size, first_order=False):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=4, **overrides)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    wrapper = MetaNoiseWrapper(
        model, optimizer, num_synthetic=2, num_neighbors=3, **FROM_FIRST_UPDATE, seed=0, first_order=first_order
    )
    inputs = torch.randn(8, 3, size, size, generator=torch.Generator().manual_seed(0))
    targets = torch.randint(0, 4, (8,), generator=torch.Generator().manual_seed(1))
    return model, wrapper, inputs, targets


@pytest.mark.parametrize("family", sorted(REQUIRED))
def test_required_families_second_order_meta_gradient(family):
    name, overrides, size = REQUIRED[family]
    model, wrapper, x, y = second_order_step(name, overrides, size)
    outputs = model(x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with wrapper.forward_context():
        stats = wrapper.meta_backward(x, y, outputs)
    # The meta step never touches buffers (BatchNorm running statistics, counters).
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert stats["meta_loss"] > 0
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0

    # The second-order gradient is not the first-order one (the double backward really ran).
    first, first_wrapper, _, _ = second_order_step(name, overrides, size, first_order=True)
    first_wrapper.meta_backward(x, y, first(x))
    differs = [
        not torch.allclose(a.grad, b.grad) for a, b in zip(model.parameters(), first.parameters()) if a.grad is not None
    ]
    assert any(differs)


def test_vit_attention_is_switched_to_the_math_path_for_second_order_only():
    name, overrides, size = REQUIRED["vit"]
    model, wrapper, _, _ = second_order_step(name, overrides, size)
    attention = [m for m in model.modules() if hasattr(m, "fused_attn")]
    assert attention and all(m.fused_attn is False for m in attention)
    assert len(wrapper.compat_changes) == len(attention)
    mentor_attention = [m for m in wrapper.mentor.modules() if hasattr(m, "fused_attn")]
    assert all(m.fused_attn is True for m in mentor_attention)  # the no-grad mentor keeps the fast kernel

    first, first_wrapper, _, _ = second_order_step(name, overrides, size, first_order=True)
    assert first_wrapper.compat_changes == []
    assert all(m.fused_attn is True for m in first.modules() if hasattr(m, "fused_attn"))


def test_mobilenetv3_hardsigmoid_replacement_computes_the_same_function():
    name, overrides, size = REQUIRED["mobilenetv3"]
    torch.manual_seed(0)
    original = timm.create_model(name, num_classes=4).eval()
    converted = copy.deepcopy(original)
    optimizer = torch.optim.SGD(converted.parameters(), lr=0.01)
    wrapper = MetaNoiseWrapper(converted, optimizer, **FROM_FIRST_UPDATE)
    assert any("Hardsigmoid -> TwiceDifferentiableHardsigmoid" in c for c in wrapper.compat_changes)
    x = torch.randn(4, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(converted.eval()(x), original(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", sorted(SWEEP))
def test_family_sweep_second_order_step(family):
    name, overrides, size = SWEEP[family]
    model, wrapper, x, y = second_order_step(name, overrides, size)
    before = [p.detach().clone() for p in model.parameters()]
    stats = wrapper.step(x, y)
    assert stats["skipped"] == 0.0 and stats["meta_loss"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
