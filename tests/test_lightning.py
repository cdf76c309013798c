"""`noisy_meta.lightning.MetaNoiseCallback` inside the real Lightning ``Trainer``: the first update
equals `MetaNoiseWrapper.step`, accumulation equals the summed micro-batches, and a run resumed
from Lightning's checkpoint ends where an uninterrupted one does."""

from __future__ import annotations

import copy

import pytest
import torch

L = pytest.importorskip("lightning")

from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from noisy_meta import MetaNoiseConfig, MetaNoiseWrapper  # noqa: E402
from noisy_meta.lightning import MetaNoiseCallback  # noqa: E402

from helpers import accumulating_reference, assert_states_close, image_batch, tiny_resnet  # noqa: E402

CONFIG = MetaNoiseConfig(num_synthetic=2, num_neighbors=3, ramp_start=0, ramp_end=0, seed=0, mentor_decay=0.5)
LR = 0.05


class Classifier(L.LightningModule):
    """The user's LightningModule: a timm model, SGD, and the callback's loss in ``training_step``."""

    def __init__(self, model: torch.nn.Module, mlnt: MetaNoiseCallback) -> None:
        super().__init__()
        self.model, self.mlnt = model, mlnt

    def training_step(self, batch, batch_idx):
        images, labels = batch
        with self.mlnt.forward_context():
            logits = self.model(images)
        return self.mlnt.loss(images, labels, logits)

    def configure_optimizers(self):
        return torch.optim.SGD(self.model.parameters(), lr=LR)


def loader(n: int, batch_size: int, seed: int = 0) -> DataLoader:
    inputs, labels = image_batch(seed, batch_size=n)
    return DataLoader(TensorDataset(inputs, labels), batch_size=batch_size, shuffle=False)


def trainer(tmp_path, mlnt, **overrides) -> L.Trainer:
    values = dict(
        accelerator="cpu",
        devices=1,
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        callbacks=[mlnt],
    )
    return L.Trainer(**{**values, **overrides})


def test_the_first_update_equals_the_wrapper_step(tmp_path):
    torch.manual_seed(0)
    model = tiny_resnet()
    reference_model = copy.deepcopy(model)
    mlnt = MetaNoiseCallback(CONFIG, student="model")
    trainer(tmp_path, mlnt).fit(Classifier(model, mlnt), loader(8, 8))

    reference = MetaNoiseWrapper(reference_model, torch.optim.SGD(reference_model.parameters(), lr=LR), CONFIG)
    inputs, labels = image_batch(0, batch_size=8)
    assert reference.step(inputs, labels)["meta_loss"] > 0
    assert_states_close((model, reference_model), (mlnt.mentor, reference.mentor))
    assert mlnt.meta.num_updates == 1


def test_gradient_accumulation_is_the_summed_micro_batches(tmp_path):
    torch.manual_seed(1)
    model = tiny_resnet()
    reference_model = copy.deepcopy(model)
    mlnt = MetaNoiseCallback(CONFIG, student="model")
    trainer(tmp_path, mlnt, max_steps=2, accumulate_grad_batches=2).fit(Classifier(model, mlnt), loader(16, 4))

    inputs, labels = image_batch(0, batch_size=16)
    reference = accumulating_reference(reference_model, inputs, labels, CONFIG, micro_batch=4, updates=2, lr=LR)
    assert mlnt.meta.num_updates == 2
    assert_states_close((model, reference_model), (mlnt.mentor, reference.mentor))


def test_a_run_resumed_from_lightnings_checkpoint_equals_an_uninterrupted_one(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(max_steps, ckpt_path=None, save=False):
        torch.manual_seed(2)
        model = tiny_resnet()
        mlnt = MetaNoiseCallback(CONFIG, student="model")
        callbacks = [mlnt]
        if save:
            callbacks.append(ModelCheckpoint(dirpath=tmp_path / "ckpt", save_on_train_epoch_end=True, save_top_k=-1))
        fit = trainer(tmp_path, mlnt, max_steps=max_steps, callbacks=callbacks, enable_checkpointing=save)
        # One batch per epoch: the updates see the same batches however Lightning counts a resumed epoch.
        fit.fit(Classifier(model, mlnt), loader(8, 8), ckpt_path=ckpt_path)
        return model, mlnt

    model, mlnt = run(4, save=True)
    checkpoint = next(path for path in (tmp_path / "ckpt").iterdir() if "step=2" in path.name)
    resumed_model, resumed = run(4, ckpt_path=str(checkpoint))
    assert resumed.meta.num_updates == mlnt.meta.num_updates == 4
    assert_states_close((resumed_model, model), (resumed.mentor, mlnt.mentor))


def test_the_loss_outside_a_trainer_is_refused_with_the_fix():
    with pytest.raises(RuntimeError, match="pass the callback to the Trainer"):
        MetaNoiseCallback().loss(*image_batch(0), torch.zeros(12, 4))
    with pytest.raises(RuntimeError, match="no mentor before training"):
        _ = MetaNoiseCallback().mentor


def test_the_meta_step_is_in_lightnings_logged_metrics(tmp_path):
    torch.manual_seed(6)
    mlnt = MetaNoiseCallback(CONFIG, student="model")
    fit = trainer(tmp_path, mlnt, max_steps=2)
    fit.fit(Classifier(tiny_resnet(), mlnt), loader(16, 8))
    logged = fit.logged_metrics
    assert float(logged["meta/meta_weight_step"]) == 1.0 and float(logged["meta/meta_loss_step"]) > 0
    assert float(logged["meta/fast_divergence_epoch"]) > 0 and float(logged["meta/fast_step_epoch"]) > 0


def test_the_meta_step_leaves_torchs_global_rng_where_it_was(tmp_path):
    """Building the meta step (at ``on_train_start``) and running it draw nothing from torch's global RNG, so a
    resumed run's augmentation and shuffling follow the uninterrupted run's as far as Lightning's own resume does."""
    draws = []

    class Watching(Classifier):
        def training_step(self, batch, batch_idx):
            images, labels = batch
            logits = self.model(images)  # the student's forward (no random op in the model)
            before = torch.get_rng_state()
            loss = self.mlnt.loss(images, labels, logits)
            draws.append(not torch.equal(before, torch.get_rng_state()))
            return loss

    class Around(L.Callback):  # called before and after the callback's on_train_start, which builds the meta step
        states: list[torch.Tensor] = []

        def on_train_start(self, trainer, pl_module):
            self.states.append(torch.get_rng_state())

    torch.manual_seed(6)
    mlnt = MetaNoiseCallback(CONFIG.with_overrides(seed=None), student="model")
    callbacks = [Around(), mlnt, Around()]
    trainer(tmp_path, mlnt, max_steps=3, callbacks=callbacks).fit(Watching(tiny_resnet(), mlnt), loader(24, 8))
    assert mlnt.meta.num_updates == 3 and draws == [False, False, False]
    assert len(Around.states) == 2 and torch.equal(*Around.states)


class Augmented(torch.utils.data.Dataset):
    """A random augmentation drawing from torch's global RNG, as a user's transform does."""

    def __init__(self, n: int) -> None:
        self.inputs, self.labels = image_batch(0, batch_size=n)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.inputs[index] + 0.1 * torch.randn_like(self.inputs[index]), self.labels[index]


def test_a_resumed_run_draws_the_augmentation_and_shuffling_of_the_plain_lightning_run(tmp_path):
    """Lightning's resume restores no RNG state, so with a global-RNG augmentation and ``shuffle=True`` even plain
    cross-entropy does not resume bit for bit (max |dw| 0.67 on this run): what MLNT owes is to change nothing of
    it. The global RNG state at every training step (after the sampler's and the augmentation's draws) is the
    plain run's, in a fresh run and in one resumed from Lightning's epoch checkpoint."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    class Recording(Classifier):
        def training_step(self, batch, batch_idx):
            self.states.append(torch.get_rng_state())
            images, labels = batch
            if self.mlnt is None:
                return torch.nn.functional.cross_entropy(self.model(images), labels)
            return super().training_step(batch, batch_idx)

    def run(folder, meta: bool, ckpt_path=None) -> list[torch.Tensor]:
        L.seed_everything(3, verbose=False)
        mlnt = MetaNoiseCallback(CONFIG.with_overrides(seed=None), student="model") if meta else None
        checkpoints = ModelCheckpoint(dirpath=tmp_path / folder, save_top_k=-1, every_n_epochs=1)
        callbacks = [checkpoints, *([mlnt] if mlnt is not None else [])]
        fit = trainer(tmp_path, mlnt, max_steps=-1, max_epochs=3, callbacks=callbacks, enable_checkpointing=True)
        module = Recording(tiny_resnet(), mlnt)
        module.states = []
        data = DataLoader(Augmented(24), batch_size=8, shuffle=True)
        fit.fit(module, data, ckpt_path=str(tmp_path / ckpt_path) if ckpt_path else None)
        assert len(module.states) == (6 if ckpt_path else 9)
        return module.states

    plain, meta = run("plain", meta=False), run("meta", meta=True)
    assert all(torch.equal(a, b) for a, b in zip(plain, meta, strict=True))
    first_epoch = "epoch=0-step=3.ckpt"
    plain_resumed = run("plain_resumed", meta=False, ckpt_path=f"plain/{first_epoch}")
    meta_resumed = run("meta_resumed", meta=True, ckpt_path=f"meta/{first_epoch}")
    assert all(torch.equal(a, b) for a, b in zip(plain_resumed, meta_resumed, strict=True))
