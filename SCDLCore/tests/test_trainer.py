"""End-to-end training on real CT (SCDLCore/docs/DATA.md): loss falls, resume is exact, DDP, signals, errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from scdlcore.dataset.manifest import DatasetError
from scdlcore.io.read import read_label
from scdlcore.io.volume import ImageError, Volume
from scdlcore.io.write import write_label
from scdlcore.nets import VNet
from scdlcore.sample_data import make_sample_dataset
from scdlcore.training.checkpoints import checkpoint_path, load_checkpoint_weights
from scdlcore.training.config import Config
from scdlcore.training.trainer import Trainer

PACKAGE_ROOT = Path(__file__).resolve().parents[1]

# Every test trains or preprocesses the real CTs of the module's dataset (several seconds before the first step).
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dataset_dir(samples, tmp_path_factory) -> Path:
    """Labeled: ct_abdomen (NIfTI) and ct_abdomen_dicom (DICOM); unlabeled: ct_chest_cta."""
    return make_sample_dataset(tmp_path_factory.mktemp("data") / "samples", samples)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def tiny_config(dataset_dir: Path, cache_dir: Path, **overrides) -> Config:
    """Width-4 CPS + GA + SCDL on 32^3 patches at 3 mm: seconds per dozen steps on a CPU."""
    base = {
        "data.dataset": str(dataset_dir),
        "data.spacing": [3.0, 3.0, 3.0],
        "data.cache_dir": str(cache_dir),
        "data.val_cases": ["ct_abdomen_dicom"],
        "network.width": 4,
        "scdl.grid": 4,
        "train.patch_size": [32, 32, 32],
        "train.steps": 30,
        "train.val_every": 0,
        "train.checkpoint_every": 1000,
        "train.device": "cpu",
    }
    return Config().with_overrides({**base, **overrides})


def labeled_cross_entropy(trainer: Trainer, steps: int = 4) -> float:
    """Mean voxel cross-entropy of network A on the unaugmented labeled patches of the first ``steps`` batches.

    Plain CE over every voxel, not the GA losses: those weight the hardest voxels of the rarest classes and
    barely move in a few dozen steps, while CE shows whether the network learns the anatomy at all.
    """
    values = []
    for step in range(steps):
        arrays = trainer.sampler.batch(step)
        images = torch.from_numpy(arrays["image"][: trainer.config.train.labeled_batch])
        with torch.no_grad():
            logits = trainer.base.networks[0](images)[0]
        values.append(float(F.cross_entropy(logits, torch.from_numpy(arrays["labels"]))))
    return float(np.mean(values))


def test_cps_ga_scdl_training_lowers_the_supervised_loss_on_real_ct(dataset_dir, cache_dir, tmp_path):
    config = tiny_config(dataset_dir, cache_dir, **{"train.val_every": 30, "augment.enabled": False})
    untrained = Trainer(config, tmp_path / "untrained")
    untrained.setup()
    before = labeled_cross_entropy(untrained)

    trainer = Trainer(config, tmp_path / "run")
    result = trainer.run()
    after = labeled_cross_entropy(trainer)

    assert result.status == "completed" and result.step == 30
    assert after < 0.9 * before, f"labeled cross-entropy {before:.3f} -> {after:.3f}"
    history = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history if h["event"] == "train"] == [10, 20, 30]
    validation = [h for h in history if h["event"] == "validation"]
    assert len(validation) == 1 and set(validation[0]["dice"]) <= set(trainer.table.names)
    assert (tmp_path / "run" / "curves.png").stat().st_size > 10_000
    assert (tmp_path / "run" / "model" / "model.json").is_file()


def test_resumed_run_matches_the_uninterrupted_run(dataset_dir, cache_dir, tmp_path):
    config = tiny_config(dataset_dir, cache_dir, **{"train.steps": 6, "network.width": 2})
    straight = Trainer(config, tmp_path / "straight")
    assert straight.run().step == 6

    class StopAtThree(Trainer):
        def after_step(self, losses, progress):
            super().after_step(losses, progress)
            if self.step == 3:
                self.cancel.set()

    interrupted = StopAtThree(config, tmp_path / "resumed").run()
    assert (interrupted.status, interrupted.step) == ("cancelled", 3)
    resumed = Trainer(config, tmp_path / "resumed", resume=True)
    resumed.setup()
    assert resumed.step == 3
    assert resumed.optimizer.state_dict()["state"], "optimizer momentum was not restored"
    assert resumed.scheduler.last_epoch == 3
    assert resumed.run().step == 6

    expected = load_checkpoint_weights(tmp_path / "straight" / "checkpoints" / "last.safetensors")
    actual = load_checkpoint_weights(tmp_path / "resumed" / "checkpoints" / "last.safetensors")
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-4, atol=1e-5, msg=key)


def test_resuming_with_another_length_is_refused_before_anything_changes(dataset_dir, cache_dir, tmp_path):
    config = tiny_config(dataset_dir, cache_dir, **{"train.steps": 2, "network.width": 2})
    Trainer(config, tmp_path / "run").run()
    before = (tmp_path / "run" / "checkpoints" / "last.safetensors").read_bytes()
    longer = config.with_overrides({"train.steps": 5})
    with pytest.raises(
        ValueError,
        match=r"the run was started for 2 steps, this one asks for 5; resuming would "
        r"silently rescale its learning-rate schedule",
    ):
        Trainer(longer, tmp_path / "run", resume=True).setup()
    assert (tmp_path / "run" / "checkpoints" / "last.safetensors").read_bytes() == before


def test_a_run_killed_between_its_best_and_its_last_checkpoint_is_kept_and_resumes_from_the_best(
    dataset_dir, cache_dir, tmp_path
):
    """Validation writes `best` before the first regular checkpoint: such a folder holds weights worth keeping."""
    config = tiny_config(dataset_dir, cache_dir, **{"train.steps": 4, "network.width": 2, "train.val_every": 2})
    assert Trainer(config, tmp_path / "run").run().step == 4
    checkpoint_path(tmp_path / "run").unlink()  # as if killed after a validation, before `last`
    with pytest.raises(ValueError, match="holds a training run already: continue it with --resume"):
        Trainer(config, tmp_path / "run").setup()
    assert (tmp_path / "run" / "checkpoints" / "best.safetensors").is_file(), "nothing stored was deleted"
    resumed = Trainer(config, tmp_path / "run", resume=True)
    resumed.setup()
    assert resumed.step == resumed.best_step > 0  # where the best was written


def test_weights_of_one_network_start_both_networks_of_a_cps_pair(dataset_dir, cache_dir, tmp_path):
    """Fine-tuning a bundle that ships one network of its CPS pair: the partner is a copy, not a random network."""
    config = tiny_config(dataset_dir, cache_dir, **{"network.width": 2})
    torch.manual_seed(7)
    shipped = VNet(num_classes=14, width=2)
    trainer = Trainer(
        config, tmp_path / "run", init_weights={f"networks.0.{k}": v for k, v in shipped.state_dict().items()}
    )
    trainer.setup()
    assert len(trainer.base.networks) == 2
    for index, network in enumerate(trainer.base.networks):
        for key, value in shipped.state_dict().items():
            torch.testing.assert_close(network.state_dict()[key], value, msg=f"network {index}: {key}")


def test_two_process_gloo_ddp_run_completes(dataset_dir, cache_dir, tmp_path):
    config_file = tmp_path / "config.json"
    config = tiny_config(dataset_dir, cache_dir, **{"train.steps": 2, "network.width": 2})
    config_file.write_text(json.dumps(config.to_dict()))
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(_free_port()),
        "-m",
        "scdlcore",
        "train",
        "--config",
        str(config_file),
        "--output",
        str(tmp_path / "ddp"),
        "--events",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=_env())
    assert done.returncode == 0, done.stderr[-3000:]
    events = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [e["step"] for e in events if e["event"] == "progress"] == [1, 2], "only rank 0 may report"
    assert events[-1]["event"] == "result" and events[-1]["status"] == "completed"
    assert (tmp_path / "ddp" / "checkpoints" / "last.safetensors").is_file()


def test_sigterm_stops_cleanly_with_a_checkpoint(dataset_dir, cache_dir, tmp_path):
    config_file = tmp_path / "config.json"
    config = tiny_config(dataset_dir, cache_dir, **{"train.steps": 10_000, "network.width": 2})
    config_file.write_text(json.dumps(config.to_dict()))
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "scdlcore",
            "train",
            "--config",
            str(config_file),
            "--output",
            str(tmp_path / "run"),
            "--events",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    first = json.loads(process.stdout.readline())  # blocks until the first step is done
    assert first["event"] == "progress"
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-2000:]
    last = json.loads(stdout.splitlines()[-1])
    assert last["event"] == "cancelled"
    checkpoint = tmp_path / "run" / "checkpoints" / "last.safetensors"
    from safetensors import safe_open

    with safe_open(str(checkpoint), framework="pt") as handle:
        assert json.loads(handle.metadata()["scdl"])["step"] == last["step"] >= 1


def test_dataset_without_a_labeled_case_is_refused(dataset_dir, cache_dir, tmp_path):
    manifest = json.loads((dataset_dir / "dataset.json").read_text())
    only_unlabeled = tmp_path / "unlabeled"
    only_unlabeled.mkdir()
    case = next(c for c in manifest["cases"] if c.get("label") is None)
    (only_unlabeled / "images").mkdir()
    (only_unlabeled / case["image"]).write_bytes((dataset_dir / case["image"]).read_bytes())
    manifest["cases"] = [case]
    (only_unlabeled / "dataset.json").write_text(json.dumps(manifest))
    with pytest.raises(DatasetError, match=r"has no labeled case .*SCDL needs at least one labeled case"):
        Trainer(tiny_config(only_unlabeled, cache_dir), tmp_path / "run").run()


def test_label_on_another_grid_than_its_image_is_refused(dataset_dir, cache_dir, tmp_path):
    manifest = json.loads((dataset_dir / "dataset.json").read_text())
    case = next(c for c in manifest["cases"] if c["id"] == "ct_abdomen")
    label = read_label(dataset_dir / case["label"])
    shifted = Volume(label.array, label.spacing, tuple(np.add(label.origin, (5.0, 0, 0))), label.direction)
    broken = tmp_path / "broken"
    (broken / "images").mkdir(parents=True)
    (broken / "labels").mkdir()
    (broken / case["image"]).write_bytes((dataset_dir / case["image"]).read_bytes())
    write_label(broken / case["label"], shifted)
    (broken / "dataset.json").write_text(json.dumps({**manifest, "cases": [case]}))
    with pytest.raises(ImageError, match="origin"):
        Trainer(tiny_config(broken, cache_dir, **{"data.val_cases": []}), tmp_path / "run").run()


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PACKAGE_ROOT), env.get("PYTHONPATH")]))
    return env


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
