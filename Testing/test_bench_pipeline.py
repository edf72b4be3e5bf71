"""The training benchmarks' building blocks: every accuracy configuration is a valid run configuration, and the
stage timer of ``bench_train_pipeline.py`` times each stage of a real trainer on real CTs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from scdlcore.sample_data import make_sample_dataset
from scdlcore.training.config import Config
from scdlcore.training.trainer import Trainer

BENCHMARKS = Path(__file__).resolve().parent / "Benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import bench_accuracy  # noqa: E402
import bench_train_pipeline  # noqa: E402


@pytest.mark.parametrize("name", list(bench_accuracy.configurations(48)))
def test_every_accuracy_configuration_is_a_valid_config(name):
    config = Config().with_overrides(bench_accuracy.configurations(48)[name].overrides)
    assert all(edge % 16 == 0 for edge in config.train.patch_size)


@pytest.mark.slow
def test_the_stage_timer_times_every_stage_of_a_real_trainer(samples, tmp_path):
    dataset = make_sample_dataset(tmp_path / "data", samples)
    overrides = {
        "data.dataset": str(dataset),
        "data.spacing": [6.0, 6.0, 6.0],
        "network.width": 2,
        "scdl.grid": 2,
        "train.patch_size": [16, 32, 32],
        "train.device": "cpu",
        "train.val_every": 0,
    }
    trainer = Trainer(Config().with_overrides(overrides), tmp_path / "run")
    trainer.setup()
    times = bench_train_pipeline.time_stages(trainer, steps=2, warmup=1)
    assert list(times) == ["sample", "augment", "step", "step on MetaTensors"]
    assert all(len(seconds) == 2 and min(seconds) > 0 for seconds in times.values())
