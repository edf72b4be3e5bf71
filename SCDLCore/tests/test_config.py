"""Tests of scdlcore.training.config: defaults, validation messages, YAML/JSON files, overrides and the reference."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from scdlcore.nets.scdl import SCDLModule
from scdlcore.training.config import Config, ConfigError, SCDLConfig, config_reference, load_config


def test_defaults_are_valid_and_match_the_method():
    config = Config()
    assert Config.from_dict({}) == config
    assert (config.ssl.base, config.network.arch, config.network.width, config.norm) == ("cps", "vnet", 16, "batch")
    assert (config.scdl.weight, config.scdl.proxy_weight, config.scdl.sac_weight, config.scdl.kl_weight) == (
        0.1,
        0.3,
        0.1,
        0.02,
    )
    assert (config.scdl.grid, config.scdl.embed_dim, config.scdl.num_samples, config.scdl.p2e) == (
        12,
        256,
        50,
        "tokens",
    )
    assert (config.train.lr, config.train.momentum, config.train.weight_decay) == (0.01, 0.9, 1e-4)
    assert config.train.patch_size == (96, 96, 96)
    assert config.data.hu_window == (-150.0, 450.0)


@pytest.mark.parametrize(
    ("base", "norm", "expected"),
    [
        ("cps", "auto", "batch"),
        ("supervised", "auto", "batch"),
        ("mean_teacher", "auto", "instance"),
        ("mean_teacher", "batch", "batch"),
        ("cps", "instance", "instance"),
    ],
)
def test_norm_auto_follows_the_base(base, norm, expected):
    assert Config.from_dict({"ssl": {"base": base}, "network": {"norm": norm}}).norm == expected


def test_to_dict_is_json_and_round_trips():
    config = Config.from_dict({"data": {"val_cases": ["case7"], "spacing": [1, 1, 3]}, "scdl": {"hidden": [64]}})
    data = config.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert Config.from_dict(data) == config
    assert config.data.spacing == (1.0, 1.0, 3.0) and config.scdl.hidden == (64,)


def test_scdl_section_builds_the_scdl_module():
    module = SCDLModule(4, 3, **SCDLConfig(p2e="classes", grid=2, hidden=(8,), embed_dim=8).module_kwargs())
    assert (module.p2e, module.grid, module.proxy_mean.shape) == ("classes", 2, (3, 8))


@pytest.mark.parametrize(
    ("data", "key", "suggestion"),
    [
        ({"train": {"stpes": 10}}, "train.stpes", "steps"),
        ({"trian": {"steps": 10}}, "trian", "train"),
        ({"scdl": {"anchor_momentun": 0.5}}, "scdl.anchor_momentun", "anchor_momentum"),
        ({"ssl": {"topk": 0.2}}, "ssl.topk", "top_k"),
    ],
)
def test_unknown_keys_are_refused_with_the_file_and_the_closest_match(data, key, suggestion):
    with pytest.raises(ConfigError) as info:
        Config.from_dict(data, "experiment.yaml")
    message = str(info.value)
    assert message.startswith("experiment.yaml: ")
    assert f"unknown key {key!r}" in message
    assert f"Did you mean {suggestion!r}?" in message


def test_an_unknown_key_with_no_close_match_lists_the_valid_keys():
    with pytest.raises(ConfigError, match=r"unknown key 'scdl\.p2e_mode'\. Valid keys: enabled, .*\bp2e\b"):
        Config.from_dict({"scdl": {"p2e_mode": "tokens"}}, "experiment.yaml")


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("train", "steps", -5),
        ("train", "steps", 0),
        ("train", "steps", "100"),  # a string for an int
        ("train", "steps", 2.5),
        ("train", "steps", True),
        ("train", "steps", float("inf")),
        ("train", "steps", float("nan")),
        ("train", "patch_size", [96, 96, 40]),  # not a multiple of 16
        ("train", "patch_size", [8, 16, 16]),
        ("train", "patch_size", [96, 96]),
        ("train", "patch_size", 96),
        ("train", "lr", "0.01"),
        ("train", "lr", 0),
        ("train", "amp", "yes"),
        ("scdl", "p2e", "token"),
        ("scdl", "anchor", "emma"),
        ("scdl", "grid", 0),
        ("scdl", "enabled", 1),
        ("ssl", "base", "meanteacher"),
        ("ssl", "top_k", 0),
        ("ssl", "ema_decay", 1.0),
        ("network", "width", 0),
        ("network", "norm", "group"),
        ("data", "spacing", [1.5, 0, 2]),
        ("data", "spacing", [1.5, "x", 2]),
        ("data", "hu_window", [275, -125]),
        ("data", "val_cases", "case7"),
        ("data", "unreviewed", "ignored"),
        ("augment", "noise_prob", 1.5),
        ("augment", "flip_axes", [3]),
    ],
)
def test_bad_values_are_refused_naming_the_file_and_the_key(section, key, value):
    with pytest.raises(ConfigError) as info:
        Config.from_dict({section: {key: value}}, "experiment.yaml")
    message = str(info.value)
    assert message.startswith("experiment.yaml: ")
    assert f"{section}.{key}" in message


def test_a_misspelt_choice_suggests_the_closest_value():
    # the key, the value given, then the closest valid one
    with pytest.raises(ConfigError, match=r"scdl\.p2e\b.*'token'.*(?i:did you mean) 'tokens'"):
        Config.from_dict({"scdl": {"p2e": "token"}})


def test_a_section_that_is_not_a_mapping_is_refused():
    with pytest.raises(ConfigError, match=r"experiment\.yaml: section 'train.*must be a mapping"):
        Config.from_dict({"train": [1, 2]}, "experiment.yaml")


def test_numbers_are_converted_to_the_declared_type():
    config = Config.from_dict({"train": {"steps": 100.0, "lr": 1}, "data": {"hu_window": [-100, 200]}})
    assert config.train.steps == 100 and isinstance(config.train.steps, int)
    assert config.train.lr == 1.0 and isinstance(config.train.lr, float)
    assert config.data.hu_window == (-100.0, 200.0)


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize("suffix", [".yaml", ".yml", ".json"])
def test_yaml_and_json_files_load(tmp_path, suffix):
    content = {
        "ssl": {"base": "mean_teacher"},
        "scdl": {"p2e": "classes", "hidden": [128, 64]},
        "train": {"steps": 300, "patch_size": [64, 96, 128]},
    }
    path = tmp_path / f"experiment{suffix}"
    text = json.dumps(content) if suffix == ".json" else "# an experiment\n" + yaml.safe_dump(content)
    path.write_text(text, encoding="utf-8")

    config = load_config(path)

    assert (config.ssl.base, config.norm) == ("mean_teacher", "instance")
    assert (config.scdl.p2e, config.scdl.hidden) == ("classes", (128, 64))
    assert (config.train.steps, config.train.patch_size) == (300, (64, 96, 128))
    assert config.train.lr == 0.01  # untouched keys keep their defaults


def test_an_empty_yaml_file_gives_the_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing set\n", encoding="utf-8")
    assert load_config(path) == Config()


def test_relative_data_paths_are_resolved_against_the_config_folder(tmp_path, monkeypatch):
    folder = tmp_path / "experiments"
    folder.mkdir()
    path = folder / "run.yaml"
    absolute = tmp_path / "elsewhere" / "cache"
    path.write_text(
        f"data:\n  dataset: ../datasets/synapse\n  cache_dir: {json.dumps(str(absolute))}\n", encoding="utf-8"
    )
    monkeypatch.chdir(tmp_path / "..")  # the working folder must not matter

    config = load_config(path)

    assert Path(config.data.dataset) == (tmp_path / "datasets" / "synapse").resolve()
    assert Path(config.data.cache_dir) == absolute


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"Cannot read config file .*missing\.yaml"):
        load_config(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: {steps: [1,\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"broken\.yaml is not valid YAML"):
        load_config(broken)
    broken_json = tmp_path / "broken.json"
    broken_json.write_text("{'train': 1}", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"broken\.json is not valid JSON"):
        load_config(broken_json)
    binary = tmp_path / "ct.nii.gz"  # a CT given where the config goes
    binary.write_bytes(b"\x1f\x8b\x08\x00\xff\xfe")
    with pytest.raises(ConfigError, match=r"Config file .*ct\.nii\.gz is not a text file \(YAML or JSON\)"):
        load_config(binary)
    listing = tmp_path / "list.yaml"
    listing.write_text("- train\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"list\.yaml must hold a mapping of sections, got list"):
        load_config(listing)
    typo = tmp_path / "typo.yaml"
    typo.write_text("train:\n  stpes: 10\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"typo\.yaml: unknown key 'train\.stpes'\. Did you mean 'steps'\?"):
        load_config(typo)


def test_with_overrides_returns_a_validated_copy():
    config = Config()
    changed = config.with_overrides({"train.steps": 10, "scdl.p2e": "classes", "train.patch_size": [32, 32, 64]})
    assert (changed.train.steps, changed.scdl.p2e, changed.train.patch_size) == (10, "classes", (32, 32, 64))
    assert config.train.steps == 20000 and config.scdl.p2e == "tokens"  # the original is untouched
    with pytest.raises(ConfigError, match=r"overrides: train\.steps must be >= 1"):
        config.with_overrides({"train.steps": -1})
    with pytest.raises(ConfigError, match=r"unknown key 'train\.stpes'\. Did you mean 'steps'\?"):
        config.with_overrides({"train.stpes": 10})
    with pytest.raises(ConfigError, match=r"Override 'steps': expected SECTION\.KEY"):
        config.with_overrides({"steps": 10})
    with pytest.raises(ConfigError, match=r"Override 'trian\.steps'"):
        config.with_overrides({"trian.steps": 10})


def test_config_reference_lists_every_key_and_parses_to_the_defaults():
    reference = config_reference()
    sections = {}
    for section in dataclasses.fields(Config):
        assert f"\n{section.name}:" in reference
        sections[section.name] = [item.name for item in dataclasses.fields(section.default_factory())]
        for name in sections[section.name]:
            assert f"\n  {name}: " in reference, f"{section.name}.{name}"
    parsed = yaml.safe_load(reference)
    assert {name: list(keys) for name, keys in parsed.items()} == sections
    assert Config.from_dict(parsed) == Config()


def test_the_fine_tune_default_steps_depend_on_the_device() -> None:
    """A CPU gets the short schedule (minutes on a 2-core CPU), a GPU the long one; other device types count as CPUs."""
    from scdlcore.training.config import default_finetune_steps, expected_cpu_finetune_seconds

    assert (default_finetune_steps("cpu"), default_finetune_steps("cuda")) == (120, 300)
    assert default_finetune_steps("mps") == default_finetune_steps("cpu")
    assert expected_cpu_finetune_seconds() == expected_cpu_finetune_seconds(120) < 300  # within 5 minutes
    assert expected_cpu_finetune_seconds(300) > expected_cpu_finetune_seconds()
