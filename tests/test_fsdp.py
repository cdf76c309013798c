"""`MetaNoiseWrapper.step` under FSDP2 (``fully_shard``), two real processes (gloo on CPU), against DDP.

The trunk sharded, the head (the fast weights) left whole: students and mentors equal the DDP run of the same
per-rank batches, the trunk's parameters take half the memory per process, a run saved with
torch.distributed.checkpoint resumes into new objects equal to the uninterrupted one, and what the meta step
cannot do under FSDP2 is refused with one line naming what works. The runs are in `tests/fsdp_worker.py`.
"""

from __future__ import annotations

import json

import pytest
from test_distributed import TESTS, launch


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
