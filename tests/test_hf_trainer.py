"""`noisy_meta.hf.MetaNoiseTrainer` inside the real ``transformers.Trainer``: the first update equals
`MetaNoiseWrapper.step`, accumulation equals the summed micro-batches, resume equals uninterrupted,
the mentor is evaluated, and transformers' ``TimmWrapperForImageClassification`` trains the same."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from torch.utils.data import Dataset, SequentialSampler  # noqa: E402

from noisy_meta import MetaNoiseConfig, MetaNoiseWrapper  # noqa: E402
from noisy_meta.hf import MetaNoiseTrainer  # noqa: E402
from noisy_meta.loop_state import STATE_FILE  # noqa: E402

from helpers import accumulating_reference, assert_states_close, image_batch, state, tiny_resnet  # noqa: E402


@pytest.fixture(autouse=True)
def reset_accelerate_state():
    """The Trainer's Accelerator sets Accelerate's shared state; later tests start without it."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


CONFIG = MetaNoiseConfig(num_synthetic=2, num_neighbors=3, ramp_start=0, ramp_end=0, seed=0, mentor_decay=0.5)
LR = 0.05


class Images(Dataset):
    """``n`` seeded images as the default collator stacks them: ``pixel_values`` and ``labels``."""

    def __init__(self, n: int = 16, seed: int = 0) -> None:
        self.inputs, self.labels = image_batch(seed, batch_size=n)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        return {"pixel_values": self.inputs[index], "labels": self.labels[index]}


class InOrder(MetaNoiseTrainer):
    """The batches in order, so that a reference loop sees the same ones."""

    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)


#: What every test's TrainingArguments set beside the training: CPU, no reports, no files but those asked for.
QUIET = dict(save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, dataloader_num_workers=0)


def arguments(tmp_path, **overrides) -> transformers.TrainingArguments:
    values = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        per_device_eval_batch_size=8,
        learning_rate=LR,
        optim="sgd",
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
        max_steps=1,
        seed=0,
        **QUIET,
    )
    return transformers.TrainingArguments(**{**values, **overrides})


def test_the_first_update_equals_the_wrapper_step(tmp_path):
    torch.manual_seed(0)
    model = tiny_resnet()
    reference_model = copy.deepcopy(model)
    data = Images(8)
    trainer = InOrder(model=model, args=arguments(tmp_path), train_dataset=data, meta_config=CONFIG)
    trainer.train()

    reference = MetaNoiseWrapper(reference_model, torch.optim.SGD(reference_model.parameters(), lr=LR), CONFIG)
    stats = reference.step(data.inputs, data.labels)
    assert stats["meta_weight"] == 1.0 and stats["meta_loss"] > 0
    assert_states_close((model, reference_model), (trainer.meta.mentor, reference.mentor))
    assert trainer.meta.num_updates == trainer.state.global_step == 1


def test_gradient_accumulation_is_the_summed_micro_batches(tmp_path):
    """Two micro-batches of 4 per update: the Trainer's loss / 2 on each, one step, one mentor update."""
    torch.manual_seed(1)
    model = tiny_resnet()
    reference_model = copy.deepcopy(model)
    data = Images(16)
    args = arguments(tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=2)
    trainer = InOrder(model=model, args=args, train_dataset=data, meta_config=CONFIG)
    trainer.train()

    reference = accumulating_reference(
        reference_model, data.inputs, data.labels, CONFIG, micro_batch=4, updates=2, lr=LR
    )
    assert trainer.meta.num_updates == 2
    assert_states_close((model, reference_model), (trainer.meta.mentor, reference.mentor))


def checkpointed_run(output, config, data, max_steps, save_steps, resume=None):
    """A seeded tiny ResNet trained by MetaNoiseTrainer on ``data``, a checkpoint every ``save_steps`` updates,
    from ``resume`` if given: the model and the trainer."""
    torch.manual_seed(2)
    model = tiny_resnet()
    args = arguments(output, max_steps=max_steps, save_strategy="steps", save_steps=save_steps)
    trainer = MetaNoiseTrainer(model=model, args=args, train_dataset=data, meta_config=config)
    trainer.train(resume_from_checkpoint=resume)
    return model, trainer


@pytest.mark.parametrize("config", [CONFIG, CONFIG.with_overrides(inner_step="normalized", inner_divergence=0.05)])
def test_a_resumed_run_equals_an_uninterrupted_one(tmp_path, config):
    """Checkpoints at update 2 hold MLNT's state (with the fast step's scale when it is sized in the predictions);
    resuming from one ends where 4 updates in one go end."""
    output, checkpoint = tmp_path / "whole", str(tmp_path / "whole" / "checkpoint-2")
    model, trainer = checkpointed_run(output, config, Images(16), max_steps=4, save_steps=2)
    assert (tmp_path / "whole" / "checkpoint-2" / STATE_FILE).is_file()
    resumed_model, resumed = checkpointed_run(output, config, Images(16), max_steps=4, save_steps=2, resume=checkpoint)
    assert resumed.meta.num_updates == trainer.meta.num_updates == 4
    assert_states_close((resumed_model, model), (resumed.meta.mentor, trainer.meta.mentor))
    with pytest.raises(FileNotFoundError, match="was it saved by MetaNoiseTrainer"):
        (tmp_path / "whole" / "checkpoint-2" / STATE_FILE).unlink()
        checkpointed_run(output, config, Images(16), max_steps=4, save_steps=2, resume=checkpoint)


def accuracy(prediction) -> dict:
    return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}


def test_the_mentor_is_evaluated_beside_the_student(tmp_path):
    torch.manual_seed(3)
    trainer = MetaNoiseTrainer(
        model=tiny_resnet(),
        args=arguments(tmp_path, max_steps=2),
        train_dataset=Images(16),
        eval_dataset=Images(8, seed=5),
        compute_metrics=accuracy,
        meta_config=CONFIG,
    )
    with pytest.raises(RuntimeError, match="no mentor before training"):
        trainer.evaluate(mentor=True)
    trainer.train()
    student, mentor = trainer.evaluate(), trainer.evaluate(mentor=True)
    assert {"eval_loss", "eval_accuracy"} <= set(student) and {"eval_mentor_loss", "eval_mentor_accuracy"} <= set(
        mentor
    )
    inputs, labels = Images(8, seed=5).inputs, Images(8, seed=5).labels
    with torch.no_grad():
        expected = F.cross_entropy(trainer.meta.mentor.eval()(inputs), labels)
    assert mentor["eval_mentor_loss"] == pytest.approx(float(expected), rel=1e-5)


def test_transformers_timm_wrapper_trains_as_its_timm_model(tmp_path):
    """``TimmWrapperForImageClassification`` (transformers' class for timm models): MLNT runs on its
    ``timm_model``; the first update equals the wrapper's step on a copy of it."""
    from transformers import TimmWrapperConfig, TimmWrapperForImageClassification

    torch.manual_seed(4)
    config = TimmWrapperConfig(architecture="resnet18", num_labels=4, model_args={"layers": (1, 1, 1, 1)})
    model = TimmWrapperForImageClassification(config)
    reference_model = copy.deepcopy(model.timm_model)
    data = Images(8)
    trainer = InOrder(model=model, args=arguments(tmp_path), train_dataset=data, meta_config=CONFIG)
    trainer.train()
    reference = MetaNoiseWrapper(reference_model, torch.optim.SGD(reference_model.parameters(), lr=LR), CONFIG)
    reference.step(data.inputs, data.labels)
    assert_states_close((model.timm_model, reference_model))
    assert trainer.evaluate(Images(8, seed=6), mentor=True)["eval_mentor_loss"] > 0


def test_two_processes_keep_student_and_mentor_equal_on_every_rank(tmp_path):
    """``accelerate launch --num_processes 2`` (gloo): the Trainer's DDP all-reduces ``grad CE + w grad J``
    once; BatchNorm statistics are averaged before the mentor's update, so every rank holds the same
    student and the same mentor."""
    import json

    from test_distributed import TESTS, launch

    launch(TESTS / "hf_ddp_worker.py", str(tmp_path))
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert ranks[0]["world_size"] == 2 and ranks[0]["num_updates"] == ranks[1]["num_updates"] == 3
    for part in ("student", "mentor"):
        assert ranks[0][part] == pytest.approx(ranks[1][part], rel=1e-6, abs=1e-6), part


def test_bf16_autocast_trains(tmp_path):
    torch.manual_seed(5)
    model = tiny_resnet()
    trainer = MetaNoiseTrainer(
        model=model, args=arguments(tmp_path, bf16=True, max_steps=2), train_dataset=Images(16), meta_config=CONFIG
    )
    before = state(model)
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss)) and trainer.meta.num_updates == 2
    assert any(not torch.equal(before[k], v) for k, v in state(trainer.meta.mentor).items())


class Augmented(Images):
    """A random augmentation drawing from torch's global RNG, as a user's transform does."""

    def __getitem__(self, index: int) -> dict:
        item = super().__getitem__(index)
        return {**item, "pixel_values": item["pixel_values"] + 0.1 * torch.randn_like(item["pixel_values"])}


def test_a_resumed_run_with_augmentation_and_no_seed_equals_the_uninterrupted_one(tmp_path):
    """The Trainer restores its RNG states on resume; building the meta step (at the first batch after it) must
    draw nothing from the global RNG, or every augmentation after it shifts. The plain Trainer is the control."""
    config, output = CONFIG.with_overrides(seed=None), tmp_path / "whole"
    # two epochs of three batches, resumed at the second (where the plain Trainer's resume is bit-for-bit: the
    # control below); Accelerate's loader fetches one batch ahead, so the epoch's third batch sees any draw the
    # first resumed batch makes
    model, trainer = checkpointed_run(output, config, Augmented(24), max_steps=6, save_steps=3)
    resumed_model, resumed = checkpointed_run(
        output, config, Augmented(24), max_steps=6, save_steps=3, resume=str(output / "checkpoint-3")
    )
    assert_states_close((resumed_model, model), (resumed.meta.mentor, trainer.meta.mentor), rtol=0, atol=0)


class PlainCrossEntropy(transformers.Trainer):
    """The control: the plain Trainer with cross-entropy on the same batches."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return F.cross_entropy(model(inputs["pixel_values"]), inputs["labels"])

    def _set_signature_columns_if_needed(self):
        self._signature_columns = ["pixel_values", "labels"]


def test_control_the_plain_trainer_resumes_that_run_bit_for_bit(tmp_path):
    def run(resume=None):
        torch.manual_seed(2)
        model = tiny_resnet()
        args = arguments(tmp_path, max_steps=6, save_strategy="steps", save_steps=3)
        PlainCrossEntropy(model=model, args=args, train_dataset=Augmented(24)).train(resume_from_checkpoint=resume)
        return model

    whole = run()
    resumed = run(str(tmp_path / "checkpoint-3"))
    assert_states_close((resumed, whole), rtol=0, atol=0)


def test_the_training_logs_carry_the_meta_step(tmp_path):
    torch.manual_seed(4)
    args = arguments(tmp_path, max_steps=3, logging_steps=1)
    trainer = MetaNoiseTrainer(model=tiny_resnet(), args=args, train_dataset=Images(16), meta_config=CONFIG)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 3
    for entry in logs:
        assert entry["meta_weight"] == 1.0 and entry["meta_loss"] > 0 and 0 < entry["labels_changed"] <= 1
        assert entry["fast_divergence"] > 0 and entry["fast_step"] > 0


def test_the_mentor_is_restored_by_a_resume_with_no_step_left(tmp_path):
    torch.manual_seed(5)
    args = arguments(tmp_path, max_steps=2, save_strategy="steps", save_steps=2)
    data, held_out = Images(16), Images(8, seed=5)
    trainer = MetaNoiseTrainer(
        model=tiny_resnet(), args=args, train_dataset=data, eval_dataset=held_out, meta_config=CONFIG
    )
    trainer.train()
    finished = trainer.evaluate(mentor=True)
    again = MetaNoiseTrainer(
        model=tiny_resnet(), args=args, train_dataset=data, eval_dataset=held_out, meta_config=CONFIG
    )
    again.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert again.evaluate(mentor=True)["eval_mentor_loss"] == pytest.approx(finished["eval_mentor_loss"], rel=1e-6)
    assert again.meta.num_updates == 2


def test_the_docs_example_works_with_the_trainers_defaults(tmp_path):
    """The usage page's Trainer example keeps the Trainer's optimizer, learning rate and schedule (AdamW at 5e-5,
    linear decay, gradient clipping at 1) and the adapters' default config: the meta step still runs, and its fast
    step is the recipe's 0.3% of each tensor's norm whatever the learning rate (a step tied to the learning rate
    would be 1,000x smaller at 5e-5 than at a fine-tuning SGD's 0.05)."""
    torch.manual_seed(7)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=16, max_steps=10, logging_steps=5, **QUIET
    )
    trainer = MetaNoiseTrainer(model=tiny_resnet(), args=args, train_dataset=Images(64))
    trainer.train()
    assert args.learning_rate == 5e-5 and type(trainer.optimizer.optimizer).__name__ == "AdamW"
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logs[-1]["meta_weight"] > 0 and logs[-1]["fast_step"] == pytest.approx(0.003, rel=1e-3)
    assert all(torch.isfinite(torch.tensor(entry["loss"])) for entry in logs)
