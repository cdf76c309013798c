"""`MetaNoiseWrapper.step` under FSDP2 (``fully_shard``), two real processes (gloo on CPU), against DDP.

The trunk sharded (`noisy_meta.fully_shard_trunk`), the head (the fast weights) left whole: students and mentors
equal the DDP run of the same per-rank batches, the trunk's parameters take half the memory per process, a run saved
with torch.distributed.checkpoint resumes into new objects equal to the uninterrupted one, and what the meta step
cannot do under FSDP2 is refused with one line naming what works. The runs are in `tests/fsdp_worker.py`.

The command line's ``--fsdp``: two-process runs of `examples/finetune.py` equal the DDP run bit for bit, write the
same whole-tensor checkpoints, resume across the two, and refuse what they cannot run.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_distributed import TESTS, launch

from finetune_helpers import EXAMPLE, FAST, flat_tensors, metrics, without_timings


@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory) -> dict:
    path = tmp_path_factory.mktemp("fsdp") / "results.json"
    launch(TESTS / "fsdp_worker.py", str(path))
    return json.loads(path.read_text())


@pytest.mark.parametrize("run", ["head", "head_clipped", "last_stage", "lora_head"])
def test_two_sharded_processes_train_as_ddp_does(fsdp_results, run):
    """FSDP2 reduce-scatters the trunk's gradient in its backward, the library all-reduces the whole fast weights':
    bit for bit DDP's run (the head or the last stage fast; the head of a LoRA model, its adapters sharded with the
    trunk), to float rounding with the global norm clipped over sharded and whole gradients."""
    result = fsdp_results[run]
    assert result["max_difference"] == 0.0 if run != "head_clipped" else result["max_difference"] < 1e-6
    assert result["updates"] == 3
    assert result["meta_losses"] == pytest.approx(result["reference_meta_losses"], rel=1e-5)


def test_fully_shard_trunk_makes_each_block_a_unit_and_leaves_the_fast_weights_whole(fsdp_results):
    resnet = fsdp_results["head"]["layout"]
    blocks = [f"layer{stage}.0" for stage in range(1, 5)]  # the tiny ResNet: one block per stage
    assert resnet["units"] == ["", *blocks] and resnet["whole"] == ["fc.weight", "fc.bias"]
    last_stage = fsdp_results["last_stage"]["layout"]
    assert last_stage["units"] == ["", *blocks[:3]]  # the last stage holds fast weights: whole, in the root's group
    assert last_stage["whole"][0].startswith("layer4.") and last_stage["whole"][-2:] == ["fc.weight", "fc.bias"]
    vit = fsdp_results["vit_layout"]
    assert vit["units"] == ["", "blocks.0", "blocks.1"] and vit["whole"] == ["head.weight", "head.bias"]
    lora = fsdp_results["lora_head"]["layout"]
    assert lora["units"][0] == "" and len(lora["units"]) == 5  # the PEFT model the root, the timm model's blocks
    assert all("head" in name or "fc" in name for name in lora["whole"])


def test_fully_shard_trunk_refuses_fast_weights_it_cannot_leave_whole():
    from noisy_meta import fully_shard_trunk

    with pytest.raises(ValueError, match=r"fast_params='all': under FSDP2 the fast weights must be a suffix"):
        fully_shard_trunk(torch.nn.Linear(2, 2), "all")


def test_meta_weight_zero_two_sharded_half_batches_match_one_process_on_the_whole_batch(fsdp_results):
    assert fsdp_results["half_batch_max_difference"] < 1e-6


def test_accelerates_prepared_optimizer_and_accelerator_train_the_same(fsdp_results):
    assert fsdp_results["accelerate_difference"] == 0.0


def test_each_process_holds_half_the_parameters(fsdp_results):
    sizes = fsdp_results["parameter_bytes"]
    assert sizes["fsdp"] / sizes["ddp"] < 0.55  # the head (whole on every process) is the rest


def test_a_run_resumed_from_a_distributed_checkpoint_equals_the_uninterrupted_one(fsdp_results):
    assert fsdp_results["resume_difference"] == 0.0


def test_what_fsdp2_cannot_run_is_refused_naming_what_works(fsdp_results):
    refused = fsdp_results["refusals"]
    assert "fast_params='head'" in refused["all_fast"] and "ignored_params" in refused["all_fast"]
    assert "pass mentor=" in refused["no_mentor"]
    assert "the student's copy" in refused["other_mentor"]
    assert "use MetaNoiseWrapper.step" in refused["timm_task"]
    assert "MetaNoiseWrapper.step only" in refused["own_loop"]


# ------------------------------------------------------------------------------- the command line's --fsdp

#: `finetune_helpers.FAST` with the meta step in second order (the head's), checkpoints every 2 updates kept.
CLI_FLAGS = [flag for flag in FAST if flag != "--first-order"] + ["--keep-checkpoints", "3", "--checkpoint-every", "2"]


@pytest.fixture(scope="module")
def cli_runs(tiny_mnist, tmp_path_factory) -> tuple[Path, list[str], str]:
    """Two two-process runs of the command line, the same but for ``--fsdp`` (whose fast weights default to the
    head) against DDP with ``--fast-params head``, each exported; returns their folder, flags and --fsdp's output."""
    root = tmp_path_factory.mktemp("fsdp_cli")
    flags = ["--dataset", str(tiny_mnist), *CLI_FLAGS]
    result = launch(
        EXAMPLE, *flags, "--output-dir", str(root / "fsdp"), "--export-dir", str(root / "fsdp_export"), "--fsdp"
    )
    launch(
        EXAMPLE,
        *flags,
        "--output-dir",
        str(root / "ddp"),
        "--export-dir",
        str(root / "ddp_export"),
        "--fast-params",
        "head",
    )
    return root, flags, result.stdout


def assert_same_checkpoint(ours: Path, theirs: Path) -> None:
    for name in ("student.safetensors", "mentor.safetensors", "model.safetensors"):
        a, b = load_file(str(ours / name)), load_file(str(theirs / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], v) for k, v in b.items()), name
    optimizers = [torch.load(folder / "optimizer.bin", weights_only=True) for folder in (ours, theirs)]
    assert optimizers[0]["param_groups"] == optimizers[1]["param_groups"]
    assert all(torch.equal(a, b) for a, b in zip(*map(flat_tensors, optimizers), strict=True))


@pytest.mark.slow
def test_the_command_lines_fsdp_run_is_its_ddp_run_and_writes_the_same_whole_files(cli_runs):
    """``--fsdp`` shards student and mentor (the head whole): metrics, checkpoints (every file Accelerate writes for a
    prepared model and optimizer, gathered whole) and the export are bit for bit the DDP run's."""
    root, _, stdout = cli_runs
    assert "--fsdp defaults: {" in stdout and "'fast_params': 'head'" in stdout
    assert without_timings(metrics(root / "fsdp")) == without_timings(metrics(root / "ddp"))
    assert metrics(root / "fsdp")[-1]["train_meta_loss"] > 0  # the meta step ran
    for folder in ("last", "best", "checkpoints/update_6"):
        assert_same_checkpoint(root / "fsdp" / folder, root / "ddp" / folder)
    exported = [load_file(str(root / export / "model.safetensors")) for export in ("fsdp_export", "ddp_export")]
    assert all(torch.equal(exported[0][k], v) for k, v in exported[1].items())
    assert (root / "fsdp" / "label_issues.csv").read_text() == (root / "ddp" / "label_issues.csv").read_text()


@pytest.mark.slow
def test_a_ddp_checkpoint_resumes_under_fsdp_to_the_uninterrupted_end(cli_runs):
    """The files hold whole tensors either way: a DDP run's mid-epoch checkpoint continues under ``--fsdp``, each
    process taking its shards, and ends bit for bit where the uninterrupted run did."""
    root, flags, _ = cli_runs
    resumed = root / "resumed"
    result = launch(
        EXAMPLE,
        *flags,
        "--output-dir",
        str(resumed),
        "--fsdp",
        "--resume",
        str(root / "ddp" / "checkpoints" / "update_6"),
    )
    assert "fsdp: False -> True" in result.stdout and "epoch 2, batch 3 (after update 6)" in result.stdout
    assert_same_checkpoint(resumed / "last", root / "ddp" / "last")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--mixed-precision", "fp16"], "--fsdp with --mixed-precision fp16: use --mixed-precision bf16"),
        (["--grad-accum-steps", "2"], "--fsdp with --grad-accum-steps 2: FSDP2 reduces every micro-batch"),
        (["--iterations", "2"], "--fsdp with --iterations 2: the next iteration's mentor is a whole timm model"),
        (["--lora-rank", "4"], "--fsdp with --lora-rank: the checkpoints merge the adapters"),
        (["--fast-params", "all"], "--fsdp with --fast-params all: second order cannot reach the sharded trunk"),
        (["--fast-params", "fc.*"], "the fast weights must be a suffix left whole: head or last_stage"),
    ],
)
def test_what_fsdp_cannot_run_with_is_refused_before_anything_loads(flags, message, tmp_path):
    from noisy_meta.finetune.cli import parse_settings

    with pytest.raises(ValueError, match=re.escape(message)):
        parse_settings(["--fsdp", *flags, "--output-dir", str(tmp_path / "run")])


def test_fsdp_in_one_process_is_refused_with_how_to_launch(tiny_mnist, tmp_path, make_accelerator):
    from noisy_meta.finetune import main

    with pytest.raises(ValueError, match=r"--fsdp shards the model across processes, and this run has one"):
        main(["--dataset", str(tiny_mnist), *FAST, "--fsdp", "--output-dir", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()
