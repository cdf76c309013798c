"""The command line a newcomer meets, through its real entry points (subprocesses): fast --help,
one-line errors with status 2 before any data is loaded, no silently overwritten run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from noisy_meta import MetaNoiseWrapper
from noisy_meta.finetune.trainer import check_process_group

from helpers import tiny_resnet

ROOT = Path(__file__).parents[1]
EXAMPLE = [sys.executable, str(ROOT / "examples" / "finetune.py")]
MODULE = [sys.executable, "-m", "noisy_meta.finetune"]
FAST = ["--model", "test_resnet", "--img-size", "32", "--batch-size", "32", "--epochs", "1", "--first-order"]
FAST += ["--num-synthetic", "2", "--num-neighbors", "4", "--val-fraction", "0.2"]


def command(entry: list[str], *flags: str, timeout: int = 300, **env: str) -> subprocess.CompletedProcess:
    """Run an entry point; the result's ``elapsed`` is its wall time in seconds."""
    started = time.perf_counter()
    result = subprocess.run(
        [*entry, *flags],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "2", **env},
    )
    result.elapsed = time.perf_counter() - started
    return result


# ------------------------------------------------------------------------------- --help


def test_help_is_fast_and_loads_no_heavy_library():
    best = min(_timed(command(EXAMPLE, "--help")) for _ in range(3))
    assert best < 2.0, f"--help took {best:.2f} s"
    probe = (
        "import runpy, sys\n"
        "sys.argv = ['finetune.py', '--help']\n"
        "try:\n    runpy.run_path('examples/finetune.py', run_name='__main__')\n"
        "except SystemExit:\n    pass\n"
        "print(sorted({'torch', 'timm', 'datasets', 'accelerate', 'rich'} & set(sys.modules)), file=sys.stderr)\n"
    )
    result = command([sys.executable, "-c", probe])
    assert result.stderr.strip() == "[]"


def _timed(result: subprocess.CompletedProcess) -> float:
    assert result.returncode == 0, result.stderr
    return result.elapsed


@pytest.mark.parametrize("entry, prog", [(EXAMPLE, "finetune.py"), (MODULE, "python -m noisy_meta.finetune")])
def test_help_names_the_program_and_shows_each_default_once(entry, prog):
    result = command(entry, "--help")
    text = result.stdout
    assert result.returncode == 0 and text.startswith(f"usage: {prog} ")
    assert "(default: None)" not in text and "--no-no-" not in text and "--aug, --no-aug" in text
    options = text.split("\n  --")
    assert not [o for o in options if o.count("default") > 1 and "defaults" not in o], "a default shown twice"
    for flag, default in (("lr LR", "0.05"), ("momentum", "0.9"), ("weight-decay", "0.0005"), ("seed SEED", "0")):
        option = next(o for o in options if o.startswith(flag))
        assert f"default: {default}" in " ".join(option.split()), option
    assert "output-dir OUTPUT_DIR" in text and "default: output/finetune" in " ".join(text.split())
    num_synthetic = " ".join(next(o for o in options if o.startswith("num-synthetic")).split())
    assert "default 10; 5 for mnist-5k; 3 with --preset full from --pretrained/--checkpoint" in num_synthetic


# ------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--noise-rate", "1.5"], "argument --noise-rate: must be in [0, 1], got 1.5"),
        (["--lr", "-1"], "argument --lr: must be a finite number > 0, got -1"),
        (["--epochs", "0"], "argument --epochs: must be an integer >= 1, got 0"),
        (["--batch-size", "two"], "argument --batch-size/-b: expected an integer, got 'two'"),
        (["--noise", "bogus"], "argument --noise: invalid choice: 'bogus'"),
        (["--max-consecutive-skips", "-1"], "argument --max-consecutive-skips: must be an integer >= 0, got -1"),
        (["--iterations", "0"], "argument --iterations: must be an integer >= 1, got 0"),
        (["--dataset", "/nonexistent/data"], "--dataset /nonexistent/data: no such file or directory"),
        (["--checkpoint", "missing.safetensors"], "--checkpoint missing.safetensors: no such file"),
        (["--resume", "/nonexistent/last"], "--resume /nonexistent/last: no such checkpoint directory"),
        (["--noise", "open_set"], "--noise open_set needs --open-set-classes"),
        (["--scale", "0.5", "0.2"], "--scale 0.5 0.2: needs 0 < low <= high <= 1"),
        (["--pretrained", "--checkpoint", "w.safetensors"], "--pretrained and --checkpoint both choose"),
        (["--num-synthetic", "-1"], "--num-synthetic must be an integer >= 0"),
        (["--mentor-decay", "1.5"], "--mentor-decay must be in [0, 1), got 1.5"),
        (["--clean-criterion", "given_label_prob", "--clean-threshold", "0"], "threshold must be a number in (0, 1]"),
        (["--streaming"], "--streaming cannot be combined with --dataset mnist-5k, --noise symmetric: a stream is"),
        (["--streaming", "--dataset", ".", "--grad-accum-steps", "2"], "--streaming cannot be combined with --grad"),
        (["--streaming", "--dataset", "."], "--streaming needs --val-split"),
        (["--loss", "gce", "--smoothing", "0.1"], "--smoothing is label smoothing of --loss cross_entropy"),
        (["--smoothing", "1"], "argument --smoothing: must be in [0, 1), got 1"),
        (["--gce-q", "0"], "argument --gce-q: must be in (0, 1], got 0"),
        (["--clean-before", "remove"], "--clean-before remove needs starting weights (--pretrained or --checkpoint)"),
        (["--inner-step", "adam"], "argument --inner-step: invalid choice: 'adam'"),
        (["--inner-radius", "0"], "--inner-radius must be a finite number > 0"),
    ],
)
def test_a_bad_flag_is_one_line_with_status_2_before_anything_loads(flags, message, tmp_path):
    result = command(EXAMPLE, *flags, "--output-dir", str(tmp_path / "never"))
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("finetune.py: error: "), result.stderr
    assert message in lines[0]
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert not (tmp_path / "never").exists()


def test_an_error_in_the_data_is_one_line_and_debug_shows_the_traceback(tiny_mnist, tmp_path):
    flags = [*FAST, "--dataset", str(tiny_mnist), "--label-column", "target", "--output-dir", str(tmp_path / "out")]
    result = command(EXAMPLE, *flags)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "finetune.py: error: column 'target' not in the training split; it has ['image', 'label'] (--debug shows where)"
    )
    debug = command(EXAMPLE, *flags, "--debug")
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "column 'target'" in debug.stderr


# ------------------------------------------------------------------------------- an earlier run is kept


@pytest.mark.slow
def test_an_earlier_run_is_never_overwritten_silently(tiny_mnist, tmp_path):
    output = tmp_path / "run"
    first = command(EXAMPLE, *FAST, "--dataset", str(tiny_mnist), "--output-dir", str(output))
    assert first.returncode == 0, first.stderr[-3000:]
    before = (output / "metrics.jsonl").read_text()
    again = command(EXAMPLE, *FAST, "--dataset", str(tiny_mnist), "--no-meta", "--output-dir", str(output))
    assert again.returncode == 2
    assert again.stderr.strip() == (
        f"finetune.py: error: --output-dir {output} already holds a run (last, best, metrics.jsonl, args.yaml, "
        "report.png, label_issues.csv, label_issues.png): pass --resume to continue it, another --output-dir "
        "for a new run, or --overwrite to replace it"
    )
    assert (output / "metrics.jsonl").read_text() == before
    (output / "notes.txt").write_text("mine")
    replaced = command(
        EXAMPLE, *FAST, "--dataset", str(tiny_mnist), "--no-meta", "--overwrite", "--output-dir", str(output)
    )
    assert replaced.returncode == 0, replaced.stderr[-3000:]
    removed = "last, best, metrics.jsonl, args.yaml, report.png, label_issues.csv, label_issues.png"
    assert f"--overwrite: removed the earlier run's {removed}" in replaced.stdout
    (record,) = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert record["epoch"] == 1 and record["meta_weight"] == 0.0  # the --no-meta run's
    assert (output / "notes.txt").read_text() == "mine"  # only the run's own files go


def test_an_output_dir_that_is_a_file_is_refused(tmp_path):
    path = tmp_path / "file"
    path.write_text("")
    result = command(EXAMPLE, "--output-dir", str(path))
    assert result.returncode == 2 and f"--output-dir {path}: is a file, not a directory" in result.stderr
    result = command(EXAMPLE, "--output-dir", str(path / "run"))
    assert result.returncode == 2 and f"--output-dir {path / 'run'}: {path} is a file, not a directory" in result.stderr


@pytest.mark.skipif(not Path("/proc/1").is_dir() or os.access("/proc/1", os.W_OK), reason="needs Linux's /proc")
def test_an_output_dir_that_cannot_be_created_is_one_line():
    result = command(EXAMPLE, "--output-dir", "/proc/1/run")
    assert result.returncode == 2 and result.stdout == ""
    (line,) = result.stderr.strip().splitlines()
    assert "--output-dir /proc/1/run: cannot write in /proc/1" in line


@pytest.mark.parametrize("error", [PermissionError(13, "Permission denied"), OSError(28, "No space left on device")])
def test_an_unwritable_output_dir_is_refused_and_left_as_it_was(tmp_path, monkeypatch, error):
    """The write check probes where the run will write and leaves nothing behind."""
    from noisy_meta.finetune.flags import check_writable

    target = tmp_path / "new" / "run"

    def failing_write(self, data):
        raise error

    monkeypatch.setattr(Path, "write_bytes", failing_write)
    with pytest.raises(ValueError, match=f"--output-dir {target}: cannot write in {tmp_path} \\({error.strerror}\\)"):
        check_writable(target)
    target.mkdir(parents=True)
    with pytest.raises(ValueError, match=f"--output-dir {target}: cannot write there \\({error.strerror}\\)"):
        check_writable(target)
    monkeypatch.undo()
    check_writable(target)  # writable: checked, and nothing left behind
    assert list(target.iterdir()) == [] and [p.name for p in tmp_path.iterdir()] == ["new"]


# ------------------------------------------------------------------------------- processes and frozen backbones


def test_processes_that_formed_no_group_are_stopped(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"one of 2 processes \(WORLD_SIZE=2\), but they did not form a process group"):
        check_process_group(num_processes=1)
    check_process_group(num_processes=2)
    monkeypatch.setenv("WORLD_SIZE", "1")
    check_process_group(num_processes=1)


def test_a_launch_that_cannot_form_a_process_group_is_one_line(tmp_path):
    """One of two processes with no rendezvous address: stopped with one line, no traceback, no run."""
    result = command(EXAMPLE, *FAST, "--output-dir", str(tmp_path / "o"), WORLD_SIZE="2")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()[-1:]
    assert line.startswith("finetune.py: error: ") and "MASTER_ADDR" in line
    assert not (tmp_path / "o" / "metrics.jsonl").exists()


def test_a_frozen_backbone_gets_the_shared_trunk_automatically():
    torch.manual_seed(0)
    frozen = tiny_resnet()
    frozen.requires_grad_(False)
    frozen.get_classifier().requires_grad_(True)
    head_mode = tiny_resnet()
    head_mode.load_state_dict(frozen.state_dict())
    head_mode.requires_grad_(False)
    head_mode.get_classifier().requires_grad_(True)
    settings = dict(num_synthetic=2, num_neighbors=3, seed=0, ramp_start=0, ramp_end=0)
    automatic = MetaNoiseWrapper(frozen, torch.optim.SGD(frozen.get_classifier().parameters(), lr=0.1), **settings)
    explicit = MetaNoiseWrapper(
        head_mode, torch.optim.SGD(head_mode.get_classifier().parameters(), lr=0.1), fast_params="head", **settings
    )
    assert automatic.fast_suffix == explicit.fast_suffix == "head"
    x, y = torch.randn(8, 3, 16, 16), torch.arange(8) % 4
    for _ in range(2):
        a, b = automatic.step(x, y), explicit.step(x, y)
        assert a["meta_loss"] == pytest.approx(b["meta_loss"], abs=1e-6)
    assert automatic.trunk_shared is True
    for (name, p), q in zip(frozen.named_parameters(), head_mode.parameters()):
        assert torch.allclose(p, q, atol=1e-6), name
    whole = tiny_resnet()
    assert MetaNoiseWrapper(whole, torch.optim.SGD(whole.parameters(), lr=0.1), **settings).fast_suffix is None


def test_freeze_backbone_says_the_meta_step_runs_only_the_classifier(tiny_mnist, tmp_path):
    result = command(
        EXAMPLE, *FAST, "--dataset", str(tiny_mnist), "--freeze-backbone", "--output-dir", str(tmp_path / "o")
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "only the classifier can change: each synthetic set runs only that part on a shared trunk" in result.stdout


def test_a_log_file_gets_plain_progress_lines(tiny_mnist, tmp_path):
    """Output to a file (not a terminal): a progress line every --log-interval batches, not only at the
    epoch's end. The run also uses the fast preset, and says which fields it set."""
    flags = [*FAST, "--dataset", str(tiny_mnist), "--log-interval", "3", "--preset", "fast"]
    result = command(EXAMPLE, *flags, "--output-dir", str(tmp_path / "o"))
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("epoch 1/1 batch ")]
    assert [line.split()[3] for line in lines] == ["3/8", "6/8", "8/8"]  # 256 training images, batches of 32
    for line in lines:
        for part in ("loss ", " ce ", " meta ", " w ", " img/s", " elapsed 0:", " eta 0:"):
            assert part in line, line
    assert "--preset fast defaults:" in result.stdout and "'meta_every': 5" in result.stdout


def test_the_default_output_directory_is_ignored_by_git():
    from noisy_meta.finetune import build_parser

    default = build_parser().get_default("output_dir")
    ignored = (ROOT / ".gitignore").read_text().splitlines()
    assert default.split("/")[0] + "/" in ignored
