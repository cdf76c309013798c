"""`noisy_meta.finetune` flags: every config field reaches the config, bad values are refused."""

from __future__ import annotations

import dataclasses

import pytest

from noisy_meta import MetaNoiseConfig
from noisy_meta.finetune import build_parser, resolve_meta_config

# ------------------------------------------------------------------------------- flags


def test_every_config_field_has_a_flag_that_reaches_the_config():
    values = {
        "num_synthetic": ("3", 3),
        "perturb_ratio": ("0.25", 0.25),
        "num_neighbors": ("4", 4),
        "feature_source": ("student", "student"),
        "inner_step": ("relative", "relative"),
        "inner_lr": ("0.05", 0.05),
        "inner_radius": ("0.02", 0.02),
        "inner_divergence": ("0.05", 0.05),
        "first_order": (None, True),
        "fast_params": ("layer4.*,fc.*", ("layer4.*", "fc.*")),
        "meta_every": ("2", 2),
        "compensate_meta_every": (None, True),
        "meta_batch_fraction": ("0.5", 0.5),
        "sets_per_pass": ("5", 5),
        "meta_weight": ("2.0", 2.0),
        "ramp_start": ("7", 7),
        "ramp_end": ("9", 9),
        "mentor_decay_ramp": ("0.5", 0.5),
        "mentor_decay": ("0.6", 0.6),
        "mentor_update": ("frozen", "frozen"),
        "update_rule": ("sequential", "sequential"),
        "clip_grad": ("1.5", 1.5),
        "dist_bn": ("broadcast", "broadcast"),
        "seed": ("11", 11),
    }
    from noisy_meta.losses import GeneralizedCrossEntropy

    flags_of_their_own = {
        "criterion": (["--loss", "gce", "--gce-q", "0.5"], GeneralizedCrossEntropy(0.5)),
        "mentor_warmup": (["--no-mentor-warmup"], False),  # on by default: the flag turns it off
    }
    assert set(values) | set(flags_of_their_own) == {f.name for f in dataclasses.fields(MetaNoiseConfig)}, (
        "a new field needs a flag and this test"
    )
    argv = []
    for name, (text, _) in values.items():
        flag = "--meta-seed" if name == "seed" else "--" + name.replace("_", "-")
        argv += [flag] if text is None else [flag, text]
    for flags, _ in flags_of_their_own.values():
        argv += flags
    values.update({name: (None, expected) for name, (_, expected) in flags_of_their_own.items()})
    config, automatic = resolve_meta_config(build_parser().parse_args(argv), total_updates=1000)
    assert automatic == {}
    for name, (_, expected) in values.items():
        assert getattr(config, name) == expected, name


@pytest.mark.parametrize("name", ["all", "last_stage", "head"])
def test_named_fast_params_modes_are_not_taken_for_patterns(name):
    config, _ = resolve_meta_config(build_parser().parse_args(["--fast-params", name]), total_updates=100)
    assert config.fast_params == name


def test_run_length_defaults_and_no_meta():
    args = build_parser().parse_args(["--no-meta", "--seed", "5"])
    config, automatic = resolve_meta_config(args, total_updates=1000)
    assert (config.ramp_start, config.ramp_end) == (100, 400)
    assert config.mentor_decay == pytest.approx(0.98) and config.mentor_decay_ramp == pytest.approx(0.95)
    assert set(automatic) == {"ramp_start", "ramp_end", "mentor_decay", "mentor_decay_ramp"}
    assert config.meta_weight == 0.0 and config.seed == 5
    long_run, _ = resolve_meta_config(args, total_updates=10**6)
    assert (long_run.mentor_decay, long_run.mentor_decay_ramp) == (0.999, 0.99)  # the reference's


@pytest.mark.parametrize(
    "argv, expected",
    [
        ([], True),  # the finetune preset's
        (["--compensate-meta-every"], True),
        (["--compensate-meta-every", "sqrt"], "sqrt"),
        (["--no-compensate-meta-every"], False),
    ],
)
def test_compensate_meta_every_takes_sqrt_and_stays_a_switch(argv, expected):
    config, _ = resolve_meta_config(build_parser().parse_args(["--preset", "finetune", *argv]), total_updates=100)
    assert config.compensate_meta_every == expected


def test_bad_flag_values_are_refused():
    with pytest.raises(ValueError, match="num_synthetic"):
        resolve_meta_config(build_parser().parse_args(["--num-synthetic", "-1"]), total_updates=100)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--update-rule", "both"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--compensate-meta-every", "half"])


def test_every_flag_default_agrees_with_its_settings_field():
    """A default is written twice (argparse, the settings dataclass): they must agree, except where the data set's
    defaults fill the flag (None on the command line) or the settings convert it (a list to a tuple, a path)."""
    import dataclasses
    from pathlib import Path

    from noisy_meta.finetune import settings

    flags = vars(build_parser().parse_args([]))
    filled_by_the_data_set = {"aug", "epochs"}
    groups = (settings.ModelSettings, settings.DataSettings, settings.OptimSettings, settings.MetaSettings)
    groups += (settings.IterativeSettings, settings.ControlSettings, settings.OutputSettings)
    checked = 0
    for group in groups:
        for field in dataclasses.fields(group):
            if field.default is dataclasses.MISSING or field.name not in flags:
                continue
            value = flags[field.name]
            if field.name in filled_by_the_data_set:
                assert value is None, field.name
                continue
            if isinstance(field.default, tuple):
                value = tuple(value or ())
            if isinstance(field.default, Path):
                value = Path(value)
            assert value == field.default, f"--{field.name.replace('_', '-')}: {value!r} != {field.default!r}"
            checked += 1
    assert checked > 40


def test_what_help_says_of_each_meta_default_is_what_a_run_resolves():
    """``--help`` and `RunSettings.meta_config` read one list of layers (`META_DEFAULT_LAYERS`): every default the
    help names for the embedded data set, a preset or a start from weights is the value a run with those flags gets."""
    from noisy_meta.finetune.settings import EMBEDDED, EMBEDDED_DEFAULTS, PRESETS, describe_default

    def resolved(*argv: str) -> MetaNoiseConfig:
        return resolve_meta_config(build_parser().parse_args(list(argv)), total_updates=1000)[0]

    checked = 0
    for field in dataclasses.fields(MetaNoiseConfig):
        if field.name == "criterion":
            continue
        help_text = describe_default(field)
        embedded = EMBEDDED_DEFAULTS.get("meta_" + field.name)
        if embedded is not None:
            assert f"{embedded!r} for {EMBEDDED}" in help_text and getattr(resolved(), field.name) == embedded
            checked += 1
        for name, preset in PRESETS.items():
            if f"{preset.get(field.name)!r} with --preset {name}" in help_text:
                assert getattr(resolved("--preset", name), field.name) == preset[field.name], (field.name, name)
                checked += 1
    from_weights = resolved("--pretrained", "--preset", "full", "--lr", "0.02")
    assert (from_weights.inner_lr, from_weights.num_synthetic) == (0.02, 3)  # "1 x --lr", "3 with --preset full"
    assert "1 x --lr" in describe_default(MetaNoiseConfig.__dataclass_fields__["inner_lr"])
    assert checked >= 10


@pytest.mark.parametrize(
    "flag, defaults_name",
    [(["--fsdp"], "FSDP_META_DEFAULTS"), (["--lora-rank", "4"], "LORA_META_DEFAULTS")],
)
def test_a_flag_that_changes_the_preset_says_so_and_a_given_flag_wins(flag, defaults_name):
    """``--fsdp`` makes the head the fast weights, ``--lora-rank`` clips the gradient at 1, over every preset; what
    ``--help`` says is what a run gets, the run's first lines name the flag, and a flag given for the field wins."""
    from noisy_meta.finetune import settings as run_settings
    from noisy_meta.finetune.settings import PRESETS, RunSettings, describe_default

    defaults = getattr(run_settings, defaults_name)
    for name, value in defaults.items():
        field = MetaNoiseConfig.__dataclass_fields__[name]
        assert f"{value!r} with {flag[0]}" in describe_default(field)
        for preset in PRESETS:
            args = build_parser().parse_args([*flag, "--preset", preset])
            config, chosen = resolve_meta_config(args, total_updates=1000)
            assert getattr(config, name) == value and chosen[name] == value, (name, preset)
            assert flag[0] in RunSettings.from_args(args).meta_config_sources()
        assert getattr(resolve_meta_config(build_parser().parse_args([*flag]), 1000)[0], name) == value
    given = {"fast_params": ["--fast-params", "last_stage"], "clip_grad": ["--clip-grad", "5"]}
    for name in defaults:
        config, chosen = resolve_meta_config(build_parser().parse_args([*flag, *given[name]]), total_updates=1000)
        assert getattr(config, name) != defaults[name] and name not in chosen
