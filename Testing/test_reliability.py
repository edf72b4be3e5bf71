"""The reliability table (Testing/reliability.md), run row by row, plus the clean-up of what a killed writer leaves.

Each row of the table names its input, the command (the ``scdl`` CLI in-process, or one worker request to an
in-process :class:`scdlcore.worker.Worker`), the exit code or event, a part of the message and the folders that
must not change. This module prepares each row's input (a function named like the row) and checks the rest.
Real files throughout; the model is the intensity-threshold stand-in (``conftest.threshold_bundle``), not a
trained model, and a full disk is simulated by making the one write that would hit it raise ENOSPC.
"""

from __future__ import annotations

import errno
import hashlib
import inspect
import json
import os
import queue
import re
import shlex
import shutil
import subprocess
import sys
import threading
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scdl_test_support import split_dicom_series, write_raw_nrrd

from scdlcore.bundle.format import save_bundle
from scdlcore.bundle.registry import ModelRegistry
from scdlcore.cli import main
from scdlcore.dataset.store import DatasetStore
from scdlcore.labels import SYNAPSE13, Label, LabelTable
from scdlcore.nets import VNet
from scdlcore.worker import Worker

TABLE = Path(__file__).with_name("reliability.md")
WORKER_PREFIX = "worker: "


@dataclass(frozen=True)
class Row:
    name: str
    command: str  # with placeholders, as the table writes it
    expected: str  # an exit code, or the worker event
    message: str
    unchanged: tuple[str, ...]


def _rows() -> list[Row]:
    rows = []
    for line in TABLE.read_text(encoding="utf-8").splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split(" | ")]
        if len(cells) != 6 or cells[0] in ("row", "---") or set(cells[0]) <= {"-", "|"}:
            continue
        name, _, command, expected, message, unchanged = cells
        rows.append(
            Row(
                name,
                command.strip("`"),
                expected,
                message,
                tuple(part.strip() for part in unchanged.split(",") if part.strip()),
            )
        )
    return rows


ROWS = _rows()


class Env:
    """The folders of one row: a registry with the stand-in model, a dataset, an output folder, the user's folder."""

    def __init__(self, root: Path, samples, threshold_bundle: Path) -> None:
        self.root, self.samples = root, samples
        self.paths = {name: root / name for name in ("models", "store", "out", "folder", "input")}
        ModelRegistry(self.paths["models"]).import_(threshold_bundle)
        store = DatasetStore.init(self.paths["store"])
        abdomen = samples["ct_abdomen"]
        store.add(abdomen.image, abdomen.label, case_id="abdomen", reviewed=["liver", "spleen"], source="test")
        self.paths["out"].mkdir()
        self.paths["folder"].mkdir()
        (self.paths["folder"] / "notes.txt").write_text("the user's own file")

    def fill(self, text: str) -> str:
        return re.sub(r"\{(\w+)\}", lambda match: str(self.paths[match[1]]), text)


# --- the inputs, one function per row ---------------------------------------------------------------------------
def _write_ct(path: Path, array: np.ndarray, spacing: float = 3.0) -> Path:
    image = sitk.GetImageFromArray(array.astype(np.float32))
    image.SetSpacing((spacing,) * 3)
    sitk.WriteImage(image, str(path))
    return path


def _not_ct(env: Env) -> Path:
    array = np.zeros((40, 40, 40), dtype=np.float32)
    array[10:30, 10:30, 10:30] = 4000.0  # MR-like: positive intensities, no air
    return _write_ct(env.root / "mr.nii.gz", array)


def _bundle(env: Env, name: str, table: LabelTable = SYNAPSE13) -> Path:
    torch.manual_seed(0)
    return save_bundle(
        env.root / name,
        [VNet(num_classes=table.num_classes, width=2)],
        name=name,
        labels=table,
        spacing=(6.0, 6.0, 6.0),
        hu_window=(-125, 275),
        patch_size=(32, 32, 32),
    )


def _edit_model_json(bundle: Path, edit: Callable[[dict], None]) -> None:
    meta = json.loads((bundle / "model.json").read_text())
    edit(meta)
    (bundle / "model.json").write_text(json.dumps(meta))


def _nan_bundle(env: Env) -> Path:
    from safetensors.torch import load_file, save_file

    bundle = _bundle(env, "diverged")
    weights = bundle / "weights.safetensors"
    state = load_file(str(weights))
    key = next(key for key, tensor in state.items() if tensor.is_floating_point())
    state[key] = torch.full_like(state[key], float("nan"))
    save_file(state, str(weights), metadata={"format": "pt"})
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    _edit_model_json(bundle, lambda meta: meta["sha256"].update({"weights.safetensors": digest}))
    return bundle


def _table(name: str, names: list[str]) -> LabelTable:
    return LabelTable(
        name,
        tuple(Label(i, organ, organ.title(), (200, 100, 100), "0", organ) for i, organ in enumerate(names, start=1)),
    )


def _manifest(env: Env, edit: Callable[[dict], None]) -> Path:
    folder = env.paths["input"]
    shutil.copytree(env.paths["store"], folder)
    manifest = json.loads((folder / "dataset.json").read_text())
    edit(manifest["cases"][0])
    (folder / "dataset.json").write_text(json.dumps(manifest))
    return folder


def _fail_write(monkeypatch, cls: type, method: str, when: Callable[..., bool]) -> None:
    """Make ``cls.method`` raise ENOSPC, as a full disk does, for the calls ``when`` picks."""
    original = getattr(cls, method)

    def failing(self, *args, **kwargs):
        if when(self, *args):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, method, failing)


def image_2d(env, monkeypatch):
    return {"input": write_raw_nrrd(env.root / "slice.nrrd", np.zeros((20, 30)))}


def image_4d(env, monkeypatch):
    return {"input": write_raw_nrrd(env.root / "series.nrrd", np.zeros((3, 6, 5, 4)))}


def image_empty(env, monkeypatch):
    (env.root / "empty.nii.gz").touch()
    return {"input": env.root / "empty.nii.gz"}


def image_truncated(env, monkeypatch):
    data = env.samples["ct_abdomen"].image.read_bytes()
    (env.root / "cut.nii.gz").write_bytes(data[: len(data) // 2])
    return {"input": env.root / "cut.nii.gz"}


def image_nan(env, monkeypatch):
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(env.samples["ct_abdomen"].image))).astype(np.float32)
    array[50, 50, 50:60] = np.nan
    return {"input": _write_ct(env.root / "nan.nii.gz", array)}


def image_not_ct(env, monkeypatch):
    return {"input": _not_ct(env)}


def dicom_two_series(env, monkeypatch):
    split_dicom_series(env.samples["ct_abdomen_dicom"].image, env.root / "dicom", moved=5)
    return {"input": env.root / "dicom"}


add_not_ct = add_not_ct_forced = image_not_ct


def add_label_other_grid(env, monkeypatch):
    return {"input": env.samples["ct_chest_nrrd"].image, "label": env.samples["ct_abdomen"].label}


def add_label_foreign_values(env, monkeypatch):
    label = sitk.ReadImage(str(env.samples["ct_abdomen"].label))
    array = sitk.GetArrayFromImage(label)
    array[0, 0, 0] = 99
    foreign = sitk.GetImageFromArray(array)
    foreign.CopyInformation(label)
    sitk.WriteImage(foreign, str(env.root / "label99.nii.gz"))
    # Another CT than the stored one (one CT is one case): ct_abdomen shifted by one HU.
    ct = sitk.ReadImage(str(env.samples["ct_abdomen"].image)) + 1
    sitk.WriteImage(ct, str(env.root / "ct.nii.gz"))
    return {"input": env.root / "ct.nii.gz", "label": env.root / "label99.nii.gz"}


def add_to_folder_not_a_dataset(env, monkeypatch):
    return {"input": env.samples["ct_chest_nrrd"].image}


add_bad_case_id = add_to_folder_not_a_dataset


def manifest_outside_the_store(env, monkeypatch):
    shutil.copy(env.samples["ct_chest_nrrd"].image, env.root / "outside.nrrd")
    return {"input": _manifest(env, lambda case: case.update(image="../outside.nrrd"))}


def manifest_without_image(env, monkeypatch):
    return {"input": _manifest(env, lambda case: case.pop("image"))}


def manifest_reviewed_a_string(env, monkeypatch):
    return {"input": _manifest(env, lambda case: case.update(reviewed="liver"))}


def add_disk_full(env, monkeypatch):
    _fail_write(monkeypatch, Path, "write_text", lambda path, *_: path.name.endswith("dataset.json"))
    return {"input": env.samples["ct_chest_nrrd"].image}


def import_tampered_weights(env, monkeypatch):
    bundle = _bundle(env, "tampered")
    data = bytearray((bundle / "weights.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (bundle / "weights.safetensors").write_bytes(bytes(data))
    return {"input": bundle}


def import_pickle(env, monkeypatch):
    env.paths["input"].mkdir()
    torch.save(VNet(num_classes=14, width=2).state_dict(), env.paths["input"] / "model.pt")
    return {}


def import_nan_weights(env, monkeypatch):
    return {"input": _nan_bundle(env)}


info_nan_weights = import_nan_weights


def import_builtin_name_other_values(env, monkeypatch):
    """An older bundle (no label-table checksum) whose "synapse13" has liver and spleen swapped."""
    bundle = _bundle(env, "swapped")

    def swap(meta: dict) -> None:
        labels = {label["name"]: label for label in meta["labels"]["labels"]}
        labels["liver"]["value"], labels["spleen"]["value"] = labels["spleen"]["value"], labels["liver"]["value"]
        del meta["sha256"]["labels"]

    _edit_model_json(bundle, swap)
    return {"input": bundle}


def import_edited_label_table(env, monkeypatch):
    bundle = _bundle(env, "edited", _table("liver_spleen", ["liver", "spleen"]))

    def swap(meta: dict) -> None:
        first, second = meta["labels"]["labels"]
        first["value"], second["value"] = second["value"], first["value"]

    _edit_model_json(bundle, swap)
    return {"input": bundle}


def export_disk_full(env, monkeypatch):
    _fail_write(monkeypatch, zipfile.ZipFile, "write", lambda *_: True)
    return {}


def finetune_other_class_count(env, monkeypatch):
    return {"input": _bundle(env, "two", _table("liver_spleen", ["liver", "spleen"]))}


def finetune_same_size_other_organs(env, monkeypatch):
    return {"input": _bundle(env, "other13", _table("custom13", [f"organ{i}" for i in range(1, 14)]))}


def worker_protocol_99(env, monkeypatch):
    return {}


worker_cancel_without_target = worker_protocol_99
worker_add_case_to_users_folder = add_to_folder_not_a_dataset
worker_failed_first_add_leaves_nothing = image_not_ct


# --- running a row ----------------------------------------------------------------------------------------------
def _snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (hidden ones too) with its sha256; the folders themselves as entries."""
    if not folder.exists():
        return {}
    return {
        path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
        for path in sorted(folder.rglob("*"))
    }


def _run_cli(command: str, capsys, caplog) -> tuple[str, str]:
    argv = shlex.split(command)
    assert argv[0] == "scdl", command
    capsys.readouterr()
    code = main(argv[1:])
    captured = capsys.readouterr()
    return str(code), captured.out + captured.err + caplog.text


def _run_worker(request: str, models: Path) -> tuple[str, str]:
    """Send one request to an in-process worker; the answer's event and message (events on stdout as JSON lines)."""
    requests: queue.Queue[str | None] = queue.Queue()
    events: queue.Queue[dict] = queue.Queue()

    def lines() -> Iterator[str]:
        while (line := requests.get()) is not None:
            yield line

    class Events:
        def write(self, text: str) -> None:
            for line in text.splitlines():
                events.put(json.loads(line))

        def flush(self) -> None:
            pass

    worker = Worker("threshold", "cpu", str(models), lines(), Events())  # type: ignore[arg-type]
    thread = threading.Thread(target=worker.serve, daemon=True)
    thread.start()
    assert events.get(timeout=120)["event"] == "ready"
    requests.put(request + "\n")
    request_id = json.loads(request)["id"]
    while (event := events.get(timeout=300))["id"] != request_id or event["event"] not in (
        "result",
        "error",
        "cancelled",
    ):
        pass
    requests.put(json.dumps({"protocol": 1, "id": "bye", "command": "shutdown"}) + "\n")
    requests.put(None)
    thread.join(timeout=60)
    return event["event"], event.get("message", json.dumps(event))


@pytest.mark.parametrize("row", ROWS, ids=[row.name for row in ROWS])
def test_reliability_row(row: Row, samples, threshold_bundle, tmp_path, monkeypatch, capsys, caplog):
    env = Env(tmp_path, samples, threshold_bundle)
    env.paths.update({key: Path(value) for key, value in globals()[row.name](env, monkeypatch).items()})
    before = {name: _snapshot(env.paths[name]) for name in row.unchanged}
    if row.command.startswith(WORKER_PREFIX):
        outcome, message = _run_worker(env.fill(row.command[len(WORKER_PREFIX) :]), env.paths["models"])
    else:
        outcome, message = _run_cli(env.fill(row.command), capsys, caplog)
    monkeypatch.undo()  # the simulated full disk ends with the command
    assert outcome == row.expected, message
    assert env.fill(row.message) in message
    assert "Traceback" not in message
    for name in row.unchanged:
        assert _snapshot(env.paths[name]) == before[name], f"{name} changed"


def test_every_row_has_its_input_and_every_input_its_row():
    inputs = {
        name
        for name, value in globals().items()
        if inspect.isfunction(value) and value.__module__ == __name__ and not name.startswith(("_", "test_"))
    }
    assert {row.name for row in ROWS} == inputs and len(ROWS) >= 25


# --- what a killed writer leaves --------------------------------------------------------------------------------
def _dead_pid() -> int:
    """The id of a process that has ended (the writer a kill -9 stopped)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_an_import_removes_what_a_killed_import_left(threshold_bundle, tmp_path):
    registry = ModelRegistry(tmp_path / "models")
    registry.import_(threshold_bundle)
    stale = tmp_path / "models" / f".scdl-tmp-{_dead_pid()}-0badc0de-incoming"
    shutil.copytree(threshold_bundle, stale)  # a copy stopped half way
    live = tmp_path / "models" / f".scdl-tmp-{os.getpid()}-0123abcd-incoming"
    live.mkdir()  # a live writer's (this process): kept
    registry.import_(threshold_bundle)
    assert not stale.exists() and live.is_dir()
    assert [entry.ref for entry in registry.list() if not entry.builtin] == ["threshold@1", "threshold@2"]


@pytest.mark.slow  # trains
def test_a_run_removes_the_checkpoint_a_killed_run_was_writing(tmp_path, samples):
    """The run folder as a kill -9 mid-checkpoint leaves it: the next run there removes the half-written file."""
    from scdlcore.training.config import Config
    from scdlcore.training.trainer import Trainer

    store = DatasetStore.init(tmp_path / "dataset")
    store.add(samples["ct_abdomen"].image, samples["ct_abdomen"].label, case_id="abdomen", source="test")
    config = Config().with_overrides(
        {
            "data.dataset": str(tmp_path / "dataset"),
            "data.spacing": [6.0, 6.0, 6.0],
            "network.width": 2,
            "ssl.base": "supervised",
            "scdl.enabled": False,
            "train.patch_size": [32, 32, 32],
            "train.labeled_batch": 1,
            "train.unlabeled_batch": 0,
            "train.steps": 2,
            "train.val_every": 0,
            "train.device": "cpu",
        }
    )
    checkpoints = tmp_path / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    stale = checkpoints / f".scdl-tmp-{_dead_pid()}-0badc0de-last.safetensors"
    stale.write_bytes(b"\x00" * 4096)
    assert Trainer(config, tmp_path / "run").run().status == "completed"
    assert not stale.exists()
