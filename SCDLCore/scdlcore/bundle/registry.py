"""The registry of installed model versions.

The registry (:class:`ModelRegistry`) keeps imported bundles in a user folder
(``$SCDL_MODELS_DIR``, else e.g. ``~/.local/share/scdl/models``) as ``<name>/<version>/`` plus
an index ``registry.json`` that is the source of truth: a bundle exists once the index lists it,
so a crash mid-import leaves only an unlisted folder. Models are addressed as ``name`` (latest
version) or ``name@N``. A bundle shipped inside the package (:data:`STARTER_MODEL_DIR`) is the
read-only model ``starter``.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from scdlcore._atomic import remove_stale_temporaries, temporary_sibling
from scdlcore._checksum import sha256_file
from scdlcore._filelock import file_lock
from scdlcore.bundle.format import (
    ARCHIVE_SUFFIX,
    META_FILE,
    NAME_PATTERN,
    WEIGHTS_FILE,
    BundleError,
    ModelBundle,
    load_bundle,
    read_meta,
    write_archive,
    write_json,
)
from scdlcore.userdirs import user_data_dir

__all__ = [
    "MODELS_DIR_ENV",
    "STARTER_MODEL_DIR",
    "STARTER_MODEL_NAME",
    "ModelRegistry",
    "RegistryEntry",
    "default_models_dir",
]


MODELS_DIR_ENV = "SCDL_MODELS_DIR"


STARTER_MODEL_NAME = "starter"


#: The one place the bundled default model is looked up (package data; may be absent).
STARTER_MODEL_DIR = Path(__file__).resolve().parents[1] / "resources" / "starter_model"


_REF_PATTERN = re.compile(r"(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)(?:@(?P<version>[0-9]+))?")


_INDEX_FILE = "registry.json"


_LOCK_FILE = ".lock"


_LOCK_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class RegistryEntry:
    """One installed model version, as ``scdl models list`` shows it."""

    name: str
    version: int
    path: Path
    created: str
    base: str
    num_classes: int
    description: str
    sha256: str
    builtin: bool = False
    meta: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)  # its model.json

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def to_dict(self) -> dict[str, Any]:
        """model.json's fields (labels, spacing, lineage, metrics...) plus ``ref``, ``path`` and ``builtin``."""
        entry = {key: value for key, value in asdict(self).items() if key != "meta"}
        return {**self.meta, **entry, "path": str(self.path), "ref": self.ref}


class ModelRegistry:
    """Installed model versions in a user folder.

    Args:
        root: the registry folder; None = :func:`default_models_dir` (``$SCDL_MODELS_DIR`` or the
            platform's user data folder).
    """

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root).expanduser() if root is not None else default_models_dir()

    def list(self) -> list[RegistryEntry]:
        """All versions, sorted by name then version; the built-in starter model included."""
        return sorted(self._entries(), key=lambda entry: (entry.name, entry.version))

    def info(self, name: str) -> ModelBundle:
        """Load (and verify) an installed model by ``name`` or ``name@N``."""
        return load_bundle(self._find(name).path)

    def resolve(self, name_or_path: str | Path) -> ModelBundle:
        """An installed model (``name``, ``name@N``) or a bundle folder/archive path.

        Raises:
            BundleError: neither an installed model nor an existing path.
        """
        text = str(name_or_path)
        if _REF_PATTERN.fullmatch(text) and self._matches(text):
            return self.info(text)
        if Path(text).expanduser().exists():
            return load_bundle(text)
        shipped = "" if text != STARTER_MODEL_NAME else " This installation ships no starter model."
        raise BundleError(
            f"No model {text!r}: it is neither an installed model (in {self.root}) nor an existing file or folder."
            f"{shipped} Installed: {self._known()}. Give a model name or bundle path, train one with `scdl train`, "
            "or install one with `scdl models import PATH`."
        )

    def import_(self, path: str | Path) -> ModelBundle:
        """Copy a bundle (folder or archive) into the registry; returns the installed bundle.

        The bundle keeps its version unless its name is already installed, then it becomes the
        next version. The copy is verified against the bundle's checksum before it is listed.

        Raises:
            BundleError: the bundle does not load or verify (nothing is stored then).
        """
        bundle = load_bundle(path)
        with self._lock():
            entries = [entry for entry in self._entries() if entry.name == bundle.name]
            version = max((entry.version for entry in entries), default=bundle.version - 1) + 1
            folder = self._store(bundle, version)
            index = self._read_index()
            index["models"].append(
                {
                    "name": bundle.name,
                    "version": version,
                    "folder": folder.relative_to(self.root).as_posix(),
                    "sha256": bundle.sha256[WEIGHTS_FILE],
                    "imported": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                }
            )
            self._write_index(index)
        return load_bundle(folder)

    def register(self, bundle_dir: str | Path) -> ModelBundle:
        """Install a freshly written bundle folder (the trainer's last step); same rules as :meth:`import_`."""
        if not Path(bundle_dir).is_dir():
            raise BundleError(f"{bundle_dir} is not a bundle folder; use import_ for {ARCHIVE_SUFFIX} archives.")
        return self.import_(bundle_dir)

    def export(self, name: str, dest: str | Path) -> Path:
        """Write an installed model (or a bundle path) as one ``.scdlmodel`` archive.

        Args:
            name: ``name``, ``name@N`` or a bundle path.
            dest: the archive path, or an existing folder to write ``<name>-v<N>.scdlmodel`` into.

        Returns:
            The archive's path.
        """
        bundle = self.resolve(name)
        dest = Path(dest).expanduser()
        if dest.is_dir():
            dest = dest / f"{bundle.name}-v{bundle.version}{ARCHIVE_SUFFIX}"
        elif dest.suffix != ARCHIVE_SUFFIX:
            dest = dest.with_name(dest.name + ARCHIVE_SUFFIX)
        write_archive(bundle, bundle._weights, dest)  # type: ignore[arg-type]
        return dest

    def remove(self, name: str) -> list[str]:
        """Uninstall ``name@N``, or every version of ``name``; returns the removed ``name@N``.

        Raises:
            BundleError: unknown model, or the read-only built-in starter model.
        """
        with self._lock():
            targets = self._select(name)
            if any(entry.builtin for entry in targets):
                raise BundleError(
                    f"{targets[0].ref} is the built-in starter model shipped with SCDLCore ({STARTER_MODEL_DIR}); "
                    "it cannot be removed."
                )
            refs = {entry.ref for entry in targets}
            index = self._read_index()
            index["models"] = [item for item in index["models"] if f"{item['name']}@{item['version']}" not in refs]
            self._write_index(index)  # the index first: a crash below leaves only unlisted folders
            for entry in targets:
                shutil.rmtree(entry.path, ignore_errors=True)
        return sorted(refs)

    def _entries(self) -> list[RegistryEntry]:
        entries = []
        starter = self._starter()
        if starter is not None:
            entries.append(starter)
        for item in self._read_index()["models"]:
            folder = self.root / item["folder"]
            try:
                meta = read_meta(folder / META_FILE)
            except BundleError as err:  # still listed, so that it can be removed
                meta = {"name": item["name"], "description": f"DAMAGED: {err}"}
            entries.append(_entry(meta, folder, builtin=False, version=int(item["version"])))
        return entries

    def _starter(self) -> RegistryEntry | None:
        meta_path = STARTER_MODEL_DIR / META_FILE
        if not meta_path.is_file():
            return None
        return _entry(read_meta(meta_path), STARTER_MODEL_DIR, builtin=True)

    def _matches(self, ref: str) -> bool:
        try:
            self._select(ref)
        except BundleError:
            return False
        return True

    def _select(self, ref: str) -> list[RegistryEntry]:
        """Versions addressed by ``name`` (all) or ``name@N`` (one)."""
        match = _REF_PATTERN.fullmatch(ref)
        entries = self._entries()
        found = [
            entry
            for entry in entries
            if match
            and entry.name == match["name"]
            and (match["version"] is None or entry.version == int(match["version"]))
        ]
        if not found:
            raise BundleError(f"No installed model {ref!r} in {self.root}. Installed: {self._known(entries)}.")
        return found

    def _find(self, ref: str) -> RegistryEntry:
        """The version ``ref`` addresses; a bare name means its latest version."""
        return max(self._select(ref), key=lambda entry: entry.version)

    def _known(self, entries: list[RegistryEntry] | None = None) -> str:
        refs = [entry.ref for entry in (self._entries() if entries is None else entries)]
        return ", ".join(sorted(refs)) or "none"

    def _store(self, bundle: ModelBundle, version: int) -> Path:
        """Copy ``bundle`` as ``<root>/<name>/<version>`` (verified); the caller holds the lock."""
        target = self.root / bundle.name / str(version)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = temporary_sibling(self.root / "incoming")
        try:
            staging.mkdir()
            shutil.copyfile(bundle._weights, staging / WEIGHTS_FILE)  # type: ignore[arg-type]
            expected, copied = bundle.sha256[WEIGHTS_FILE], sha256_file(staging / WEIGHTS_FILE)
            if copied != expected:
                raise BundleError(
                    f"Copying {bundle.path} into {self.root} gave weights with sha256 {copied}, expected {expected}; "
                    "nothing was installed. Check the disk and try again."
                )
            write_json(staging / META_FILE, replace(bundle, version=version).to_dict())
            if target.exists():  # an unlisted leftover of an interrupted import
                shutil.rmtree(target)
            os.replace(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return target

    def _read_index(self) -> dict[str, Any]:
        path = self.root / _INDEX_FILE
        if not path.is_file():
            return {"format": "scdl-registry", "format_version": 1, "models": []}
        try:
            index = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(index.get("models"), list):
                raise ValueError("no 'models' list")
            for item in index["models"]:
                _check_index_entry(item)
        except (ValueError, AttributeError) as err:
            raise BundleError(
                f"Model registry index {path} is damaged ({err}); restore it or move the folder away."
            ) from err
        return index

    def _write_index(self, index: dict[str, Any]) -> None:
        write_json(self.root / _INDEX_FILE, index)

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with file_lock(self.root / _LOCK_FILE, timeout_s=_LOCK_TIMEOUT_S):
            remove_stale_temporaries(self.root)  # what an import killed mid-copy left (a stale "-incoming" folder)
            yield


def _check_index_entry(item: Any) -> None:
    """An index entry names a model version and its folder ``NAME/VERSION`` inside the registry: a folder
    anywhere else (``..``, an absolute path) is refused, since ``remove`` deletes it.

    Raises:
        ValueError: what is wrong with the entry.
    """
    if not isinstance(item, dict):
        raise ValueError(f"an entry is not an object: {str(item)[:100]}")
    name, version = item.get("name"), item.get("version")
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise ValueError(f"an entry has no valid 'name': {str(item)[:100]}")
    if isinstance(version, bool) or not isinstance(version, int):
        raise ValueError(f"model {name!r} has no whole-number 'version'")
    if item.get("folder") != f"{name}/{version}":
        raise ValueError(
            f"{name}@{version} names the folder {item.get('folder')!r}, not {name}/{version} inside the registry"
        )


def default_models_dir() -> Path:
    """``$SCDL_MODELS_DIR``, else ``scdl/models`` in the platform's user data folder."""
    env = os.environ.get(MODELS_DIR_ENV)
    if env:
        return Path(env).expanduser()
    return user_data_dir() / "models"


def _entry(meta: Mapping[str, Any], folder: Path, *, builtin: bool, version: int | None = None) -> RegistryEntry:
    networks = meta.get("networks") or [{}]
    return RegistryEntry(
        name=str(meta.get("name", folder.name)),
        version=int(version if version is not None else meta.get("version", 1)),
        path=folder,
        created=str(meta.get("created", "")),
        base=str(meta.get("base", "")),
        num_classes=int(networks[0].get("num_classes", 0)),
        description=str(meta.get("description", "")),
        sha256=str((meta.get("sha256") or {}).get(WEIGHTS_FILE, "")),
        builtin=builtin,
        meta=dict(meta),
    )
