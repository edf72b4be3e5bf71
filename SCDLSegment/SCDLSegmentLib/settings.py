"""Panel settings that outlive a Slicer session, the device choice, and where ``scdlcore`` is found."""

from __future__ import annotations

import enum
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Protocol

__all__ = ["SETTINGS_GROUP", "Device", "Settings", "SettingsStore", "find_scdlcore_root"]

#: Prefix of every key the panel writes to the application settings (QSettings).
SETTINGS_GROUP = "SCDLSegment"


class Device(enum.Enum):
    """Where the engine runs; the value is what ``scdl worker --device`` takes."""

    AUTO = "auto"
    GPU = "cuda"
    CPU = "cpu"

    def label(self) -> str:
        """Text shown in the device combo box (Slicer's parameter-node GUI connector calls it)."""
        return _DEVICE_LABELS[self]


_DEVICE_LABELS = {Device.AUTO: "Automatic (GPU if available)", Device.GPU: "GPU (CUDA)", Device.CPU: "CPU"}


class SettingsStore(Protocol):
    """The two methods of QSettings the panel uses (a dict-backed object works in tests)."""

    def value(self, key: str, defaultValue: Any = None) -> Any: ...

    def setValue(self, key: str, value: Any) -> None: ...


@dataclass
class Settings:
    """What the panel remembers between sessions.

    Attributes:
        dataset_dir: folder of the corrections dataset; empty = :meth:`effective_dataset_dir`'s default.
        model_dir: model registry folder handed to the engine as ``SCDL_MODELS_DIR``; empty = the
            engine's own default (the same registry the ``scdl`` command uses).
        model: the model last used (``name`` or ``name@version``); empty = the registry's default.
        device: where the engine runs.
        finetune_steps: training steps of one fine-tuning run; 0 = the engine's default for the device.
        collect_unlabeled: keep each segmented CT in the dataset as an unlabeled case (opt-in: it copies
            the CT's voxels into the dataset folder).
    """

    dataset_dir: str = ""
    model_dir: str = ""
    model: str = ""
    device: Device = Device.AUTO
    finetune_steps: int = 0
    collect_unlabeled: bool = False

    @classmethod
    def load(cls, store: SettingsStore) -> Settings:
        """Read the settings; a missing or unreadable value (e.g. edited by hand) keeps its default."""
        defaults = cls()
        values = {}
        for item in fields(cls):
            default = getattr(defaults, item.name)
            raw = store.value(_key(item.name), None)
            values[item.name] = default if raw is None else _coerce(raw, default)
        return cls(**values)

    def save(self, store: SettingsStore) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            store.setValue(_key(item.name), value.value if isinstance(value, Device) else value)

    def effective_dataset_dir(self) -> Path:
        """The dataset folder: the chosen one, else ``~/SCDLSegment/dataset``."""
        return Path(self.dataset_dir).expanduser() if self.dataset_dir else Path.home() / "SCDLSegment" / "dataset"


def find_scdlcore_root(module_dir: str | Path) -> Path | None:
    """The folder to put on ``sys.path`` so that ``import scdlcore`` finds the package shipped with the module.

    Installed extension: the package is copied next to ``SCDLSegment.py`` (see SCDLSegment/CMakeLists.txt).
    Source checkout (module added with "Additional module paths"): it is ``../SCDLCore/scdlcore``.

    Returns:
        The folder holding ``scdlcore/__init__.py``, or None when neither exists (then ``scdlcore``
        must be pip-installed into Slicer's Python).
    """
    module_dir = Path(module_dir)
    for root in (module_dir, module_dir.parent / "SCDLCore"):
        if (root / "scdlcore" / "__init__.py").is_file():
            return root
    return None


def _key(name: str) -> str:
    return f"{SETTINGS_GROUP}/{name}"


def _coerce(raw: Any, default: Any) -> Any:
    """Convert a stored value (QSettings may hand back strings) to the default's type."""
    try:
        if isinstance(default, Device):
            return Device(str(raw))
        if isinstance(default, bool):  # before int: bool is an int; an INI file hands back "true"/"false"
            return _BOOLEANS[str(raw).strip().lower()]
        if isinstance(default, int):
            return int(raw)
        return str(raw)
    except (TypeError, ValueError, KeyError):
        return default


_BOOLEANS = {"true": True, "1": True, "false": False, "0": False}
