"""`benchmarks/accuracy.py --quick` runs end to end (the full table is too long for the suite)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.mark.slow
def test_accuracy_benchmark_quick_mode(tmp_path):
    pytest.importorskip("matplotlib")
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "accuracy.py"), "--quick", "--output", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    runs = json.loads((tmp_path / "runs.json").read_text())
    assert {(r["setting"], r["method"]) for r in runs} == {
        (s, m) for s in ("sym50", "clean") for m in ("ce", "mlnt_clean")
    }
    for run in runs:
        assert len(run["student"]) == len(run["mentor"]) == 2 and all(0.0 <= a <= 1.0 for a in run["student"])
    cleaning = next(r["cleaning"] for r in runs if r["setting"] == "sym50" and r["method"] == "mlnt_clean")
    assert cleaning["detection"]["num_noisy"] > 1500 and cleaning["detection"]["recall"] > 0.5
    assert "| sym50 | ce |" in result.stdout and "precision" in result.stdout
    assert (tmp_path / "sym50.png").stat().st_size > 10_000


def test_accuracy_benchmark_refuses_unknown_overrides():
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "accuracy.py"), "--quick", "--set", "inner_lrr=1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0 and "unknown MetaNoiseConfig field(s): inner_lrr" in result.stderr


@pytest.mark.slow
def test_finetune_benchmark_quick_mode(tmp_path):
    """Pretrains both backbones (cached as safetensors), fine-tunes, writes runs.json and the chart."""
    pytest.importorskip("matplotlib")
    command = [
        sys.executable,
        str(ROOT / "benchmarks" / "finetune_accuracy.py"),
        "--quick",
        "--output",
        str(tmp_path),
        "--cache",
        str(tmp_path / "pretrained"),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for arch in ("resnet", "vit"):
        assert f"pretrained {arch} (" in result.stdout  # how it was made and how long it took
    assert len(list((tmp_path / "pretrained").glob("*.safetensors"))) == 2
    runs = json.loads((tmp_path / "runs.json").read_text())
    assert {(r["arch"], r["setting"], r["method"]) for r in runs} == {
        (a, s, m) for a in ("resnet", "vit") for s in ("sym40", "open30") for m in ("ce", "gce", "recipe")
    }
    for run in runs:
        assert len(run["student_test"]) == len(run["mentor_val"]) == 1 and 0.0 <= run["student_test"][0] <= 1.0
    assert {round(r["realised_rate"], 2) for r in runs if r["setting"] == "open30"} == {0.3}
    assert "| resnet | open30 | ce_early |" in result.stdout and "| margin |" in result.stdout
    assert (tmp_path / "accuracy_vs_time.png").stat().st_size > 10_000
    again = subprocess.run([*command, "--methods", "ce", "--merge"], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "pretrained resnet: cached" in again.stdout  # the cache is used
    merged = json.loads((tmp_path / "runs.json").read_text())  # the ce runs replaced, the others kept
    assert sorted((r["arch"], r["setting"], r["method"]) for r in merged) == sorted(
        (r["arch"], r["setting"], r["method"]) for r in runs
    )
    assert len((tmp_path / "commands.txt").read_text().splitlines()) == 2


def benchmark_module(name: str):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def test_speed_configuration_names():
    speed = benchmark_module("speed")
    assert speed.parse_config("second_order_M1_every4_sub50") == (
        "second_order",
        1,
        {"meta_every": 4, "meta_batch_fraction": 0.5},
    )
    assert speed.parse_config("first_order_M10_last_stage") == ("first_order", 10, {"fast_params": "last_stage"})
    assert speed.parse_config("second_order_M5_batched") == ("second_order", 5, {"sets_per_pass": 5})
    assert speed.parse_config("second_order_M10_pass2") == ("second_order", 10, {"sets_per_pass": 2})
    assert speed.cycle("plain") == speed.cycle("reference_M5") == speed.cycle("second_order_M1") == 1
    assert speed.cycle("second_order_M1_every3") == 3
    from noisy_meta.config import FAST_PRESET

    assert speed.cycle("fast") == FAST_PRESET["meta_every"]
    with pytest.raises(SystemExit, match="unknown configuration 'second_order_M1_every'"):
        speed.parse_config("second_order_M1_every")


def test_meta_schedule_probe_switches_meta_every_at_half_the_run():
    probe = benchmark_module("meta_schedule_probe")
    configs = probe.ScheduledConfigs()
    config = configs.for_run_length(60, ramp_start=0, ramp_end=0, **probe.METHODS["dense_early"])
    assert config.switch_at == 30
    weights = {step: config.meta_weight_at(step) for step in range(60) if config.meta_weight_at(step)}
    assert sorted(weights) == [*range(0, 30, 3), 30, 40, 50]
    assert weights[3] == pytest.approx(3**0.5) and weights[40] == pytest.approx(10**0.5)
    full = configs.for_run_length(60, ramp_start=0, ramp_end=0, **probe.METHODS["dense_early_full"])
    assert full.meta_weight_at(3) == 3.0 and full.meta_weight_at(40) == 10.0
    assert type(configs.for_run_length(60)) is probe.MetaNoiseConfig  # no schedule asked: the plain config


def test_cost_chart_gain_kept(tmp_path):
    """Gains and costs against the cross-entropy runs of the same file; the share of second order's gain."""
    cost_chart = benchmark_module("cost_chart")

    def runs(method, accuracy, seconds):
        return [{"setting": "sym50", "method": method, "student": [accuracy], "seconds": seconds}] * 2

    old, new = tmp_path / "old.json", tmp_path / "new.json"
    old.write_text(json.dumps(runs("ce", 0.80, 10) + runs("mlnt_so", 0.90, 100)))
    new.write_text(json.dumps(runs("ce", 0.82, 20) + runs("mlnt_fast", 0.90, 30)))
    table = cost_chart.summarise([old, new])
    assert table["sym50", "mlnt_fast"]["gain"] == pytest.approx(8.0) and table["sym50", "mlnt_fast"]["x_ce"] == 1.5
    lines = cost_chart.gain_table(table)
    assert "| mlnt_fast | 90.0 (80%) |" in "\n".join(lines)


@pytest.mark.slow
def test_gpu_benchmark_runs_at_tiny_sizes_on_the_cpu(tmp_path):
    """benchmarks/gpu.py is prepared for a lent GPU; here its whole path runs on tiny models."""
    out = tmp_path / "gpu.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--tiny", "--seconds", "0.05", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads(out.read_text())
    gpu = benchmark_module("gpu")
    assert [m["name"] for m in results["models"]] == ["test_resnet"]
    for model in results["models"]:
        assert list(model["configs"]) == list(gpu.CONFIGS)
        for config, row in model["configs"].items():
            assert row["images_per_second"] > 0 and row["iterations"] >= 2, (model["name"], config)
            assert row["peak_mib"] is None  # measured on CUDA only
    fp16 = results["fp16"]
    assert fp16["updates"] + fp16["skipped"] == 5 + 5 and fp16["mixed_precision"] == "no"  # no GradScaler on CPU
    assert "| preset finetune |" in result.stdout and "| sets_per_pass 10, M=10 |" in result.stdout


def test_gpu_benchmark_refuses_a_machine_without_cuda():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu.py")], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2 and "no CUDA device here" in result.stderr


def test_fast_step_curves_plots_both_models(tmp_path):
    pytest.importorskip("matplotlib")
    curves = benchmark_module("fast_step_curves")
    runs = [
        {
            "arch": arch,
            "setting": "sym40",
            "seed": 0,
            "regime": "long",
            "method": "mlnt_kl",
            "config": {"inner_divergence": 0.05},
            "student_val": [0.4, 0.5, 0.55],
            "meta_curves": {"fast_divergence": [float("nan"), 0.05, 0.049], "fast_step": [float("nan"), 0.01, 0.02]},
        }
        for arch in ("resnet", "vit")
    ]
    (tmp_path / "tune.json").write_text(json.dumps(runs))
    curves.main([str(tmp_path / "tune.json"), "--output", str(tmp_path / "curves.png")])
    assert (tmp_path / "curves.png").stat().st_size > 10_000


def test_finetune_pick_ranks_candidates_by_their_worst_margin_over_the_best_baseline(tmp_path, capsys):
    pick = benchmark_module("finetune_pick")

    def run(arch, method, val):
        curve = [val - 0.1, val]  # the final epoch is the best one
        return {"arch": arch, "setting": "sym40", "method": method, "student_val": curve, "mentor_val": curve}

    runs = [run("resnet", "ce", 0.5), run("resnet", "gce", 0.55), run("vit", "ce", 0.5), run("vit", "gce", 0.4)]
    runs += [run("resnet", "mlnt_kl", 0.56), run("vit", "mlnt_kl", 0.45)]  # +1 and -5 points
    (tmp_path / "a.json").write_text(json.dumps(runs))
    order, table = pick.margins([tmp_path / "a.json"])
    assert order == [("resnet", "sym40"), ("vit", "sym40")]
    assert table["mlnt_kl (a)"] == [pytest.approx((1.0, 1.0)), pytest.approx((-5.0, -5.0))]
    pick.main([str(tmp_path / "a.json")])
    assert "| mlnt_kl (a) | -5.0 |" in capsys.readouterr().out
