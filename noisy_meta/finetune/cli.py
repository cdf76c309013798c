"""Command-line flags of `examples/finetune.py` (timm's ``train.py`` names where they exist)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Any, NoReturn, get_args

from ..config import (
    FAST_PARAM_NAMES,
    FAST_PRESET,
    FINETUNE_CLEANING,
    FINETUNE_PRESET,
    RUN_LENGTH_FIELDS,
    MentorUpdate,
    MetaNoiseConfig,
    field_choices,
)
from ..labels.cleaning_config import CLEANING_ACTIONS, CLEANING_CRITERIA, CleaningConfig
from ..labels.noise import NOISE_KINDS, OPEN_SET
from .flag_checks import (
    check_flags,
    flag_of,
    half_open_unit,
    non_negative_float,
    non_negative_int,
    open_fraction,
    positive_float,
    positive_int,
    probability,
    smoothing_fraction,
)
from .names import EMBEDDED, PRED_PROBS_FILE

#: MetaNoiseConfig fields whose flag takes something other than the field's own type.
_FIELD_TYPES: dict[str, Any] = {"clip_grad": float, "seed": int, "fast_params": str, "feature_source": str}
#: Fields whose flag also takes values beyond the named choices (comma-separated glob patterns).
_OPEN_CHOICES = ("fast_params",)
#: Fields with no flag of their own: the loss on the given labels comes from --loss / --smoothing / --gce-q.
_NO_FLAG = ("criterion",)
#: ``--loss`` values (`noisy_meta.losses`).
LOSSES = ("cross_entropy", "gce", "sce")
#: ``--clean-before`` values: noise detection with the starting weights before training.
CLEAN_BEFORE_ACTIONS = ("off", "remove", "relabel")

#: Defaults of flags left unset: for the embedded MNIST run (sized for a few minutes on 2 CPU
#: cores) and for any other data set.
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
#: MetaNoiseConfig defaults of a ``--preset full`` / ``fast`` run from pretrained weights (``--pretrained`` or
#: ``--checkpoint``; the default preset there is ``finetune``), chosen on the fine-tuning
#: benchmark's noisy validation split (benchmarks/finetune_accuracy.py, RESULTS.md): the inner
#: step size is the fine-tuning learning rate times ``inner_lr_per_lr`` (the from-scratch default 0.2 is 10x a typical
#: fine-tuning rate; a ViT collapsed at 15x and lost 9-18 points at 5x), and M synthetic sets.
FINETUNE_META_DEFAULTS: dict[str, Any] = {"inner_lr_per_lr": 1.0, "num_synthetic": 3}
#: ``--preset`` values: the paper's full meta step, the affordable preset (`MetaNoiseConfig.fast`) or
#: the fine-tuning recipe (`MetaNoiseConfig.finetune`, the default from pretrained weights), and
#: the MetaNoiseConfig fields each sets.
PRESETS: dict[str, dict[str, Any]] = {"full": {}, "fast": FAST_PRESET, "finetune": FINETUNE_PRESET}
GENERAL_DEFAULTS: dict[str, Any] = {
    "model": "resnet18",
    "epochs": 10,
    "noise": "none",
    "noise_rate": 0.0,
    "aug": True,
}


class _Parser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line (status 2): the flag, the value, what is allowed."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Shows a flag's default once, when it has one and its help does not already say it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        unset = default is None or default is False or default is argparse.SUPPRESS
        if unset or "default" in text or "%(default)" in text:
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


def program_name() -> str:
    """What the user typed: ``finetune.py``, or ``python -m noisy_meta.finetune``."""
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "finetune"
    return "python -m noisy_meta.finetune" if name == "__main__.py" else name


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = _Parser(
        prog=prog or program_name(),
        description="Fine-tune a timm model on noisily labelled images with MLNT (noisy-meta). Defaults marked "
        f"'for {EMBEDDED}' apply to the embedded data set (the default --dataset); others apply everywhere.",
        formatter_class=_Formatter,
    )
    model = parser.add_argument_group("model")
    model.add_argument(
        "--model",
        default=None,
        help=f"timm model name; default {EMBEDDED_DEFAULTS['model']} (a small timm ResNet) for {EMBEDDED}, "
        f"else {GENERAL_DEFAULTS['model']}",
    )
    model.add_argument("--pretrained", action="store_true", help="start from timm's pretrained weights (needs the hub)")
    model.add_argument(
        "--checkpoint",
        default=None,
        help="start from local weights (.safetensors or torch file); a classifier of another size is replaced",
    )
    model.add_argument(
        "--freeze-backbone",
        action="store_true",
        help="train the classifier only (a linear probe); the meta step then runs only the classifier per "
        "synthetic set",
    )
    model.add_argument("--num-classes", type=positive_int, default=None, help="default: from the label column")
    model.add_argument(
        "--img-size", type=positive_int, default=None, help=f"input size; default: the model's, or 32 for {EMBEDDED}"
    )

    data = parser.add_argument_group("data (Hugging Face datasets)")
    data.add_argument(
        "--dataset",
        default=EMBEDDED,
        help=f"'{EMBEDDED}' (offline MNIST, built in), a save_to_disk or imagefolder directory, parquet files, "
        "or a hub id",
    )
    data.add_argument("--train-split", default="train", help="split trained on")
    data.add_argument("--val-split", default=None, help="default: carve --val-fraction of the training split")
    data.add_argument("--test-split", default="auto", help="'auto': 'test' when present; 'none' for no test split")
    data.add_argument(
        "--val-fraction", type=open_fraction, default=0.1, help="share of train held out when there is no --val-split"
    )
    data.add_argument("--image-column", default="image", help="column holding the images")
    data.add_argument("--label-column", default="label", help="the (noisy) label trained on")
    data.add_argument(
        "--clean-label-column", default=None, help="true labels, when the data set has them (e.g. CIFAR-10N)"
    )
    data.add_argument(
        "--noise",
        choices=(*NOISE_KINDS, OPEN_SET),
        default=None,
        help=f"inject label noise into train; default symmetric for {EMBEDDED}, else none. {OPEN_SET}: images of "
        "--open-set-classes leave the label space, and --noise-rate of the training images are replaced by theirs "
        "with random labels (web data's typical error)",
    )
    data.add_argument(
        "--open-set-classes",
        type=int,
        nargs="+",
        default=None,
        metavar="CLASS",
        help=f"class indices outside the label space, for --noise {OPEN_SET} (e.g. 7 8 9 for {EMBEDDED})",
    )
    data.add_argument(
        "--noise-rate",
        type=probability,
        default=None,
        help=f"in [0, 1]; default {EMBEDDED_DEFAULTS['noise_rate']} for {EMBEDDED}, else 0",
    )
    data.add_argument(
        "--aug",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"training augmentation (random-resized crop, flip); default off for {EMBEDDED}, else on",
    )
    data.add_argument("--hflip", type=probability, default=0.5, help="horizontal flip probability")
    data.add_argument(
        "--scale", type=positive_float, nargs=2, default=(0.08, 1.0), help="random-resized-crop scale range"
    )
    data.add_argument(
        "--bad-images",
        choices=("refuse", "skip", "unchecked"),
        default="refuse",
        help="images that do not decode, found by a scan before training (each image decoded once): refuse to "
        "start (naming them), drop them (counted and listed in <output-dir>/bad_images.json), or no scan (a bad "
        "file then stops training when it is loaded)",
    )
    data.add_argument("--workers", type=non_negative_int, default=0, help="DataLoader worker processes")
    data.add_argument(
        "--streaming",
        action="store_true",
        help="read the training split as a stream (local parquet files or a save_to_disk directory; each rank "
        "its own shards; labels as given; needs --val-split)",
    )
    data.add_argument(
        "--shuffle-buffer",
        type=positive_int,
        default=1000,
        metavar="IMAGES",
        help="with --streaming: images in the shuffle buffer",
    )

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--opt", default="sgd", help="timm.optim.create_optimizer_v2 name")
    optim.add_argument("--lr", type=positive_float, default=0.05, help="peak learning rate")
    optim.add_argument("--momentum", type=non_negative_float, default=0.9, help="SGD momentum")
    optim.add_argument("--weight-decay", type=non_negative_float, default=5e-4, help="weight decay")
    optim.add_argument("--sched", default="cosine", help="timm.scheduler name, or 'none'")
    optim.add_argument("--warmup-epochs", type=non_negative_int, default=0, help="learning-rate warm-up")
    optim.add_argument(
        "--epochs",
        type=positive_int,
        default=None,
        help=f"default {EMBEDDED_DEFAULTS['epochs']} for {EMBEDDED}, else {GENERAL_DEFAULTS['epochs']}",
    )
    optim.add_argument("--batch-size", "-b", type=positive_int, default=64, help="per process")
    optim.add_argument("--grad-accum-steps", type=positive_int, default=1, help="micro-batches per optimizer update")
    optim.add_argument(
        "--mixed-precision", choices=("no", "bf16", "fp16"), default=None, help="default: accelerate's configuration"
    )
    optim.add_argument(
        "--loss",
        choices=LOSSES,
        default=None,
        help="the loss on the given labels (noisy_meta.losses): cross-entropy, generalised cross-entropy (--gce-q) "
        "or symmetric cross-entropy (alpha 0.1, beta 1); default: the preset's (cross_entropy)",
    )
    optim.add_argument(
        "--smoothing", type=smoothing_fraction, default=0.0, help="label smoothing of --loss cross_entropy (timm's)"
    )
    optim.add_argument("--gce-q", type=half_open_unit, default=0.7, help="q of --loss gce, in (0, 1]")

    meta = parser.add_argument_group("MLNT (MetaNoiseConfig fields)")
    meta.add_argument(
        "--no-meta",
        action="store_true",
        help="cross-entropy baseline in the same pipeline (meta weight 0; the EMA mentor is still tracked)",
    )
    meta.add_argument(
        "--preset",
        choices=list(PRESETS),
        default=None,
        help="full: the paper's meta step, M synthetic sets on every update (the defaults below); fast: "
        f"MetaNoiseConfig.fast, under 2x a cross-entropy step ({_preset_text('fast')}); finetune: "
        f"MetaNoiseConfig.finetune, the fine-tuning recipe ({_preset_text('finetune')}; benchmarks/RESULTS.md). "
        "Flags below win over the preset. Default finetune from --pretrained / --checkpoint, else full",
    )
    meta.add_argument(
        "--clean-before",
        choices=CLEAN_BEFORE_ACTIONS,
        default=None,
        help="before training, flag the training images whose nearest neighbours in the starting model's features "
        "mostly carry another label (noisy_meta.detect_label_noise) and remove or relabel them; the flags go to "
        f"<output-dir>/clean_before.json. Default: {FINETUNE_CLEANING} with --preset finetune from pretrained weights, "
        "off otherwise (on the fine-tuning benchmark removing helped a ResNet and hurt a ViT: benchmarks/RESULTS.md)",
    )
    meta.add_argument("--clean-before-k", type=positive_int, default=10, help="neighbours in the --clean-before vote")
    for field in dataclasses.fields(MetaNoiseConfig):
        if field.name not in _NO_FLAG:
            _add_field_flag(meta, field)

    iterative = parser.add_argument_group("iterative training and data cleaning (noisy_meta.labels.cleaning)")
    iterative.add_argument(
        "--iterations",
        type=positive_int,
        default=1,
        help="training runs; from the second on, the previous best mentor cleans the training data and is the mentor",
    )
    iterative.add_argument(
        "--clean-criterion",
        choices=CLEANING_CRITERIA,
        default="confident_disagreement",
        help="confident_disagreement: mentor top-1 != label with probability > threshold; given_label_prob: "
        "mentor probability of the label < threshold",
    )
    iterative.add_argument(
        "--clean-threshold",
        type=probability,
        default=None,
        help="default 0 for confident_disagreement, 0.5 for given_label_prob",
    )
    iterative.add_argument(
        "--clean-action",
        choices=CLEANING_ACTIONS,
        default="remove",
        help="remove flagged samples or relabel them with the mentor's class",
    )
    iterative.add_argument(
        "--iteration-mentor",
        choices=get_args(MentorUpdate),
        default="frozen",
        help="from the second iteration: keep the previous best mentor as it is, or let it average the new "
        "student (--mentor-update wins)",
    )
    iterative.add_argument(
        "--export-pred-probs",
        action="store_true",
        help=f"write the final best mentor's training-set probabilities ({PRED_PROBS_FILE}, cleanlab's "
        "labels/pred_probs)",
    )

    output = parser.add_argument_group("output")
    output.add_argument(
        "--output-dir", default="output/finetune", help="checkpoints and metrics; an earlier run there is kept"
    )
    output.add_argument(
        "--overwrite", action="store_true", help="replace the run already in --output-dir (its checkpoints, metrics)"
    )
    output.add_argument(
        "--checkpoint-every",
        type=non_negative_int,
        default=0,
        metavar="UPDATES",
        help="also write last/ every this many updates, mid-epoch (--resume continues from the next batch); "
        "0: at epoch ends only",
    )
    output.add_argument(
        "--keep-checkpoints",
        type=positive_int,
        default=1,
        metavar="K",
        help="keep the K newest checkpoints: last/ and the K - 1 it replaced, in checkpoints/update_<n>/",
    )
    output.add_argument(
        "--log-interval",
        type=positive_int,
        default=50,
        help="when the output is not a terminal (a log file), print a progress line every this many batches",
    )
    output.add_argument(
        "--rank-timeout",
        type=positive_float,
        default=600.0,
        help="with several processes: seconds a rank waits for the others in a collective before the run stops "
        "with a message (a rank that died or stalled)",
    )
    output.add_argument(
        "--max-consecutive-skips",
        type=non_negative_int,
        default=25,
        help="stop (saving the last good state in <output-dir>/stopped/) after this many consecutive non-finite "
        "updates; 0: never",
    )
    output.add_argument(
        "--resume",
        nargs="?",
        const="",
        default=None,
        help="continue from a checkpoint directory (no value: <output-dir>/last)",
    )
    output.add_argument("--seed", type=int, default=0, help="seeds the run (data order, noise, model init)")
    output.add_argument("--debug", action="store_true", help="show the traceback of an error in the input")
    return parser


def _add_field_flag(group: argparse._ArgumentGroup, field: dataclasses.Field) -> None:
    flag = "--" + field.name.replace("_", "-")
    dest = "meta_" + field.name
    if field.name == "seed":  # --seed is the run's seed; this one only the synthetic labels'
        flag = "--meta-seed"
    note = f"default {_default_note(field)}"
    if isinstance(field.default, bool):
        group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=note)
        return
    kind = _FIELD_TYPES.get(field.name, type(field.default))
    if field.name == "fast_params":
        note += "; or comma-separated glob patterns such as 'layer4.*,fc.*'"
    choices = None if field.name in _OPEN_CHOICES else field_choices(field.name) or None
    metavar = None if choices else field.name.upper()
    group.add_argument(flag, dest=dest, type=kind, choices=choices, default=None, metavar=metavar, help=note)


def _preset_text(name: str) -> str:
    return ", ".join(f"{field.replace('_', '-')} {value}" for field, value in PRESETS[name].items())


def _default_note(field: dataclasses.Field) -> str:
    """A MetaNoiseConfig field's default as the command line applies it (data set and start dependent)."""
    if field.name == "seed":
        return "--seed"
    if field.name in RUN_LENGTH_FIELDS:
        return "from the run's length (MetaNoiseConfig.for_run_length)"
    note = repr(field.default)
    embedded = EMBEDDED_DEFAULTS.get("meta_" + field.name)
    if embedded is not None:
        note += f"; {embedded!r} for {EMBEDDED}"
    if field.name == "inner_lr":
        note += (
            f"; {FINETUNE_META_DEFAULTS['inner_lr_per_lr']:g} x --lr with --preset full or fast from "
            "--pretrained/--checkpoint"
        )
    if field.name == "num_synthetic":
        note += f"; {FINETUNE_META_DEFAULTS['num_synthetic']} with --preset full from --pretrained/--checkpoint"
    for name, preset in PRESETS.items():
        if field.name in preset and (preset[field.name] != field.default or embedded is not None):
            note += f"; {preset[field.name]!r} with --preset {name}"
    return note


def apply_data_set_defaults(args: argparse.Namespace) -> dict[str, Any]:
    """Fill flags left unset with `EMBEDDED_DEFAULTS` or `GENERAL_DEFAULTS`; return what was filled."""
    defaults = EMBEDDED_DEFAULTS if args.dataset == EMBEDDED else GENERAL_DEFAULTS
    filled = {name: value for name, value in defaults.items() if getattr(args, name) is None}
    for name, value in filled.items():
        setattr(args, name, value)
    return filled


def validate_args(args: argparse.Namespace) -> dict[str, Any]:
    """Fill the data-set defaults and check every flag, before any data or model is loaded.

    Raises ValueError naming the flag; returns the defaults filled in (`apply_data_set_defaults`).
    Arguments already checked (the command line checks them before it imports the trainer, whose
    `run` checks again for callers in code) are not checked twice.
    """
    if getattr(args, "data_set_defaults", None) is not None:
        return args.data_set_defaults
    filled = apply_data_set_defaults(args)
    check_flags(args)
    cleaning_config(args)
    try:
        resolve_meta_config(args, total_updates=1, filled=filled)
    except ValueError as error:
        raise ValueError(flag_of(str(error), [f.name for f in dataclasses.fields(MetaNoiseConfig)])) from None
    args.data_set_defaults = filled
    return filled


def run_command(argv: list[str] | None = None) -> None:
    """The command line: parse, check, run; a user error ends in one line and status 2.

    ``--help`` and flag errors answer before torch, timm or datasets are imported. Errors in the
    input found later (data, checkpoints) are reported the same way; ``--debug`` shows their
    traceback. A run stopped by SIGTERM / SIGINT after its checkpoint says how to resume and
    exits with status 75 (`EXIT_STOPPED`). Anything else is a bug and keeps its traceback.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        validate_args(args)
    except ValueError as error:
        parser.error(str(error))
    from .checkpoint import CheckpointError
    from .distributed import is_lost_rank, lost_rank_message
    from .preemption import EXIT_STOPPED, RunStopped
    from .trainer import run

    try:
        run(args)
    except RunStopped as stopped:
        parser.exit(EXIT_STOPPED, f"{parser.prog}: {stopped}\n")
    except (ValueError, CheckpointError, OSError) as error:
        if args.debug:
            raise
        parser.exit(2, f"{parser.prog}: error: {error} (--debug shows where)\n")
    except RuntimeError as error:
        if args.debug or not is_lost_rank(error):
            raise
        parser.exit(2, f"{parser.prog}: error: {lost_rank_message(error, args)}\n")


def cleaning_config(args: argparse.Namespace) -> CleaningConfig:
    """The `CleaningConfig` of the ``--clean-*`` flags."""
    threshold = args.clean_threshold
    if threshold is None:
        threshold = 0.5 if args.clean_criterion == "given_label_prob" else 0.0
    return CleaningConfig(args.clean_criterion, threshold, args.clean_action)


def from_weights(args: argparse.Namespace) -> bool:
    """Whether the run starts from pretrained weights (``--pretrained`` or ``--checkpoint``)."""
    return bool(args.pretrained or args.checkpoint)


def preset_name(args: argparse.Namespace) -> str:
    """``--preset``, or its default: ``finetune`` from pretrained weights, else ``full``."""
    if getattr(args, "preset", None):
        return args.preset
    return "finetune" if from_weights(args) else "full"


def clean_before_action(args: argparse.Namespace) -> str:
    """``--clean-before``, or its default: the recipe's (`FINETUNE_CLEANING`) with ``--preset finetune``
    from pretrained weights (not with ``--streaming``, which cannot clean), else ``off``."""
    if args.clean_before is not None:
        return args.clean_before
    recipe = preset_name(args) == "finetune" and from_weights(args) and not args.streaming
    return FINETUNE_CLEANING if recipe else "off"


def fine_tuning_defaults(args: argparse.Namespace) -> dict[str, Any]:
    """`FINETUNE_META_DEFAULTS` as MetaNoiseConfig values for a run from pretrained weights with
    ``--preset full`` or ``fast`` (empty otherwise, and for the fields whose flag was given; a
    preset's own fields win over them)."""
    if not from_weights(args) or preset_name(args) == "finetune":
        return {}
    values = {
        "inner_lr": FINETUNE_META_DEFAULTS["inner_lr_per_lr"] * args.lr,
        "num_synthetic": FINETUNE_META_DEFAULTS["num_synthetic"],
    }
    return {name: value for name, value in values.items() if getattr(args, "meta_" + name) is None}


def criterion_of(args: argparse.Namespace) -> Any | None:
    """The loss of ``--loss`` / ``--smoothing`` / ``--gce-q`` (None: the preset's or the library's)."""
    if args.loss is None and not args.smoothing:
        return None
    from ..losses import make_criterion  # imports torch: only once a run is being set up

    return make_criterion(args.loss or "cross_entropy", smoothing=args.smoothing, q=args.gce_q)


def resolve_meta_config(
    args: argparse.Namespace, total_updates: int, filled: dict[str, Any] | None = None
) -> tuple[MetaNoiseConfig, dict[str, Any]]:
    """The `MetaNoiseConfig` of a run and the defaults chosen for it (not the library's).

    Flags not given keep the library defaults, except the schedules, which follow
    `MetaNoiseConfig.for_run_length` (the library's own defaults suit long Clothing1M runs),
    and the preset's fields (`preset_name`: ``--preset fast`` `FAST_PRESET`, ``finetune``
    `FINETUNE_PRESET`, the default from pretrained weights), which win over the data set's
    defaults (``filled``: the data-set defaults `apply_data_set_defaults` filled in; by default
    those `validate_args` recorded). A ``--preset full`` or ``fast`` run from pretrained weights
    takes `fine_tuning_defaults` for the fields its preset leaves. The loss comes from ``--loss`` /
    ``--smoothing`` (`criterion_of`).
    """
    if filled is None:
        filled = getattr(args, "data_set_defaults", None) or {}
    fields = [f.name for f in dataclasses.fields(MetaNoiseConfig) if f.name not in _NO_FLAG]
    values = {name: getattr(args, "meta_" + name) for name in fields}
    values = {name: value for name, value in values.items() if value is not None}
    given = {name for name in values if "meta_" + name not in filled}
    preset = {name: value for name, value in PRESETS[preset_name(args)].items() if name not in given}
    values = {name: value for name, value in values.items() if name not in preset}
    fast_params = values.get("fast_params")
    if isinstance(fast_params, str) and fast_params not in FAST_PARAM_NAMES:
        values["fast_params"] = tuple(p.strip() for p in fast_params.split(",") if p.strip())
    values.setdefault("seed", args.seed)
    if args.no_meta:
        values["meta_weight"] = 0.0
    criterion = criterion_of(args)
    if criterion is not None:
        values["criterion"] = criterion
    fine_tuning = {name: v for name, v in fine_tuning_defaults(args).items() if name not in preset}
    config = MetaNoiseConfig.for_run_length(max(total_updates, 1), **fine_tuning, **preset, **values)
    chosen = {name: getattr(config, name) for name in RUN_LENGTH_FIELDS if name not in values}
    return config, {**chosen, **fine_tuning, **preset}
