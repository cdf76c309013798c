"""Command-line flags of `examples/finetune.py` (timm's ``train.py`` names where they exist)."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, get_args

from ..cleaning import CLEANING_ACTIONS, CLEANING_CRITERIA, CleaningConfig
from ..config import FAST_PARAM_NAMES, RUN_LENGTH_FIELDS, MentorUpdate, MetaNoiseConfig, field_choices
from ..noise import NOISE_KINDS, OPEN_SET
from .checkpoint import PRED_PROBS_FILE
from .data import EMBEDDED

#: MetaNoiseConfig fields whose flag takes something other than the field's own type.
_FIELD_TYPES: dict[str, Any] = {"clip_grad": float, "seed": int, "fast_params": str, "feature_source": str}
#: Fields whose flag also takes values beyond the named choices (comma-separated glob patterns).
_OPEN_CHOICES = ("fast_params",)

#: Defaults of flags left unset: for the embedded MNIST run (sized for a few minutes on 2 CPU
#: cores) and for any other data set.
EMBEDDED_DEFAULTS: dict[str, Any] = {
    "model": "test_resnet",
    "img_size": 32,
    "epochs": 8,
    "noise": "symmetric",
    "noise_rate": 0.4,
    "no_aug": True,
    "meta_first_order": True,
    "meta_num_synthetic": 5,
}
#: MetaNoiseConfig defaults when the run starts from pretrained weights (``--pretrained`` or
#: ``--checkpoint``), chosen on the fine-tuning benchmark's noisy validation split
#: (benchmarks/finetune_accuracy.py, RESULTS.md): the inner step size is the fine-tuning
#: learning rate times ``inner_lr_per_lr`` (the from-scratch default 0.2 is 10x a typical
#: fine-tuning rate; a ViT collapsed at 15x and lost 9-18 points at 5x), and M synthetic sets.
FINETUNE_META_DEFAULTS: dict[str, Any] = {"inner_lr_per_lr": 1.0, "num_synthetic": 3}
GENERAL_DEFAULTS: dict[str, Any] = {
    "model": "resnet18",
    "epochs": 10,
    "noise": "none",
    "noise_rate": 0.0,
    "no_aug": False,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Fine-tune a timm model on noisily labelled images with MLNT (noisy-meta).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
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
    model.add_argument("--num-classes", type=int, default=None, help="default: from the label column")
    model.add_argument(
        "--img-size", type=int, default=None, help=f"input size; default: the model's, or 32 for {EMBEDDED}"
    )

    data = parser.add_argument_group("data (Hugging Face datasets)")
    data.add_argument(
        "--dataset",
        default=EMBEDDED,
        help=f"'{EMBEDDED}' (offline MNIST, built in), a save_to_disk or imagefolder directory, parquet files, "
        "or a hub id",
    )
    data.add_argument("--train-split", default="train")
    data.add_argument("--val-split", default=None, help="default: carve --val-fraction of the training split")
    data.add_argument("--test-split", default="auto", help="'auto': 'test' when present; 'none' for no test split")
    data.add_argument("--val-fraction", type=float, default=0.1)
    data.add_argument("--image-column", default="image")
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
        "--noise-rate", type=float, default=None, help=f"default {EMBEDDED_DEFAULTS['noise_rate']} for {EMBEDDED}"
    )
    data.add_argument(
        "--no-aug",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"no training augmentation (default on for {EMBEDDED})",
    )
    data.add_argument("--hflip", type=float, default=0.5, help="horizontal flip probability")
    data.add_argument("--scale", type=float, nargs=2, default=(0.08, 1.0), help="random-resized-crop scale range")
    data.add_argument(
        "--bad-images",
        choices=("refuse", "skip", "unchecked"),
        default="refuse",
        help="images that do not decode, found by a scan before training (each image decoded once): refuse to "
        "start (naming them), drop them (counted and listed in <output-dir>/bad_images.json), or no scan (a bad "
        "file then stops training when it is loaded)",
    )
    data.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--opt", default="sgd", help="timm.optim.create_optimizer_v2 name")
    optim.add_argument("--lr", type=float, default=0.05)
    optim.add_argument("--momentum", type=float, default=0.9)
    optim.add_argument("--weight-decay", type=float, default=5e-4)
    optim.add_argument("--sched", default="cosine", help="timm.scheduler name, or 'none'")
    optim.add_argument("--warmup-epochs", type=int, default=0)
    optim.add_argument(
        "--epochs",
        type=int,
        default=None,
        help=f"default {EMBEDDED_DEFAULTS['epochs']} for {EMBEDDED}, else {GENERAL_DEFAULTS['epochs']}",
    )
    optim.add_argument("--batch-size", "-b", type=int, default=64, help="per process")
    optim.add_argument("--grad-accum-steps", type=int, default=1)
    optim.add_argument(
        "--mixed-precision", choices=("no", "bf16", "fp16"), default=None, help="default: accelerate's configuration"
    )

    meta = parser.add_argument_group("MLNT (MetaNoiseConfig fields)")
    meta.add_argument(
        "--no-meta",
        action="store_true",
        help="cross-entropy baseline in the same pipeline (meta weight 0; the EMA mentor is still tracked)",
    )
    for field in dataclasses.fields(MetaNoiseConfig):
        _add_field_flag(meta, field)

    iterative = parser.add_argument_group("iterative training and data cleaning (noisy_meta.cleaning)")
    iterative.add_argument(
        "--iterations",
        type=int,
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
        type=float,
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
    output.add_argument("--output-dir", default="output/finetune")
    output.add_argument(
        "--max-consecutive-skips",
        type=int,
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
    output.add_argument("--seed", type=int, default=0)
    return parser


def _add_field_flag(group: argparse._ArgumentGroup, field: dataclasses.Field) -> None:
    flag = "--" + field.name.replace("_", "-")
    dest = "meta_" + field.name
    default = field.default
    if field.name == "seed":  # --seed is the run's seed; this one only the synthetic labels'
        flag = "--meta-seed"
    if isinstance(default, bool):
        group.add_argument(
            flag, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=f"default {default}"
        )
        return
    kind = _FIELD_TYPES.get(field.name, type(default))
    note = "run-length dependent" if field.name in RUN_LENGTH_FIELDS else repr(default)
    if field.name == "fast_params":
        note += "; or comma-separated glob patterns such as 'layer4.*,fc.*'"
    if field.name == "inner_lr":
        note += f" from scratch; {FINETUNE_META_DEFAULTS['inner_lr_per_lr']:g} x --lr from --pretrained/--checkpoint"
    if field.name == "num_synthetic":
        note += f" from scratch; {FINETUNE_META_DEFAULTS['num_synthetic']} from --pretrained/--checkpoint"
    if field.name == "seed":
        note = "--seed"
    choices = None if field.name in _OPEN_CHOICES else field_choices(field.name) or None
    group.add_argument(flag, dest=dest, type=kind, choices=choices, default=None, help=f"default {note}")


def apply_data_set_defaults(args: argparse.Namespace) -> dict[str, Any]:
    """Fill flags left unset with `EMBEDDED_DEFAULTS` or `GENERAL_DEFAULTS`; return what was filled."""
    defaults = EMBEDDED_DEFAULTS if args.dataset == EMBEDDED else GENERAL_DEFAULTS
    filled = {name: value for name, value in defaults.items() if getattr(args, name) is None}
    for name, value in filled.items():
        setattr(args, name, value)
    return filled


def check_noise_flags(args: argparse.Namespace) -> None:
    """Refuse ``--noise`` / ``--noise-rate`` / ``--open-set-classes`` combinations before any data is loaded."""
    if not 0.0 <= args.noise_rate <= 1.0:
        raise ValueError(f"--noise-rate must be in [0, 1], got {args.noise_rate}")
    if args.noise == OPEN_SET and not args.open_set_classes:
        raise ValueError(f"--noise {OPEN_SET} needs --open-set-classes (the classes whose images are the outside pool)")
    if args.noise == OPEN_SET and args.noise_rate >= 1.0:
        raise ValueError(f"--noise {OPEN_SET} needs --noise-rate below 1 (some images must stay in the label space)")
    if args.open_set_classes and args.noise != OPEN_SET:
        raise ValueError(f"--open-set-classes is for --noise {OPEN_SET} only (got --noise {args.noise})")


def cleaning_config(args: argparse.Namespace) -> CleaningConfig:
    """The `CleaningConfig` of ``--clean-*`` flags; checks ``--iterations`` (and ``--resume`` with it) too."""
    if args.iterations < 1:
        raise ValueError(f"--iterations must be >= 1, got {args.iterations}")
    if args.max_consecutive_skips < 0:
        raise ValueError(f"--max-consecutive-skips must be >= 0, got {args.max_consecutive_skips}")
    if args.iterations > 1 and args.resume:
        raise ValueError("with --iterations, --resume continues --output-dir's iterations: give it no directory")
    threshold = args.clean_threshold
    if threshold is None:
        threshold = 0.5 if args.clean_criterion == "given_label_prob" else 0.0
    return CleaningConfig(args.clean_criterion, threshold, args.clean_action)


def fine_tuning_defaults(args: argparse.Namespace) -> dict[str, Any]:
    """`FINETUNE_META_DEFAULTS` as MetaNoiseConfig values for a run from pretrained weights
    (empty otherwise, and for the fields whose flag was given)."""
    if not (args.pretrained or args.checkpoint):
        return {}
    values = {
        "inner_lr": FINETUNE_META_DEFAULTS["inner_lr_per_lr"] * args.lr,
        "num_synthetic": FINETUNE_META_DEFAULTS["num_synthetic"],
    }
    return {name: value for name, value in values.items() if getattr(args, "meta_" + name) is None}


def resolve_meta_config(args: argparse.Namespace, total_updates: int) -> tuple[MetaNoiseConfig, dict[str, Any]]:
    """The `MetaNoiseConfig` of a run and the defaults chosen for it (not the library's).

    Flags not given keep the library defaults, except the schedules, which follow
    `MetaNoiseConfig.for_run_length` (the library's own defaults suit long Clothing1M runs),
    and, when the run starts from pretrained weights, `fine_tuning_defaults`.
    """
    values = {f.name: getattr(args, "meta_" + f.name) for f in dataclasses.fields(MetaNoiseConfig)}
    values = {name: value for name, value in values.items() if value is not None}
    fast_params = values.get("fast_params")
    if isinstance(fast_params, str) and fast_params not in FAST_PARAM_NAMES:
        values["fast_params"] = tuple(p.strip() for p in fast_params.split(",") if p.strip())
    values.setdefault("seed", args.seed)
    if args.no_meta:
        values["meta_weight"] = 0.0
    fine_tuning = fine_tuning_defaults(args)
    config = MetaNoiseConfig.for_run_length(max(total_updates, 1), **fine_tuning, **values)
    chosen = {name: getattr(config, name) for name in RUN_LENGTH_FIELDS if name not in values}
    return config, {**chosen, **fine_tuning}
