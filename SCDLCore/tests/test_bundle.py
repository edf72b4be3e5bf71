"""Model bundles (save/load, refusal of bad files) and the model registry.

The networks here are tiny random VNets (width 2): test fixtures, not models.
"""

from __future__ import annotations

import json
import re
import threading
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from scdlcore.bundle import registry as registry_module
from scdlcore.bundle.format import BundleError, copy_bundle, load_bundle, save_bundle
from scdlcore.bundle.registry import ModelRegistry, default_models_dir
from scdlcore.labels import SYNAPSE13
from scdlcore.nets import VNet

META = dict(name="tiny", labels=SYNAPSE13, spacing=(6.0, 6.0, 6.0), hu_window=(-125, 275), patch_size=(32, 32, 32))


@pytest.fixture(autouse=True)
def no_shipped_starter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests are about user-installed models: hide the starter model shipped with the package."""
    monkeypatch.setattr(registry_module, "STARTER_MODEL_DIR", tmp_path / "no-shipped-starter")


@pytest.fixture
def networks() -> list[VNet]:
    torch.manual_seed(0)
    return [VNet(num_classes=14, width=2), VNet(num_classes=14, width=2, norm="batch")]


@pytest.fixture
def bundle_dir(tmp_path: Path, networks: list[VNet]) -> Path:
    return save_bundle(tmp_path / "tiny", networks, base="cps", lineage={"steps": 7}, **META)


def _tamper_weights(folder: Path) -> None:
    """Flip one byte of tensor data (the header stays valid, the checksum does not)."""
    path = folder / "weights.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def _edit_meta(folder: Path, **changes: object) -> None:
    path = folder / "model.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


class _DDPStandIn(nn.Module):
    """Stands in for DistributedDataParallel: the wrapped network is ``.module``."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module


def test_round_trip_restores_weights_metadata_and_eval_mode(bundle_dir: Path, networks: list[VNet]) -> None:
    bundle = load_bundle(bundle_dir)
    assert (bundle.ref, bundle.base, bundle.ensemble, bundle.lineage["steps"]) == ("tiny@1", "cps", "mean", 7)
    assert bundle.spacing == (6.0, 6.0, 6.0) and bundle.patch_size == (32, 32, 32) and bundle.labels == SYNAPSE13
    rebuilt = bundle.build_networks("cpu")
    assert len(rebuilt) == 2 and not any(net.training for net in rebuilt)
    for original, loaded in zip(networks, rebuilt):
        for (key, expected), actual in zip(original.state_dict().items(), loaded.state_dict().values()):
            assert torch.equal(expected, actual), key
    assert len(bundle.build_networks("cpu", count=1)) == 1


@pytest.mark.slow
def test_half_precision_weights_halve_the_file_and_load_as_float32(tmp_path: Path, networks: list[VNet]) -> None:
    full = save_bundle(tmp_path / "full", networks, **META) / "weights.safetensors"
    half = save_bundle(tmp_path / "half", networks, weights_dtype=torch.float16, **META)
    stored = load_file(half / "weights.safetensors")
    assert {t.dtype for t in stored.values()} == {torch.float16, torch.int64}  # num_batches_tracked stays an integer
    assert (half / "weights.safetensors").stat().st_size < 0.6 * full.stat().st_size
    rebuilt = load_bundle(half).build_networks("cpu")
    for original, loaded in zip(networks, rebuilt):
        for key, expected in original.state_dict().items():
            actual = loaded.state_dict()[key]
            assert actual.dtype == expected.dtype, key
            torch.testing.assert_close(actual, expected, atol=1e-3, rtol=1e-3)
    image = torch.randn(1, 1, 32, 32, 32)
    torch.testing.assert_close(rebuilt[0](image)[0], networks[0].eval()(image)[0], atol=2e-2, rtol=2e-2)


def test_weights_dtype_must_be_floating_point(tmp_path: Path, networks: list[VNet]) -> None:
    with pytest.raises(ValueError, match="weights_dtype must be a floating-point dtype"):
        save_bundle(tmp_path / "int", networks, weights_dtype=torch.int8, **META)
    assert not (tmp_path / "int").exists()


def test_copy_bundle_replaces_the_destination_whole_and_refuses_a_damaged_source(
    tmp_path: Path, bundle_dir: Path, networks: list[VNet]
) -> None:
    dest = save_bundle(tmp_path / "dest", networks[:1], **{**META, "name": "old"})
    assert copy_bundle(bundle_dir, dest) == dest
    assert load_bundle(dest).name == "tiny" and len(load_bundle(dest).build_networks("cpu")) == 2
    archive = save_bundle(tmp_path / "tiny.scdlmodel", networks, **{**META, "name": "from-archive"})
    assert load_bundle(copy_bundle(archive, tmp_path / "unpacked")).name == "from-archive"
    _tamper_weights(bundle_dir)
    with pytest.raises(BundleError, match="sha256"):
        copy_bundle(bundle_dir, dest)
    assert load_bundle(dest).name == "tiny", "the earlier copy is untouched"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dest", "tiny", "tiny.scdlmodel", "unpacked"], "no leftovers"


def test_archive_holds_the_same_bundle(tmp_path: Path, networks: list[VNet]) -> None:
    archive = save_bundle(tmp_path / "tiny.scdlmodel", networks, **META)
    assert archive.is_file()
    bundle = load_bundle(archive)
    assert bundle.path == archive
    weights = bundle.build_networks("cpu")[1].state_dict()
    assert all(torch.equal(weights[k], v) for k, v in networks[1].state_dict().items())


@pytest.mark.slow
def test_saving_unwraps_compiled_and_ddp_networks(tmp_path: Path, networks: list[VNet]) -> None:
    wrapped = [torch.compile(networks[0]), _DDPStandIn(networks[1])]
    folder = save_bundle(tmp_path / "wrapped", wrapped, **META)
    keys = load_file(folder / "weights.safetensors").keys()
    assert {key.split(".")[0] for key in keys} == {"net0", "net1"}
    assert not any("_orig_mod" in key or ".module." in key for key in keys)
    load_bundle(folder).build_networks("cpu")


def test_saving_replaces_an_existing_bundle_whole(bundle_dir: Path, networks: list[VNet]) -> None:
    save_bundle(bundle_dir, networks[:1], **{**META, "version": 2})
    bundle = load_bundle(bundle_dir)
    assert bundle.version == 2 and len(bundle.networks) == 1
    assert sorted(p.name for p in bundle_dir.parent.iterdir()) == ["tiny"]  # no staging left behind


def test_corrupt_safetensors_is_refused(bundle_dir: Path) -> None:
    weights = bundle_dir / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    problem = rf"^weights\.safetensors in {re.escape(str(bundle_dir))} is not a valid safetensors file"
    with pytest.raises(BundleError, match=problem):
        load_bundle(bundle_dir)


def test_changed_weights_fail_the_checksum(bundle_dir: Path) -> None:
    _tamper_weights(bundle_dir)
    with pytest.raises(BundleError, match=r"does not match the sha256 recorded in model\.json .*changed or damaged"):
        load_bundle(bundle_dir)


def test_model_json_not_matching_the_weights_is_refused(bundle_dir: Path) -> None:
    meta = json.loads((bundle_dir / "model.json").read_text())
    _edit_meta(bundle_dir, networks=[{**net, "width": 4} for net in meta["networks"]])
    with pytest.raises(
        BundleError, match=r"does not match the networks described in model\.json: shape mismatch: net0\."
    ):
        load_bundle(bundle_dir)
    _edit_meta(bundle_dir, networks=meta["networks"][:1])
    with pytest.raises(BundleError, match=r"unexpected keys: net1\.decoders"):
        load_bundle(bundle_dir)
    _edit_meta(bundle_dir, networks=meta["networks"] * 3)
    with pytest.raises(BundleError, match=r"missing keys: net2\."):
        load_bundle(bundle_dir)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_weights_holding_nan_or_inf_are_refused_on_load_and_import(
    tmp_path: Path, networks: list[VNet], bad: float
) -> None:
    """A diverged model (checksum updated to match) must not load: it would segment nothing, with exit code 0."""
    with torch.no_grad():
        networks[0].head.weight[3, 0] = bad
    bundle_dir = save_bundle(tmp_path / "diverged", networks, **META)
    with pytest.raises(BundleError, match=r"holds NaN or infinite weights \(net0\.head\.weight\): the model diverged"):
        load_bundle(bundle_dir)
    registry = ModelRegistry(tmp_path / "models")
    with pytest.raises(BundleError, match="holds NaN or infinite weights"):
        registry.import_(bundle_dir)
    assert [entry.ref for entry in registry.list()] == []


def test_pickle_checkpoints_are_refused(tmp_path: Path, networks: list[VNet]) -> None:
    checkpoint = tmp_path / "model.pt"
    torch.save(networks[0].state_dict(), checkpoint)
    with pytest.raises(BundleError, match=rf"^{re.escape(str(checkpoint))} is a pickle file"):
        load_bundle(checkpoint)
    with pytest.raises(BundleError, match=r"it has no model\.json .* It holds model\.pt: SCDL loads weights only"):
        load_bundle(tmp_path)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"format": "monai-bundle"},
            r"is not an SCDL model description \(format 'monai-bundle', expected 'scdl-bundle'\)",
        ),
        ({"format_version": 2}, r"has format_version 2; this SCDLCore reads format_version 1"),
        ({"ensemble": "vote"}, r"ensemble must be one of mean, first, got 'vote'"),
        ({"name": "a@b"}, r"name 'a@b' must be letters"),
    ],
)
def test_bad_model_json_is_refused_with_its_file(bundle_dir: Path, changes: dict, message: str) -> None:
    _edit_meta(bundle_dir, **changes)
    with pytest.raises(BundleError, match=rf"^model\.json in {re.escape(str(bundle_dir))}.*{message}"):
        load_bundle(bundle_dir)


def test_foreign_folder_and_file_are_refused(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    problem = rf"^{re.escape(str(tmp_path))} is not an SCDL model bundle: it has no model\.json"
    with pytest.raises(BundleError, match=problem):
        load_bundle(tmp_path)
    with pytest.raises(
        BundleError, match=r"notes\.txt is not an SCDL model bundle: expected a folder or a \.scdlmodel"
    ):
        load_bundle(tmp_path / "notes.txt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_bundle(tmp_path / "missing")


def test_registry_import_list_resolve_export_remove(tmp_path: Path, bundle_dir: Path) -> None:
    registry = ModelRegistry(tmp_path / "registry")
    assert registry.list() == []
    first = registry.import_(bundle_dir)
    archive = save_bundle(tmp_path / "again.scdlmodel", first.build_networks("cpu"), **META)
    second = registry.import_(archive)
    assert (first.ref, second.ref) == ("tiny@1", "tiny@2")
    assert [entry.ref for entry in registry.list()] == ["tiny@1", "tiny@2"]
    assert registry.resolve("tiny").ref == "tiny@2" and registry.resolve("tiny@1").ref == "tiny@1"
    assert registry.resolve(bundle_dir).path == bundle_dir

    exported = registry.export("tiny@1", tmp_path)
    assert exported == tmp_path / "tiny-v1.scdlmodel"
    assert load_bundle(exported).sha256 == first.sha256

    assert registry.remove("tiny@1") == ["tiny@1"]
    assert [entry.ref for entry in registry.list()] == ["tiny@2"]
    assert not (tmp_path / "registry" / "tiny" / "1").exists()
    assert registry.remove("tiny") == ["tiny@2"]
    assert registry.list() == [] and not (tmp_path / "registry" / "tiny" / "2").exists()
    with pytest.raises(BundleError, match=r"No installed model 'tiny' in .*Installed: none"):
        registry.remove("tiny")


@pytest.mark.parametrize(
    "entry",
    [
        {"name": "evil", "version": 1, "folder": "../victim"},  # remove would delete a folder outside the registry
        {"name": "evil", "version": 1, "folder": "/tmp/victim"},
        {"name": "evil", "version": 1},
        {"name": "ev/il", "version": 1, "folder": "ev/il/1"},
        {"name": "evil", "version": "1", "folder": "evil/1"},
        7,
    ],
)
def test_a_tampered_registry_index_is_refused_and_nothing_outside_it_is_touched(
    tmp_path: Path, bundle_dir: Path, entry: object
) -> None:
    registry = ModelRegistry(tmp_path / "registry")
    registry.import_(bundle_dir)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("mine")
    index_path = registry.root / "registry.json"
    index = json.loads(index_path.read_text())
    index["models"].append(entry)
    index_path.write_text(json.dumps(index))
    for action in (registry.list, lambda: registry.remove("evil"), lambda: registry.resolve("tiny")):
        with pytest.raises(BundleError, match=r"Model registry index .*registry\.json is damaged"):
            action()
    assert (victim / "keep.txt").read_text() == "mine"
    assert (registry.root / "tiny" / "1" / "weights.safetensors").is_file()


def test_a_damaged_archive_is_named_not_a_traceback(tmp_path: Path, bundle_dir: Path) -> None:
    archive = save_bundle(tmp_path / "tiny.scdlmodel", load_bundle(bundle_dir).build_networks("cpu"), **META)
    with zipfile.ZipFile(archive) as opened:
        member = opened.getinfo("weights.safetensors")
    data = bytearray(archive.read_bytes())
    # Inside the stored weights, past the member's local header (30 bytes + name + extra): the CRC no longer matches.
    start = member.header_offset + 30 + len(member.filename) + len(member.extra) + 200
    data[start : start + 64] = bytes(64)
    archive.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"tiny\.scdlmodel is damaged \(Bad CRC-32"):
        load_bundle(archive)


def test_import_with_checksum_mismatch_stores_nothing(tmp_path: Path, bundle_dir: Path) -> None:
    _tamper_weights(bundle_dir)
    registry = ModelRegistry(tmp_path / "registry")
    with pytest.raises(BundleError, match="does not match the sha256"):
        registry.import_(bundle_dir)
    assert registry.list() == []
    stored = [p for p in (tmp_path / "registry").rglob("*") if p.name != ".lock"] if registry.root.exists() else []
    assert stored == []


@pytest.mark.slow
def test_concurrent_imports_get_distinct_versions(tmp_path: Path, bundle_dir: Path) -> None:
    registry = ModelRegistry(tmp_path / "registry")
    threads = [threading.Thread(target=registry.import_, args=(bundle_dir,)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [entry.ref for entry in registry.list()] == ["tiny@1", "tiny@2", "tiny@3", "tiny@4"]


def test_unknown_model_names_what_is_installed(tmp_path: Path, bundle_dir: Path) -> None:
    registry = ModelRegistry(tmp_path / "registry")
    registry.import_(bundle_dir)
    with pytest.raises(BundleError, match=r"No model 'liver9'.*Installed: tiny@1\."):
        registry.resolve("liver9")
    with pytest.raises(BundleError, match=r"No model 'starter'.*ships no starter model"):
        registry.resolve("starter")


def test_shipped_starter_model_resolves_and_cannot_be_removed(
    tmp_path: Path, networks: list[VNet], monkeypatch: pytest.MonkeyPatch
) -> None:
    starter = save_bundle(tmp_path / "starter_model", networks[:1], **{**META, "name": "starter"})
    monkeypatch.setattr(registry_module, "STARTER_MODEL_DIR", starter)
    registry = ModelRegistry(tmp_path / "registry")
    assert registry.resolve("starter").path == starter
    assert [(entry.ref, entry.builtin) for entry in registry.list()] == [("starter@1", True)]
    with pytest.raises(BundleError, match="built-in starter model .* cannot be removed"):
        registry.remove("starter")
    # A fine-tuned starter installed by the user becomes the next version, and the latest.
    assert registry.import_(starter).ref == "starter@2"
    assert registry.resolve("starter").ref == "starter@2"


def test_models_dir_comes_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCDL_MODELS_DIR", str(tmp_path / "models"))
    assert default_models_dir() == tmp_path / "models"
    assert ModelRegistry().root == tmp_path / "models"
    monkeypatch.delenv("SCDL_MODELS_DIR")
    assert default_models_dir().parts[-2:] == ("scdl", "models")
