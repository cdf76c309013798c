"""``--export-dir``: the run's kept model as a timm model anyone can load, with a model card.

The kept model is the one ``best/`` was saved for: of the best validation epoch, the student
or the mentor, whichever scored higher there (the student on a tie). It is written with
timm's ``save_for_hf`` (``config.json`` with the architecture, the class names as
``label_names`` and the preprocessing; ``model.safetensors``), so
``timm.create_model("local-dir:DIR", pretrained=True)`` loads it offline, and, once uploaded
(``--push-to-hub REPO``), ``timm.create_model("hf-hub:REPO", pretrained=True)`` and transformers'
``TimmWrapperForImageClassification`` do. ``README.md`` is its model card: data, noise,
method and configuration, accuracies and cost, from the run's own files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .checkpoint import MetricsLog, find_checkpoint, validation_score
from .data import Splits
from .models import load_mentor
from .settings import ARGS_FILE, MENTOR_FILE, METRICS_FILE, MODEL_CARD_FILE, STUDENT_FILE, RunContext, RunSettings

__all__ = ["best_record", "export_model", "model_card", "push_to_hub"]


def best_record(records: list[dict[str, Any]]) -> tuple[dict[str, Any], str]:
    """The epoch ``best/`` holds (the first with the highest validation score of either model) and which
    model scored it: ``"mentor"`` when it beat the student there, else ``"student"``."""
    best = max(records, key=validation_score)
    return best, "mentor" if best["val_mentor"] > best["val_student"] else "student"


def export_model(context: RunContext, splits: Splits, run_dir: Path) -> Path:
    """Save the kept model of the run in ``run_dir`` (the last iteration's with ``--iterations``) to
    ``--export-dir`` with its model card; returns the directory."""
    from timm.models import save_for_hf

    settings = context.settings
    export_dir = settings.output.export_dir
    assert export_dir is not None
    records = MetricsLog(run_dir / METRICS_FILE).read()
    best, kept = best_record(records)
    weights = find_checkpoint(run_dir / "best") / (MENTOR_FILE if kept == "mentor" else STUDENT_FILE)
    model = load_mentor(settings.model, splits.num_classes, weights)
    size = settings.model.img_size
    model_config: dict[str, Any] = {}
    if splits.class_names:
        model_config["label_names"] = list(splits.class_names)
    save_for_hf(
        model,
        str(export_dir),
        model_config=model_config,
        safe_serialization=True,
        data_config={"input_size": (3, size, size)} if size else None,
    )
    args_path = run_dir / ARGS_FILE
    run_file = yaml.safe_load(args_path.read_text()) if args_path.exists() else {}
    (export_dir / MODEL_CARD_FILE).write_text(model_card(context, splits, records, run_file))
    return export_dir


def model_card(context: RunContext, splits: Splits, records: list[dict[str, Any]], run_file: dict[str, Any]) -> str:
    """The model card (``README.md``, Hugging Face's format: YAML metadata, then Markdown)."""
    best, kept = best_record(records)
    sections = (
        _card_title(context.settings, records, best, kept),
        _card_data(context.settings, splits),
        _card_method(context, run_file),
        _card_results(records, best),
        _card_cost(context, records, run_file),
    )
    return "\n".join(line for section in sections for line in section)


def _card_title(settings: RunSettings, records: list[dict[str, Any]], best: dict[str, Any], kept: str) -> list[str]:
    """The metadata, what the exported model is (``kept`` of the ``best`` epoch) and how to load it."""
    last = records[-1]
    other = "student" if kept == "mentor" else "mentor"
    metadata = {
        "library_name": "timm",
        "pipeline_tag": "image-classification",
        "tags": ["image-classification", "timm", "noisy-labels", "mlnt", "noisy-meta"],
    }
    start = (
        "pretrained weights"
        if settings.model.pretrained
        else (f"the weights in {settings.model.checkpoint}" if settings.model.checkpoint else "a random initialisation")
    )
    method = (
        "cross-entropy (the `--no-meta` baseline; an EMA mentor tracked)"
        if settings.meta.no_meta
        else f"MLNT (Li et al., CVPR 2019) with `--preset {settings.preset}`"
    )
    return [
        "---",
        yaml.safe_dump(metadata, sort_keys=False).strip(),
        "---",
        "",
        f"# {settings.experiment}: `{settings.model.name}` fine-tuned on noisy labels with noisy-meta",
        "",
        f"The {kept} of epoch {best['epoch']} of {last['epoch']}: it validated at {_pct(best[f'val_{kept}'])} "
        f"against the {other}'s {_pct(best[f'val_{other}'])} there (the run keeps whichever of the two "
        "validated better). Trained with " + method + f" from {start}.",
        "",
        "```python",
        "import timm",
        f'model = timm.create_model("local-dir:{settings.output.export_dir}", pretrained=True)  # or "hf-hub:<repo>"',
        "```",
    ]


def _card_data(settings: RunSettings, splits: Splits) -> list[str]:
    """The data set, its splits and the label noise."""
    lines = [
        "",
        "## Data",
        "",
        f"- data set: `{settings.data.dataset}`; training split `{settings.data.train_split}`",
        f"- images: train {len(splits.train) if splits.train_rows is None else splits.train_rows}, validation "
        f"{len(splits.validation)} (scored against {'clean' if splits.validation_is_clean else 'the given'} labels), "
        f"test {len(splits.test) if splits.test is not None else 0}",
        f"- {splits.num_classes} classes" + (f": {_names(splits.class_names)}" if splits.class_names else ""),
        "",
        "## Label noise",
        "",
        f"- {_noise_line(settings, splits)}",
        f"- cleaning before training: `--clean-before {settings.clean_before}`",
    ]
    if settings.iterative.iterations > 1:
        lines.append(f"- {settings.iterative.iterations} iterations, cleaning by the previous best mentor in between")
    return lines


def _card_method(context: RunContext, run_file: dict[str, Any]) -> list[str]:
    """The optimisation and the `MetaNoiseConfig` the run trained with."""
    optim, accelerator = context.settings.optim, context.accelerator
    return [
        "",
        "## Method and configuration",
        "",
        f"- optimizer `{optim.opt}`, lr {optim.lr:g}, schedule `{optim.sched}`, "
        f"{optim.epochs} epochs, batch {optim.batch_size} per process, {accelerator.num_processes} "
        f"process(es), {optim.grad_accum_steps} accumulation step(s) per update",
        f"- mixed precision: {accelerator.mixed_precision if accelerator.mixed_precision != 'no' else 'none (fp32)'}",
        "- the MetaNoiseConfig it trained with:",
        "",
        "```yaml",
        yaml.safe_dump(run_file.get("meta_config", {}), sort_keys=False).strip(),
        "```",
        "",
        f"Every flag is in the run's `{ARGS_FILE}`; `--config` it to train the same way.",
    ]


def _card_results(records: list[dict[str, Any]], best: dict[str, Any]) -> list[str]:
    """Top-1 accuracy at the kept (``best``) epoch and the last."""
    last = records[-1]
    lines = [
        "",
        "## Results (top-1 accuracy)",
        "",
        "| epoch | val student | val mentor | test student | test mentor |",
        "|---|---|---|---|---|",
    ]
    for label, record in ((f"best ({best['epoch']})", best), (f"last ({last['epoch']})", last)):
        cells = [_pct(record.get(f"{split}_{who}")) for split in ("val", "test") for who in ("student", "mentor")]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def _card_cost(context: RunContext, records: list[dict[str, Any]], run_file: dict[str, Any]) -> list[str]:
    """Training time, updates, throughput and the library versions."""
    accelerator, last = context.accelerator, records[-1]
    seconds = sum(record["seconds"] for record in records)
    return [
        "",
        "## Cost",
        "",
        f"- {seconds:.0f} s of training ({seconds / 60:.1f} min) on {accelerator.num_processes} x "
        f"{accelerator.device.type}, {last['updates']} updates, "
        f"{sum(r['images_per_second'] for r in records) / len(records):.0f} training images/s on average",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in run_file.get("versions", {}).items() if v),
        "",
    ]


def push_to_hub(export_dir: Path, repo_id: str) -> str:
    """Upload ``export_dir`` to the Hub repository ``repo_id`` (created if missing); returns its URL."""
    from huggingface_hub import create_repo, upload_folder

    url = create_repo(repo_id, exist_ok=True)
    upload_folder(repo_id=repo_id, folder_path=str(export_dir), commit_message="noisy-meta fine-tuning run")
    return str(url)


def _noise_line(settings: Any, splits: Splits) -> str:
    noise = settings.noise
    if splits.noise is not None:
        return f"injected: {noise.kind}, rate {noise.rate:g} ({splits.noise.realised_rate:.4f} realised)"
    if settings.data.clean_label_column:
        return f"labels as given; clean labels in `{settings.data.clean_label_column}` for scoring"
    return "labels as given (none injected)"


def _names(names: list[str]) -> str:
    shown = ", ".join(f"`{n}`" for n in names[:20])
    return shown + (f" ... ({len(names) - 20} more)" if len(names) > 20 else "")


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"
