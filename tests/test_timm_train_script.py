"""The README's change to timm's train.py (benchmarks/timm_train_script.py): applied exactly, refused when
a line moved, and, given a pytorch-image-models checkout in ``NOISY_META_TIMM_CHECKOUT``, run for real."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))

import timm_train_script as script  # noqa: E402

#: The three places of timm's train.py (aa4b5850) the change touches, as they read there.
EXCERPT = (
    "from timm.utils import NativeScaler\n"
    "...\n"
    "        task = ClassificationTask(\n"
    "            model=model,\n"
    "            criterion=train_loss_fn,\n"
    "            device=device,\n"
    "            dtype=model_dtype,\n"
    "            verbose=utils.is_primary(args),\n"
    "        )\n\n"
    "    model = task.get_trainable_module()\n"
    "...\n"
    "    lr_scheduler, num_epochs = create_scheduler_v2(\n"
    "        optimizer,\n"
    "        updates_per_epoch=updates_per_epoch,\n"
    "    )\n"
    "    start_epoch = 0\n"
)


def test_the_readme_diff_is_what_the_script_applies():
    patched = script.patch_train_script(EXCERPT)
    assert "from noisy_meta.timm import MetaNoiseTask\n" in patched
    assert "task = MetaNoiseTask(\n" in patched and "ClassificationTask" not in patched
    assert "            loss_scaler=loss_scaler,\n        )\n" in patched
    assert "    )\n    task.fit_run_length(num_epochs * updates_per_epoch)\n    start_epoch = 0\n" in patched
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    for line in (
        "+from noisy_meta.timm import MetaNoiseTask",
        "+        task = MetaNoiseTask(",
        "+            loss_scaler=loss_scaler,",
        "+    task.fit_run_length(num_epochs * updates_per_epoch)",
    ):
        assert line in readme, line


def test_a_line_that_moved_is_refused():
    with pytest.raises(ValueError, match="expected the line"):
        script.patch_train_script(EXCERPT.replace("        task = ClassificationTask(\n", "    task = Other(\n"))


@pytest.mark.skipif(
    not os.environ.get("NOISY_META_TIMM_CHECKOUT"),
    reason="set NOISY_META_TIMM_CHECKOUT to a pytorch-image-models checkout to run its train.py",
)
def test_timms_own_train_script_runs_with_the_change(tmp_path):
    checkout = os.environ["NOISY_META_TIMM_CHECKOUT"]
    command = [sys.executable, script.__file__, "--timm-checkout", checkout, "--work-dir", str(tmp_path)]
    result = subprocess.run([*command, "--runs", "plain", "--epochs", "1"], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "plain-mlnt" in result.stdout
