"""Sweep: one second-order MLNT step on one small model of each common timm family.

Each model is built at its default width and its default input size (CNNs at 32x32), with
M=1, batch 6, k=2. Prints one row per model: OK with the step's seconds and what the wrapper
changed to make it twice-differentiable, or the error.

    python benchmarks/second_order_sweep.py [MODEL ...]
"""

from __future__ import annotations

import sys
import time
import warnings

import timm
import torch

from noisy_meta import MetaNoiseWrapper

MODELS = [
    "resnet10t",
    "efficientnet_b0",
    "tinynet_e",
    "mobilenetv2_050",
    "mobilenetv3_small_050",
    "mobilenetv4_conv_small",
    "convnext_atto",
    "regnetx_002",
    "ghostnet_050",
    "lcnet_050",
    "mnasnet_small",
    "hardcorenas_a",
    "repvgg_a0",
    "nf_resnet26",
    "cspresnet50",
    "densenet121",
    "dla34",
    "rexnet_100",
    "hgnetv2_b0",
    "edgenext_xx_small",
    "poolformer_s12",
    "vit_tiny_patch16_224",
    "deit_tiny_patch16_224",
    "beit_base_patch16_224",
    "eva02_tiny_patch14_224",
    "swin_tiny_patch4_window7_224",
    "levit_128s",
    "mixer_s32_224",
    "xcit_nano_12_p16_224",
    "cait_xxs24_224",
    "maxvit_nano_rw_256",
    "coatnet_nano_rw_224",
    "efficientformer_l1",
    "mobilevit_xxs",
    "fastvit_t8",
    "tiny_vit_5m_224",
    "efficientvit_b0",
    "convmixer_768_32",
]


def input_size(model: torch.nn.Module) -> int:
    """32 px for models that take any size, the pretrained size for those that fix it."""
    size = model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
    try:
        with torch.no_grad():
            model.eval()(torch.randn(2, 3, 32, 32))
        return 32
    except Exception:
        return size
    finally:
        model.train()


def sweep_one(name: str) -> str:
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=5)
    size = input_size(model)
    inputs, targets = torch.randn(6, 3, size, size), torch.randint(0, 5, (6,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    try:
        wrapper = MetaNoiseWrapper(model, optimizer, num_synthetic=1, num_neighbors=2, ramp_start=0, ramp_end=0, seed=0)
        start = time.perf_counter()
        stats = wrapper.step(inputs, targets)
        seconds = time.perf_counter() - start
    except Exception as error:  # report, do not stop the sweep
        return f"| {name} | {size} | FAIL | {type(error).__name__}: {str(error)[:120]} |"
    kinds = sorted({change.split(": ", 1)[1] for change in wrapper.compat_changes})
    status = "OK" if stats["skipped"] == 0.0 else "skipped (non-finite)"
    return f"| {name} | {size} | {status} | {seconds:.1f} s; changes: {', '.join(kinds) or 'none'} |"


def main() -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    print("| model | input | second order | step time, changes |")
    print("|---|---|---|---|")
    for name in sys.argv[1:] or MODELS:
        print(sweep_one(name), flush=True)


if __name__ == "__main__":
    main()
