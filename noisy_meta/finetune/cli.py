"""Command-line flags of `examples/finetune.py` (timm's ``train.py`` names where they exist)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Any, NoReturn, get_args

from ..config import MentorUpdate, MetaNoiseConfig, field_choices
from ..labels.cleaning_config import CLEANING_ACTIONS, CLEANING_CRITERIA
from ..labels.noise import NOISE_KINDS, OPEN_SET
from .flags import (
    check_settings,
    flag_of,
    half_open_unit,
    non_negative_float,
    non_negative_int,
    open_fraction,
    positive_float,
    positive_int,
    probability,
    read_config_file,
    smoothing_fraction,
    switch_or,
)
from .settings import (
    ARGS_FILE,
    EMBEDDED,
    EMBEDDED_DEFAULTS,
    FINETUNE_CLEANING,
    GENERAL_DEFAULTS,
    MODEL_CARD_FILE,
    NO_FLAG_FIELDS,
    PRED_PROBS_FILE,
    PRESETS,
    REPORT_FILE,
    TRACKING_DIR,
    RunSettings,
    describe_default,
)
from .tracking import TRACKERS

#: MetaNoiseConfig fields whose flag takes something other than the field's own type.
_FIELD_TYPES: dict[str, Any] = {"clip_grad": float, "inner_divergence": float, "seed": int}
_FIELD_TYPES.update(fast_params=str, feature_source=str)
#: Fields whose flag also takes values beyond the named choices (comma-separated glob patterns).
_OPEN_CHOICES = ("fast_params",)
#: ``--loss`` values (`noisy_meta.losses`).
LOSSES = ("cross_entropy", "gce", "sce")
#: ``--clean-before`` values: noise detection with the starting weights before training.
CLEAN_BEFORE_ACTIONS = ("off", "remove", "relabel", "mask")
#: ``--label-issues-action`` values: what becomes of the rows an earlier run's label_issues.csv flags.
LABEL_ISSUES_ACTIONS = ("remove", "relabel", "mask")
#: ``--clean-before-threshold`` values (`noisy_meta.detect_label_noise`'s ``threshold``).
CLEAN_BEFORE_THRESHOLDS = ("per_class", "majority")


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
    """The command line's parser: one group of flags per `RunSettings` group."""
    parser = _Parser(
        prog=prog or program_name(),
        description="Fine-tune a timm model on noisily labelled images with MLNT (noisy-meta). Defaults marked "
        f"'for {EMBEDDED}' apply to the embedded data set (the default --dataset); others apply everywhere.",
        formatter_class=_Formatter,
    )
    parser.add_argument(
        "-c",
        "--config",
        metavar="FILE.yaml",
        help=f"start from the flags in this YAML file (a run's <output-dir>/{ARGS_FILE}, or any mapping of flag "
        "names to values); flags given on the command line win",
    )
    for add_flags in (_model_flags, _data_flags, _optim_flags, _meta_flags, _iterative_flags, _output_flags):
        add_flags(parser)
    return parser


def _model_flags(parser: argparse.ArgumentParser) -> None:
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
    model.add_argument(
        "--lora-rank",
        type=non_negative_int,
        default=0,
        help="train LoRA adapters of this rank (PEFT; pip install 'noisy-meta[peft]') and the classifier, the rest "
        "frozen: the meta step's fast weights are then the adapters and the classifier; 0: no LoRA",
    )
    model.add_argument(
        "--lora-alpha", type=positive_float, default=None, help="LoRA's scale is alpha / rank; default alpha = rank"
    )
    model.add_argument(
        "--lora-targets",
        nargs="+",
        default=None,
        metavar="MODULE",
        help="PEFT target_modules (names or name suffixes); default every nn.Linear outside the classifier "
        "(a transformer's projections), or every ungrouped nn.Conv2d for a model without one",
    )
    model.add_argument("--num-classes", type=positive_int, default=None, help="default: from the label column")
    model.add_argument(
        "--img-size", type=positive_int, default=None, help=f"input size; default: the model's, or 32 for {EMBEDDED}"
    )


def _data_flags(parser: argparse.ArgumentParser) -> None:
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
    data.add_argument(
        "--workers",
        type=non_negative_int,
        default=0,
        help="loader worker processes (with --streaming: processes that decode the streamed images)",
    )
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


def _optim_flags(parser: argparse.ArgumentParser) -> None:
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
        "--fsdp",
        action="store_true",
        help="shard the model across the launched processes with FSDP2 (fully_shard; accelerate launch "
        "--num_processes N, N >= 2): each holds 1/N of the trunk and its optimizer state, the fast weights "
        "(--fast-params head, the default here, or last_stage) stay whole; checkpoints hold whole tensors",
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


def _meta_flags(parser: argparse.ArgumentParser) -> None:
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
        "mostly carry another label (noisy_meta.detect_label_noise) and remove or relabel them, or mask them (their "
        "labels out of the loss on the labels, the images still in the meta step and the mentor); the flags go to "
        f"<output-dir>/clean_before.json. Default: {FINETUNE_CLEANING} with --preset finetune from pretrained weights, "
        "off otherwise (on the fine-tuning benchmark removing helped a ResNet and hurt a ViT: benchmarks/RESULTS.md)",
    )
    meta.add_argument("--clean-before-k", type=positive_int, default=10, help="neighbours in the --clean-before vote")
    meta.add_argument(
        "--clean-before-threshold",
        choices=CLEAN_BEFORE_THRESHOLDS,
        default="per_class",
        help="which images the --clean-before vote flags: per_class (confident learning's per-class thresholds read "
        "from the vote: few flags on a clean training set) or majority (another class has more votes than the given "
        "label)",
    )
    meta.add_argument(
        "--label-issues",
        default=None,
        metavar="CSV",
        help="an earlier run's label_issues.csv (same data, noise and seed), as written or as you edited it: its "
        "flagged rows are dealt with by --label-issues-action before training (the loop: train, inspect, fix, "
        "retrain)",
    )
    meta.add_argument(
        "--label-issues-action",
        choices=LABEL_ISSUES_ACTIONS,
        default="remove",
        help="remove the flagged images, relabel them with their suggested_label, or mask them (their labels out of "
        "the loss on the labels)",
    )
    for field in dataclasses.fields(MetaNoiseConfig):
        if field.name not in NO_FLAG_FIELDS:
            _add_field_flag(meta, field)


def _iterative_flags(parser: argparse.ArgumentParser) -> None:
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


def _output_flags(parser: argparse.ArgumentParser) -> None:
    output = parser.add_argument_group("output")
    output.add_argument(
        "--output-dir",
        default="output/finetune",
        help=f"checkpoints, metrics, {ARGS_FILE} (the resolved flags) and {REPORT_FILE} (the learning curves); "
        "an earlier run there is kept",
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
        "--log-with",
        nargs="+",
        choices=TRACKERS,
        metavar="TRACKER",
        help=f"experiment trackers (Accelerate's: {', '.join(TRACKERS[1:])}; all: every one installed): "
        "per-update losses, meta weight and learning rate, per-epoch accuracies; local ones write in "
        f"<output-dir>/{TRACKING_DIR}/",
    )
    output.add_argument(
        "--experiment",
        metavar="NAME",
        help="the tracker run's name (default: the output directory's name, so --resume continues it)",
    )
    output.add_argument(
        "--export-dir",
        metavar="DIR",
        help=f"at the end, save the kept model (student or mentor, whichever validated better) with timm's "
        f"save_for_hf: config.json with the class names, model.safetensors and a model card ({MODEL_CARD_FILE}); "
        "load it with timm.create_model('local-dir:DIR')",
    )
    output.add_argument(
        "--push-to-hub",
        metavar="REPO",
        help="also upload the --export-dir to this Hugging Face Hub repository (where a hub is reachable)",
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


def _add_field_flag(group: argparse._ArgumentGroup, field: dataclasses.Field) -> None:
    flag = "--" + field.name.replace("_", "-")
    dest = "meta_" + field.name
    if field.name == "seed":  # --seed is the run's seed; this one only the synthetic labels'
        flag = "--meta-seed"
    note = f"default {describe_default(field)}"
    named = field_choices(field.name)
    if isinstance(field.default, bool) and named:  # a switch that also takes named values (compensate_meta_every)
        no_flag = f"--no-{flag[2:]}"
        group.add_argument(no_flag, dest=dest, action="store_const", const=False, default=None, help=f"see {flag}")
        note += f"; without a value: true; {no_flag}: false (see MetaNoiseConfig.{field.name} for the values)"
        metavar = "{" + ",".join(named) + "}"
        group.add_argument(flag, dest=dest, type=switch_or(*named), nargs="?", const=True, metavar=metavar, help=note)
        return
    if isinstance(field.default, bool):
        group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=note)
        return
    kind = _FIELD_TYPES.get(field.name, type(field.default))
    if field.name == "fast_params":
        note += "; or comma-separated glob patterns such as 'layer4.*,fc.*'"
    choices = None if field.name in _OPEN_CHOICES else named or None
    metavar = None if choices else field.name.upper()
    group.add_argument(flag, dest=dest, type=kind, choices=choices, default=None, metavar=metavar, help=note)


def _preset_text(name: str) -> str:
    return ", ".join(f"{field.replace('_', '-')} {value}" for field, value in PRESETS[name].items())


def settings_from_args(args: argparse.Namespace) -> RunSettings:
    """The `RunSettings` of parsed flags, checked before any data or model is loaded.

    Raises ValueError naming the flag: conflicting flags, missing paths, an output directory
    that holds a run (`check_settings`), a cleaning threshold or MetaNoiseConfig values refused.
    """
    settings = RunSettings.from_args(args)  # the groups check their own values (a cleaning threshold)
    check_settings(settings)
    try:
        settings.meta_config(total_updates=1)
    except ValueError as error:
        raise ValueError(flag_of(str(error), [f.name for f in dataclasses.fields(MetaNoiseConfig)])) from None
    return settings


def parse_flags(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse ``argv``; with ``--config FILE.yaml`` the file's values are the defaults, so flags given win.

    Raises ValueError for a config file that cannot be read or names no flag (`read_config_file`).
    """
    args = parser.parse_args(argv)
    if args.config:
        parser.set_defaults(**read_config_file(args.config, parser))
        args = parser.parse_args(argv)
    return args


def parse_settings(argv: list[str] | None = None) -> RunSettings:
    """Parse and check a command line (``None``: ``sys.argv``); errors raise as in `settings_from_args`."""
    return settings_from_args(parse_flags(build_parser(), argv))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse and check flags, then run (`noisy_meta.finetune.trainer.run`); returns the last epoch's
    metrics record. Errors raise (`run_command` turns them into one line)."""
    from .trainer import run

    return run(parse_settings(argv))


def resolve_meta_config(args: argparse.Namespace, total_updates: int) -> tuple[MetaNoiseConfig, dict[str, Any]]:
    """The `MetaNoiseConfig` parsed flags give a run of ``total_updates`` (`RunSettings.meta_config`)."""
    return RunSettings.from_args(args).meta_config(total_updates)


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
        args = parse_flags(parser, argv)
        settings = settings_from_args(args)
    except ValueError as error:
        parser.error(str(error))
    from .checkpoint import EXIT_STOPPED, CheckpointError, RunStopped
    from .trainer import is_lost_rank, lost_rank_message, run

    try:
        run(settings)
    except RunStopped as stopped:
        parser.exit(EXIT_STOPPED, f"{parser.prog}: {stopped}\n")
    except (ValueError, CheckpointError, OSError) as error:
        if args.debug:
            raise
        parser.exit(2, f"{parser.prog}: error: {error} (--debug shows where)\n")
    except RuntimeError as error:
        if args.debug or not is_lost_rank(error):
            raise
        parser.exit(2, f"{parser.prog}: error: {lost_rank_message(error, settings)}\n")
