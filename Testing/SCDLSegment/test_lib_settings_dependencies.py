"""Persistent settings (a dict stands in for QSettings), scdlcore lookup, dependency checks."""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import pytest
from scdlsegment_testing import MODULE_DIR, REPO_ROOT

from SCDLSegmentLib.dependencies import (
    TORCH_REQUIREMENT,
    RequirementStatus,
    check_requirements,
    pinned_installed,
    read_requirements,
    unsatisfied,
)
from SCDLSegmentLib.engine import default_python
from SCDLSegmentLib.settings import Device, Settings, find_scdlcore_root


class DictSettings:
    """QSettings' value/setValue over a dict (QSettings may return strings, as here)."""

    def __init__(self, data: dict | None = None) -> None:
        self.data = dict(data or {})

    def value(self, key, defaultValue=None):
        return self.data.get(key, defaultValue)

    def setValue(self, key, value):
        self.data[key] = value


def test_settings_round_trip():
    store = DictSettings()
    Settings(
        dataset_dir="/data/ds", model_dir="/data/models", model="abdomen@3", device=Device.CPU, finetune_steps=1200
    ).save(store)
    assert store.data["SCDLSegment/device"] == "cpu"
    assert Settings.load(store) == Settings("/data/ds", "/data/models", "abdomen@3", Device.CPU, 1200)


def test_settings_survive_a_restart_through_real_qsettings(tmp_path):
    """Real QSettings (PySide6) in an INI file, as Slicer stores them. Within one process Qt caches the typed
    values, so the "restart" reads a copy of the file that this process never opened: from disk, a bool comes
    back as the string "true" and an int as "1200"."""
    import shutil

    from PySide6.QtCore import QSettings

    def restarted(settings: Settings, name: str) -> QSettings:
        written = QSettings(str(tmp_path / f"{name}-written.ini"), QSettings.IniFormat)
        settings.save(written)
        written.sync()
        return QSettings(str(shutil.copy(written.fileName(), tmp_path / f"{name}-read.ini")), QSettings.IniFormat)

    chosen = Settings(
        dataset_dir="/data/ds",
        model_dir="",
        model="abdomen@3",
        device=Device.GPU,
        finetune_steps=1200,
        collect_unlabeled=True,
    )
    store = restarted(chosen, "on")
    assert (store.value("SCDLSegment/collect_unlabeled"), store.value("SCDLSegment/finetune_steps")) == ("true", "1200")
    assert Settings.load(store) == chosen
    assert Settings.load(restarted(Settings(collect_unlabeled=False), "off")).collect_unlabeled is False


def test_settings_defaults_and_unreadable_values():
    assert Settings.load(DictSettings()) == Settings()
    store = DictSettings(
        {
            "SCDLSegment/device": "tpu",
            "SCDLSegment/finetune_steps": "many",
            "SCDLSegment/model": "starter",
            "SCDLSegment/dataset_dir": "/x",
        }
    )
    settings = Settings.load(store)
    assert settings.device is Device.AUTO and settings.finetune_steps == 0  # 0: the engine's default
    assert settings.model == "starter" and settings.dataset_dir == "/x"
    assert Settings.load(DictSettings({"SCDLSegment/finetune_steps": "50"})).finetune_steps == 50
    assert Settings.load(DictSettings({"SCDLSegment/collect_unlabeled": "maybe"})).collect_unlabeled is False


def test_effective_dataset_dir():
    assert Settings(dataset_dir="/d").effective_dataset_dir() == Path("/d")
    assert Settings().effective_dataset_dir() == Path.home() / "SCDLSegment" / "dataset"


def test_device_labels_and_values():
    assert [device.value for device in Device] == ["auto", "cuda", "cpu"]
    assert Device.GPU.label() == "GPU (CUDA)"


def test_scdlcore_is_found_in_the_source_checkout_and_next_to_the_installed_module(tmp_path):
    assert find_scdlcore_root(MODULE_DIR) == REPO_ROOT / "SCDLCore"
    installed = tmp_path / "qt-scripted-modules"
    (installed / "scdlcore").mkdir(parents=True)
    (installed / "scdlcore" / "__init__.py").write_text("")
    assert find_scdlcore_root(installed) == installed
    assert find_scdlcore_root(tmp_path / "elsewhere") is None


def fake_versions(**installed):
    def version_of(name):
        try:
            return installed[name]
        except KeyError:
            raise importlib.metadata.PackageNotFoundError(name) from None

    return version_of


def test_requirements_are_checked_against_installed_versions():
    statuses = check_requirements(
        ["monai>=1.4", "safetensors>=0.4", "psutil>=5.9"], fake_versions(monai="1.3.2", psutil="7.0.0")
    )
    assert statuses == [
        RequirementStatus("monai>=1.4", "monai", "1.3.2", False),
        RequirementStatus("safetensors>=0.4", "safetensors", None, False),
        RequirementStatus("psutil>=5.9", "psutil", "7.0.0", True),
    ]
    assert unsatisfied(statuses) == ["monai>=1.4", "safetensors>=0.4"]
    assert [status.describe() for status in statuses] == [
        "monai>=1.4: 1.3.2 (too old)",
        "safetensors>=0.4: missing",
        "psutil>=5.9: 7.0.0 (ok)",
    ]


def test_torch_requirement_accepts_cuda_builds():
    (status,) = check_requirements([TORCH_REQUIREMENT], fake_versions(torch="2.6.0+cu124"))
    assert status.satisfied


def test_packages_that_ship_with_slicer_are_never_requirements():
    with pytest.raises(ValueError, match="SimpleITK comes with Slicer"):
        check_requirements(["SimpleITK>=2.3"], fake_versions())


def test_bad_requirement_is_named():
    with pytest.raises(ValueError, match="'>=1.0' is not a requirement"):
        check_requirements([">=1.0"], fake_versions())


def test_module_requirements_match_the_engine_dependencies(tmp_path):
    """Resources/requirements.txt = scdlcore's dependencies minus torch (PyTorch extension) and
    the packages Slicer ships, so the panel installs exactly what the engine imports."""
    pyproject = (REPO_ROOT / "SCDLCore" / "pyproject.toml").read_text(encoding="utf-8")
    block = re.search(r"^dependencies = \[(.*?)^\]", pyproject, re.S | re.M).group(1)  # (tomllib needs Python 3.11)
    engine = {dep.replace(" ", "") for dep in re.findall(r'"([^"]+)"', block)}
    module = set(read_requirements(MODULE_DIR / "Resources" / "requirements.txt"))
    expected = {
        dep for dep in engine if dep.split(">")[0].split("=")[0].split("<")[0] not in ("torch", "numpy", "SimpleITK")
    }
    assert module == expected
    torch_pin = next(dep for dep in engine if dep.startswith("torch"))
    assert torch_pin == TORCH_REQUIREMENT


def test_read_requirements_skips_comments_and_options(tmp_path):
    path = tmp_path / "requirements.txt"
    path.write_text("# engine packages\n\nmonai>=1.4  # transforms\n--extra-index-url x\npsutil\n")
    assert read_requirements(path) == ["monai>=1.4", "psutil"]


def test_pins_keep_the_installed_versions_and_skip_what_is_missing():
    assert pinned_installed(["numpy", "no-such-package"]) == [f"numpy=={importlib.metadata.version('numpy')}"]


def test_without_pythonslicer_the_engine_does_not_fall_back_to_slicers_own_executable(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # in Slicer, sys.executable is Slicer itself
    with pytest.raises(RuntimeError, match="PythonSlicer, Slicer's Python launcher, was not found"):
        default_python()
    launcher = tmp_path / "PythonSlicer"
    launcher.write_text("#!/bin/sh\n")
    launcher.chmod(0o755)
    assert default_python() == str(launcher)
