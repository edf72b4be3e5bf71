"""``scdl segment``, ``scdl models`` and ``scdl sample-data`` end to end, run in-process via ``scdlcore.cli.main``.

The model is the intensity-threshold stand-in of ``conftest.threshold_bundle`` (not a trained
model): its output must lie on each input's exact grid and follow the input's own intensities.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import slicerio
import torch

from scdlcore.bundle import registry as registry_module
from scdlcore.cli import main
from scdlcore.io.read import read_image, read_label
from scdlcore.io.volume import Volume
from scdlcore.io.write import write_image
from scdlcore.labels import SYNAPSE13

SPLEEN, LIVER = SYNAPSE13["spleen"].value, SYNAPSE13["liver"].value


def _segment(*args: str | Path) -> int:
    return main(["segment", *map(str, args), "--device", "cpu"])


def _assert_one_error_line(err: str, start: str) -> None:
    """A user error is one stderr line, ``scdl segment: error: `` then the message, which starts with ``start``
    (the file and the problem; the advice after it may be reworded)."""
    assert err.startswith(f"scdl segment: error: {start}") and err.endswith("\n") and err.count("\n") == 1, err


def _threshold(hu: np.ndarray) -> np.ndarray:
    return np.where(hu > 175, LIVER, np.where(hu > -25, SPLEEN, 0))


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float(np.count_nonzero(a & b)) / max(1, np.count_nonzero(a) + np.count_nonzero(b))


def _assert_same_geometry(labels: Volume, ct: Volume) -> None:
    assert labels.shape == ct.shape
    assert labels.spacing == ct.spacing
    assert labels.origin == ct.origin
    assert labels.direction == ct.direction


@pytest.mark.parametrize(  # NIfTI, DICOM folder (512 x 512: slow), NRRD
    "sample", ["ct_abdomen", pytest.param("ct_abdomen_dicom", marks=pytest.mark.slow), "ct_chest_nrrd"]
)
def test_segmentation_lies_exactly_on_the_input_grid(
    sample: str, samples, threshold_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    image = samples[sample].image
    assert _segment(image, "-o", tmp_path / "out.seg.nrrd", "--model", threshold_bundle) == 0
    ct = read_image(image)
    labels = read_label(tmp_path / "out.seg.nrrd")
    _assert_same_geometry(labels, ct)
    assert _dice(labels.array == SPLEEN, _threshold(ct.array) == SPLEEN) > 0.75  # the model sees 6 mm voxels
    printed = capsys.readouterr().out
    assert f"Segmented {image} with threshold@1 on cpu in " in printed
    spleen_ml = float(np.count_nonzero(labels.array == SPLEEN)) * np.prod(ct.spacing) / 1000
    row = next(line for line in printed.splitlines() if line.startswith("Spleen "))
    assert float(row.split()[-1]) == pytest.approx(spleen_ml, abs=0.05)


def test_oblique_volume_gives_exact_nrrd_and_nifti_within_float32(threshold_bundle: Path, tmp_path: Path) -> None:
    rotation, _ = np.linalg.qr(np.random.default_rng(3).normal(size=(3, 3)))
    rotation *= np.sign(np.linalg.det(rotation))
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, n) for n in (24, 40, 56)), indexing="ij")
    body = np.where(x**2 + y**2 + z**2 < 0.8, 40.0, -1000.0).astype(np.float32)
    ct = Volume(body, (1.7, 2.3, 4.1), (-123.456789, 45.678912, 301.2345678), tuple(rotation.ravel()))
    write_image(tmp_path / "oblique.nrrd", ct)
    assert _segment(tmp_path / "oblique.nrrd", "-o", tmp_path / "labels.nrrd", "--model", threshold_bundle) == 0
    labels = read_label(tmp_path / "labels.nrrd")
    _assert_same_geometry(labels, read_image(tmp_path / "oblique.nrrd"))  # the input as read: NRRD keeps doubles
    assert _dice(labels.array == SPLEEN, body > 0) > 0.9
    assert _segment(tmp_path / "oblique.nrrd", "-o", tmp_path / "labels.nii.gz", "--model", threshold_bundle) == 0
    nifti = read_label(tmp_path / "labels.nii.gz")
    assert nifti.same_grid(ct)  # NIfTI stores geometry in float32: equal within 1e-4 of a voxel
    np.testing.assert_array_equal(nifti.array, labels.array)


def test_slicer_segmentation_has_the_organ_names_values_and_codes(
    samples, threshold_bundle: Path, tmp_path: Path
) -> None:
    output = tmp_path / "ct.seg.nrrd"
    assert _segment(samples["ct_abdomen"].image, "-o", output, "--model", threshold_bundle) == 0
    segmentation = slicerio.read_segmentation(str(output))
    found = {(s["name"], s["labelValue"], s["terminology"]["type"][1]) for s in segmentation["segments"]}
    assert found == {("Spleen", SPLEEN, "78961009"), ("Liver", LIVER, "10200004")}
    # slicerio gives voxels in (I, J, K) = (x, y, z) order.
    np.testing.assert_array_equal(segmentation["voxels"].transpose(2, 1, 0), read_label(output).array)


def test_organs_option_keeps_only_those_organs(samples, threshold_bundle: Path, tmp_path: Path) -> None:
    image = samples["ct_abdomen"].image
    assert _segment(image, "-o", tmp_path / "all.nrrd", "--model", threshold_bundle) == 0
    assert _segment(image, "-o", tmp_path / "liver.seg.nrrd", "--model", threshold_bundle, "--organs", "liver") == 0
    everything, liver = read_label(tmp_path / "all.nrrd").array, read_label(tmp_path / "liver.seg.nrrd").array
    np.testing.assert_array_equal(liver, np.where(everything == LIVER, LIVER, 0))
    assert [s["name"] for s in slicerio.read_segmentation(str(tmp_path / "liver.seg.nrrd"))["segments"]] == ["Liver"]


def test_events_are_json_lines_ending_with_the_result(
    samples, threshold_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    output, overview = tmp_path / "ct.nii.gz", tmp_path / "ct.png"
    code = _segment(
        samples["ct_chest_nrrd"].image,
        "-o",
        output,
        "--model",
        threshold_bundle,
        "--events",
        "--overview",
        overview,
        "--organs",
        "spleen",
        "liver",
    )
    assert code == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {e["event"] for e in events[:-1]} == {"progress"} and events[-2]["step"] == 100
    result = events[-1]
    assert (result["event"], result["model"], result["output"], result["overview"]) == (
        "result",
        "threshold@1",
        str(output),
        str(overview),
    )
    assert set(result["volumes_ml"]) == {"spleen", "liver"} and result["volumes_ml"]["spleen"] > 0
    assert overview.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_result_without_any_organ_says_so_on_stderr_and_in_the_result(
    samples, threshold_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A body of -300 HU holds nothing the stand-in model calls an organ: exit 0, but not silently."""
    ct = read_image(samples["ct_abdomen"].image)
    empty = tmp_path / "fat.nii.gz"
    write_image(empty, ct.with_array(np.where(ct.array > -500, -300.0, -1000.0).astype(np.float32)))
    assert _segment(empty, "-o", tmp_path / "out.seg.nrrd", "--model", threshold_bundle) == 0
    assert f"Warning: threshold@1 found none of the organs in {empty}. Is it an abdominal CT" in capsys.readouterr().err
    assert _segment(empty, "-o", tmp_path / "out.seg.nrrd", "--model", threshold_bundle, "--events") == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["organs_found"] == 0


def _corrupt_weights(bundle: Path) -> None:
    (bundle / "weights.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")


def _widen_model_json(bundle: Path) -> None:
    meta = json.loads((bundle / "model.json").read_text())
    meta["networks"][0]["width"] = 4
    (bundle / "model.json").write_text(json.dumps(meta))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_corrupt_weights, "weights.safetensors in {bundle} is not a valid safetensors file ("),
        (
            _widen_model_json,
            "weights.safetensors in {bundle} does not match the networks described in model.json: "
            "shape mismatch: net0.encoders.0.0.weight is [2, 1, 3, 3, 3] in the file, [4, 1, 3, 3, 3] by model.json",
        ),
    ],
)
def test_damaged_bundles_are_refused_with_the_file_named(
    damage, message: str, samples, threshold_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    bundle = Path(shutil.copytree(threshold_bundle, tmp_path / "bundle"))
    damage(bundle)
    assert _segment(samples["ct_chest_nrrd"].image, "-o", tmp_path / "out.nrrd", "--model", bundle) == 2
    assert capsys.readouterr().err.startswith("scdl segment: error: " + message.format(bundle=bundle))
    assert not (tmp_path / "out.nrrd").exists()


def test_pickle_and_foreign_folder_are_refused(samples, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    checkpoint = tmp_path / "model.pth"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, checkpoint)
    assert _segment(samples["ct_chest_nrrd"].image, "-o", tmp_path / "out.nrrd", "--model", checkpoint) == 2
    assert capsys.readouterr().err.startswith(
        f"scdl segment: error: {checkpoint} is a pickle file; SCDL loads weights only from safetensors bundles"
    )
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.yaml").write_text("model: unet\n")
    assert _segment(samples["ct_chest_nrrd"].image, "-o", tmp_path / "out.nrrd", "--model", foreign) == 2
    _assert_one_error_line(capsys.readouterr().err, f"{foreign} is not an SCDL model bundle: it has no model.json")


def test_bad_input_and_organ_names_are_user_errors(
    threshold_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert _segment(tmp_path / "missing.nii.gz", "-o", tmp_path / "o.nrrd", "--model", threshold_bundle) == 2
    _assert_one_error_line(capsys.readouterr().err, f"{tmp_path / 'missing.nii.gz'}: no such file or folder")
    assert (
        _segment(
            tmp_path / "missing.nii.gz", "-o", tmp_path / "o.nrrd", "--model", threshold_bundle, "--organs", "livr"
        )
        == 2
    )
    err = capsys.readouterr().err
    assert re.search(r"(?i)unknown organ.*'livr'.*'synapse13'.*did you mean 'liver'", err), err


def test_an_output_that_cannot_be_written_is_refused_before_any_work(
    samples, threshold_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Checked before the model loads: a wrong file type, a file where a folder should be; and a write that
    fails anyway (here: the JSON report under a file) is one line naming the path, not a traceback."""
    ct = samples["ct_chest_nrrd"].image
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert _segment(ct, "-o", tmp_path / "out.txt", "--model", threshold_bundle) == 2
    _assert_one_error_line(capsys.readouterr().err, f"{tmp_path / 'out.txt'}: cannot write this file type")
    assert _segment(ct, "-o", blocker / "out.nii.gz", "--model", threshold_bundle) == 2
    _assert_one_error_line(capsys.readouterr().err, f"Cannot write into {blocker}: {blocker} is a file, not a folder")
    label = samples["ct_abdomen"].label
    assert main(["evaluate", str(label), str(label), "--json", str(blocker / "scores.json")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("scdl evaluate: error: [Errno ") and str(blocker) in err and "Traceback" not in err


@pytest.mark.parametrize("command", ["segment", "finetune", "train"])
def test_with_events_a_failure_is_also_an_error_event_on_stdout(
    threshold_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture, command: str
) -> None:
    """Programs reading --events get the failure as a JSON line; people get the one line on stderr."""
    missing = tmp_path / "missing"
    argv = {
        "segment": ["segment", str(missing), "-o", str(tmp_path / "o.nrrd"), "--model", str(threshold_bundle)],
        "finetune": ["finetune", "--dataset", str(missing), "--model", str(threshold_bundle)],
        "train": ["train", "--config", str(missing), "-o", str(tmp_path / "run")],
    }[command]
    assert main([*argv, "--events"]) == 2
    out, err = capsys.readouterr()
    (event,) = [json.loads(line) for line in out.splitlines()]
    assert (event["event"], event["stage"]) == ("error", command)
    assert str(missing) in event["message"] and err == f"scdl {command}: error: {event['message']}\n"


def test_with_events_an_unexpected_failure_is_an_error_event_and_keeps_its_traceback(
    samples, threshold_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure that is not bad input (here a stand-in for CUDA running out of memory in the forward pass) still
    reaches a program reading --events as an error event; the exception itself propagates with its traceback."""
    from scdlcore.inference.predictor import Predictor

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(Predictor, "_forward", out_of_memory)
    with pytest.raises(RuntimeError, match="CUDA out of memory"):
        _segment(samples["ct_abdomen"].image, "-o", tmp_path / "o.seg.nrrd", "--model", threshold_bundle, "--events")

    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert events[-1] == {**events[-1], "event": "error", "stage": "segment", "error": "RuntimeError"}
    assert "CUDA out of memory" in events[-1]["message"]
    assert not (tmp_path / "o.seg.nrrd").exists()


@pytest.mark.parametrize("device, accepted", [("cuda:1", True), ("cuda", True), ("gpu", False), ("cuda:x", False)])
def test_device_takes_auto_cpu_cuda_and_one_gpu_of_several(
    device: str, accepted: bool, capsys: pytest.CaptureFixture
) -> None:
    from scdlcore.cli import build_parser

    argv = ["finetune", "--dataset", "d", "--model", "m", "--device", device]
    if accepted:
        assert build_parser().parse_args(argv).device == device
    else:
        with pytest.raises(SystemExit) as exit_info:
            build_parser().parse_args(argv)
        assert exit_info.value.code == 2
        assert f"'{device}' is not a device: choose auto, cpu, cuda or cuda:N" in capsys.readouterr().err


@pytest.fixture
def no_shipped_starter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """For the registry commands: hide the starter model shipped with the package."""
    monkeypatch.setattr(registry_module, "STARTER_MODEL_DIR", tmp_path / "no-shipped-starter")


@pytest.mark.usefixtures("no_shipped_starter")
def test_models_commands_round_trip(
    samples, threshold_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    registry = ["--models-dir", str(tmp_path / "models")]
    assert main(["models", "import", str(threshold_bundle), *registry]) == 0
    assert main(["models", "import", str(threshold_bundle), *registry, "--json"]) == 0
    capsys.readouterr()
    assert main(["models", "list", *registry, "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert [entry["ref"] for entry in listing] == ["threshold@1", "threshold@2"]
    assert (
        listing[0]["spacing"] == [6.0, 6.0, 6.0] and listing[0]["labels"]["name"] == "synapse13"
    )  # what the panel shows
    assert main(["models", "info", "threshold@1", *registry]) == 0
    assert "model:         threshold@1" in capsys.readouterr().out

    # segment by installed name
    assert _segment(samples["ct_chest_nrrd"].image, "-o", tmp_path / "o.nrrd", "--model", "threshold", *registry) == 0
    assert "with threshold@2 on cpu" in capsys.readouterr().out

    assert main(["models", "export", "threshold@1", str(tmp_path), *registry]) == 0
    archive = tmp_path / "threshold-v1.scdlmodel"
    assert capsys.readouterr().out == f"Exported threshold@1 to {archive}\n"
    assert main(["models", "remove", "threshold", *registry]) == 0
    assert capsys.readouterr().out == "Removed threshold@1, threshold@2\n"
    assert main(["models", "import", str(archive), *registry]) == 0
    assert capsys.readouterr().out == f"Installed threshold@1 in {tmp_path / 'models' / 'threshold' / '1'}\n"


@pytest.mark.usefixtures("no_shipped_starter")
def test_models_import_with_bad_checksum_stores_nothing(
    threshold_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    bundle = Path(shutil.copytree(threshold_bundle, tmp_path / "bundle"))
    meta = json.loads((bundle / "model.json").read_text())
    meta["sha256"]["weights.safetensors"] = "0" * 64
    (bundle / "model.json").write_text(json.dumps(meta))
    registry = ["--models-dir", str(tmp_path / "models")]
    assert main(["models", "import", str(bundle), *registry]) == 2
    assert "does not match the sha256 recorded in model.json (expected 0000" in capsys.readouterr().err
    assert main(["models", "list", *registry, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_sample_data_prints_local_paths(
    samples, sample_cache_dir: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SCDL_CACHE_DIR", str(sample_cache_dir))  # the fixture's cache: nothing is downloaded
    assert main(["sample-data", "ct_abdomen"]) == 0
    assert capsys.readouterr().out.splitlines() == [str(samples["ct_abdomen"].image), str(samples["ct_abdomen"].label)]
    assert main(["sample-data", "ct_abdomen", "--image-path"]) == 0
    assert capsys.readouterr().out == f"{samples['ct_abdomen'].image}\n"
    assert main(["sample-data", "--list"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in samples)
    assert main(["sample-data", "no_such_sample"]) == 2
    assert "Unknown sample 'no_such_sample'" in capsys.readouterr().err
