"""Model bundles (weights + description) and the registry of installed model versions.

A bundle is a folder, or one ``.scdlmodel`` zip archive of that folder, holding two files:

- ``weights.safetensors``: the state dicts of the bundle's networks, keys prefixed ``net0.``,
  ``net1.``... (CPS bundles hold two networks, Mean Teacher and supervised bundles one).
- ``model.json``: everything needed to rebuild and use the networks::

    {"format": "scdl-bundle", "format_version": 1, "name": "abdomen", "version": 3,
     "created": "2026-11-27T10:00:00+00:00",
     "networks": [{"arch": "vnet", "in_channels": 1, "num_classes": 14, "width": 16, "norm": "batch"}, ...],
     "ensemble": "mean", "labels": {LabelTable.to_dict()}, "spacing": [1.5, 1.5, 2.0],
     "hu_window": [-125, 275], "orientation": "RAS", "patch_size": [96, 96, 96], "base": "cps", "scdl": {...} | null,
     "lineage": {"parent": "starter@1" | null, "data_fingerprint": str | null, "steps": 20000, "trained_on": str},
     "metrics": {...}, "sha256": {"weights.safetensors": "<hex>", "labels": "<hex>"}, "description": "..."}

Weights are only ever read with safetensors (never pickle), and loading checks the checksums (of the
weights and of the label table, which decides what the output values mean) and that every tensor
matches the networks model.json describes, so a damaged or foreign file is refused with a message
naming it. A table named like a built-in one (``synapse13``) must be that table.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import shutil
import tempfile
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from scdlcore._atomic import atomic_write, atomic_write_text, temporary_prefix
from scdlcore._checksum import sha256_file
from scdlcore.choices import BASES, ENSEMBLES
from scdlcore.labels import LabelTable, check_builtin_name
from scdlcore.nets import build_network, network_description
from scdlcore.preprocess import CANONICAL_ORIENTATION, Preprocessing, orientation_directions

__all__ = [
    "ARCHIVE_SUFFIX",
    "BUNDLE_FORMAT",
    "FORMAT_VERSION",
    "BundleError",
    "ModelBundle",
    "update_bundle_metadata",
    "copy_bundle",
    "load_bundle",
    "save_bundle",
]


BUNDLE_FORMAT = "scdl-bundle"


FORMAT_VERSION = 1


META_FILE = "model.json"


WEIGHTS_FILE = "weights.safetensors"


#: The key of ``sha256`` holding the label table's digest (:func:`labels_digest`); older bundles lack it.
LABELS_DIGEST = "labels"


ARCHIVE_SUFFIX = ".scdlmodel"
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


_PICKLE_ADVICE = (
    "SCDL loads weights only from safetensors bundles (a folder or .scdlmodel archive with model.json and "
    "weights.safetensors), because unpickling a file can run arbitrary code. If you trust the checkpoint, load it "
    "yourself and write a bundle with scdlcore.bundle.format.save_bundle."
)


class BundleError(ValueError):
    """A model bundle that cannot be used; the message names the file and the problem."""


@dataclass
class ModelBundle:
    """A loaded (verified) bundle: its model.json fields, and where its weights are.

    Attributes:
        name: model name (letters, digits, ``._-``; no ``@``).
        version: version number (1, 2, ...).
        networks: network descriptions ``{"arch", **kwargs}`` for :func:`scdlcore.nets.build_network`.
        labels: the label table; network class ``c`` is label value ``labels.values[c - 1]``.
        spacing: model voxel size (x, y, z) in mm.
        hu_window: (low, high) in HU, mapped to [0, 1].
        orientation: the axis codes of the canonical orientation its networks were trained in ("RAS"), or
            None for a bundle written before CTs were reoriented (trained on its files' own axis order; such a
            bundle cannot segment: see :attr:`preprocessing`).
        patch_size: sliding-window patch in voxels, array order (D, H, W).
        base: semi-supervised base it was trained with: ``cps`` | ``mean_teacher`` | ``supervised``.
        ensemble: how several networks are combined: ``mean`` of logits | ``first`` network only.
        scdl: the SCDL configuration used in training, or None.
        lineage: ``parent`` (name@version or None), ``data_fingerprint``, ``steps``, ``trained_on``.
        metrics: validation metrics recorded at training time.
        description: one line for people.
        created: ISO 8601 timestamp (UTC).
        sha256: checksum per file, ``{"weights.safetensors": hex}``.
        path: the folder or archive it was loaded from (None before saving).
    """

    name: str
    networks: list[dict[str, Any]]
    labels: LabelTable
    spacing: tuple[float, float, float]
    hu_window: tuple[float, float]
    patch_size: tuple[int, int, int]
    orientation: str | None = CANONICAL_ORIENTATION
    version: int = 1
    base: str = "supervised"
    ensemble: str = "mean"
    scdl: dict[str, Any] | None = None
    lineage: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    created: str = ""
    sha256: dict[str, str] = field(default_factory=dict)
    path: Path | None = None
    _weights: Path | None = field(default=None, repr=False, compare=False)
    _extracted: tempfile.TemporaryDirectory | None = field(default=None, repr=False, compare=False)

    @property
    def ref(self) -> str:
        """``name@version``, the exact address of this bundle."""
        return f"{self.name}@{self.version}"

    @property
    def preprocessing(self) -> Preprocessing:
        """How a CT becomes this bundle's network input.

        Raises:
            BundleError: the bundle records no orientation. Its networks learnt anatomy in the axis order of
                their training files, so on a CT stored in another order they would mirror it silently (the
                spleen found on the liver's side); refusing is safer than a plausible-looking wrong result.
        """
        if self.orientation is None:
            where = self.path or self.ref
            raise BundleError(
                f"Model {self.ref} ({where}) records no input orientation: it was trained on CTs in their files' own "
                "axis order, before SCDLCore put every CT into one anatomical orientation, so on a CT stored in "
                "another axis order it mirrors the anatomy. Use a model trained with this SCDLCore (the bundled "
                "'starter' is one) or retrain it."
            )
        return Preprocessing(self.spacing, self.hu_window, self.orientation)

    @property
    def num_classes(self) -> int:
        """C, background included."""
        return self.labels.num_classes

    def to_dict(self) -> dict[str, Any]:
        """The model.json content."""
        return {
            "format": BUNDLE_FORMAT,
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "version": self.version,
            "created": self.created,
            "networks": [dict(net) for net in self.networks],
            "ensemble": self.ensemble,
            "labels": self.labels.to_dict(),
            "spacing": list(self.spacing),
            "hu_window": list(self.hu_window),
            "orientation": self.orientation,
            "patch_size": list(self.patch_size),
            "base": self.base,
            "scdl": self.scdl,
            "lineage": dict(self.lineage),
            "metrics": dict(self.metrics),
            "sha256": dict(self.sha256),
            "description": self.description,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = META_FILE) -> ModelBundle:
        """Validate a model.json dict; ``source`` names the file in error messages.

        Raises:
            BundleError: not an SCDL bundle, an unsupported format version, or a bad field.
        """
        if not isinstance(data, Mapping) or data.get("format") != BUNDLE_FORMAT:
            found = data.get("format") if isinstance(data, Mapping) else type(data).__name__
            raise BundleError(
                f"{source} is not an SCDL model description (format {found!r}, expected {BUNDLE_FORMAT!r})."
            )
        if data.get("format_version") != FORMAT_VERSION:
            raise BundleError(
                f"{source} has format_version {data.get('format_version')!r}; this SCDLCore reads format_version "
                f"{FORMAT_VERSION}. Upgrade SCDLCore (pip install -U scdlcore) to use this model."
            )
        missing = [
            key for key in ("name", "networks", "labels", "spacing", "hu_window", "patch_size") if key not in data
        ]
        if missing:
            raise BundleError(f"{source} lacks the field(s) {', '.join(missing)}.")
        try:
            bundle = cls(
                name=str(data["name"]),
                version=int(data.get("version", 1)),
                networks=[dict(net) for net in data["networks"]],
                labels=LabelTable.from_dict(data["labels"]),
                spacing=_floats(data["spacing"], 3),
                hu_window=_floats(data["hu_window"], 2),
                orientation=None if data.get("orientation") is None else str(data["orientation"]),
                patch_size=tuple(int(p) for p in data["patch_size"]),  # type: ignore[arg-type]
                base=str(data.get("base", "supervised")),
                ensemble=str(data.get("ensemble", "mean")),
                scdl=data.get("scdl"),
                lineage=dict(data.get("lineage") or {}),
                metrics=dict(data.get("metrics") or {}),
                description=str(data.get("description", "")),
                created=str(data.get("created", "")),
                sha256=dict(data.get("sha256") or {}),
            )
        except (TypeError, ValueError) as err:
            raise BundleError(f"{source} has a malformed field: {err}") from err
        bundle._validate(source)
        return bundle

    def build_networks(self, device: torch.device | str, count: int | None = None) -> list[nn.Module]:
        """Rebuild the networks with their weights, in eval mode on ``device``.

        Args:
            device: where the networks live.
            count: build only the first ``count`` networks (e.g. 1 for ``ensemble="first"``); None = all.
        """
        if self._weights is None:
            raise BundleError(f"Bundle {self.ref} has no weights file; load it with load_bundle().")
        from safetensors.torch import load_file

        state = load_file(str(self._weights), device="cpu")
        networks = []
        for index, description in enumerate(self.networks[:count]):
            prefix = f"net{index}."
            net = build_network(**description)
            net.load_state_dict({key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)})
            networks.append(net.to(device).eval())
        return networks

    def _validate(self, source: str) -> None:
        problems = []
        if not NAME_PATTERN.fullmatch(self.name):
            problems.append(f"name {self.name!r} must be letters, digits, '.', '_' or '-' (no '@' or '/')")
        if self.version < 1:
            problems.append(f"version must be >= 1, got {self.version}")
        if not self.networks or any("arch" not in net for net in self.networks):
            problems.append("networks must be a non-empty list of {'arch': ..., ...} descriptions")
        elif any(net.get("num_classes") != self.labels.num_classes for net in self.networks):
            problems.append(f"every network needs num_classes={self.labels.num_classes} (the label table's C)")
        if self.base not in BASES:
            problems.append(f"base must be one of {', '.join(BASES)}, got {self.base!r}")
        if self.ensemble not in ENSEMBLES:
            problems.append(f"ensemble must be one of {', '.join(ENSEMBLES)}, got {self.ensemble!r}")
        if min(self.spacing) <= 0:
            problems.append(f"spacing must be positive (mm), got {list(self.spacing)}")
        if self.hu_window[0] >= self.hu_window[1]:
            problems.append(f"hu_window must be [low, high] with low < high, got {list(self.hu_window)}")
        if self.orientation is not None:
            try:
                orientation_directions(self.orientation)
            except ValueError as err:
                problems.append(str(err).rstrip("."))
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            problems.append(f"patch_size must be three positive voxel counts, got {list(self.patch_size)}")
        try:
            check_builtin_name(self.labels)
        except ValueError as err:
            problems.append(str(err).rstrip("."))
        if LABELS_DIGEST in self.sha256 and self.sha256[LABELS_DIGEST] != labels_digest(self.labels):
            problems.append(
                f"its label table does not match the sha256 recorded for it (sha256.{LABELS_DIGEST}): "
                f"the organs or values were edited after the model was saved, so its label maps would "
                "carry other meanings. Get the bundle again from its source"
            )
        if problems:
            raise BundleError(f"{source}: " + "; ".join(problems) + ".")


def save_bundle(
    path: str | Path,
    networks: Sequence[nn.Module],
    *,
    name: str,
    labels: LabelTable | Mapping[str, Any],
    spacing: Sequence[float],
    hu_window: Sequence[float],
    patch_size: Sequence[int],
    orientation: str = CANONICAL_ORIENTATION,
    version: int = 1,
    base: str = "supervised",
    ensemble: str = "mean",
    scdl: Mapping[str, Any] | None = None,
    lineage: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    description: str = "",
    weights_dtype: torch.dtype | None = None,
) -> Path:
    """Write a bundle atomically: a folder, or an archive when ``path`` ends in ``.scdlmodel``.

    DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers are removed first, so the
    keys are the plain network's. An existing bundle at ``path`` is replaced only once the new one
    is complete. Arguments after ``networks`` are the model.json fields (see :class:`ModelBundle`);
    ``labels`` may be a :class:`LabelTable` or its ``to_dict()``. ``weights_dtype`` (e.g.
    ``torch.float16``) stores the floating-point tensors at that precision, halving a bundle that
    must stay small; loading casts them back to the networks' float32.

    Returns:
        ``path``.
    """
    path = Path(path)
    if weights_dtype is not None and not weights_dtype.is_floating_point:
        raise ValueError(f"weights_dtype must be a floating-point dtype (e.g. torch.float16), not {weights_dtype}.")
    plain = [_unwrap(net) for net in networks]
    bundle = ModelBundle(
        name=name,
        version=int(version),
        networks=[dict(network_description(net)) for net in plain],
        labels=labels if isinstance(labels, LabelTable) else LabelTable.from_dict(labels),
        spacing=_floats(spacing, 3),
        hu_window=_floats(hu_window, 2),
        orientation=orientation,
        patch_size=tuple(int(p) for p in patch_size),  # type: ignore[arg-type]
        base=base,
        ensemble=ensemble,
        scdl=dict(scdl) if scdl is not None else None,
        lineage={"parent": None, "data_fingerprint": None, "steps": 0, "trained_on": "", **(lineage or {})},
        metrics=dict(metrics or {}),
        description=description,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
    bundle._validate(f"bundle {path}")
    state = {
        f"net{index}.{key}": _stored(tensor, weights_dtype)
        for index, net in enumerate(plain)
        for key, tensor in net.state_dict().items()
    }
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=temporary_prefix()) as tmp:
        folder = Path(tmp) / "bundle"
        folder.mkdir()
        save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
        bundle.sha256 = {WEIGHTS_FILE: sha256_file(folder / WEIGHTS_FILE), LABELS_DIGEST: labels_digest(bundle.labels)}
        if path.suffix == ARCHIVE_SUFFIX:
            write_archive(bundle, folder / WEIGHTS_FILE, path)
        else:
            write_json(folder / META_FILE, bundle.to_dict())
            _replace_folder(folder, path)
    return path


def copy_bundle(source: str | Path, dest: str | Path) -> Path:
    """Copy a bundle (folder or archive, verified as it loads) to the folder ``dest``, atomically.

    An existing bundle at ``dest`` is replaced only once the copy is complete. Returns ``dest``.
    """
    bundle, dest = load_bundle(source), Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=temporary_prefix()) as tmp:
        _replace_folder(_stage(bundle, Path(tmp)), dest)
    return dest


def load_bundle(path: str | Path) -> ModelBundle:
    """Load and verify a bundle folder or ``.scdlmodel`` archive (a path to its model.json also works).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        BundleError: a pickle checkpoint, a foreign folder or file, a bad model.json, a damaged
            weights file (not safetensors, checksum mismatch) or weights that do not match model.json.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"Model {path} does not exist.")
    if path.is_file() and path.name == META_FILE:
        path = path.parent
    if path.is_dir():
        return _load_folder(path, path)
    if _is_pickle(path):
        raise BundleError(f"{path} is a pickle file; {_PICKLE_ADVICE}")
    if zipfile.is_zipfile(path):
        extracted = tempfile.TemporaryDirectory(prefix="scdl-bundle-")
        _extract_archive(path, Path(extracted.name))
        bundle = _load_folder(Path(extracted.name), path)
        bundle._extracted = extracted  # removed when the bundle is garbage-collected
        return bundle
    raise BundleError(
        f"{path} is not an SCDL model bundle: expected a folder or a {ARCHIVE_SUFFIX} archive holding "
        f"{META_FILE} and {WEIGHTS_FILE}."
    )


def update_bundle_metadata(path: str | Path, **fields: Any) -> ModelBundle:
    """Rewrite model.json fields (lineage, metrics, description...) of a bundle FOLDER; the weights stay as they are.

    The new model.json is validated and written atomically; returns the reloaded bundle.
    """
    bundle = load_bundle(path)
    if bundle.path is None or not Path(bundle.path).is_dir():
        raise BundleError(f"{path}: only a bundle folder's metadata can be updated, not an archive's.")
    data = {**bundle.to_dict(), **fields}
    ModelBundle.from_dict(data, f"updated {META_FILE} of {path}")._validate(f"bundle {path}")
    write_json(Path(bundle.path) / META_FILE, data)
    return load_bundle(path)


def _load_folder(folder: Path, source: Path) -> ModelBundle:
    """Load the bundle in ``folder``; ``source`` (the folder or its archive) names it in messages."""
    meta_path = folder / META_FILE
    if not meta_path.is_file():
        pickles = sorted(p.name for p in folder.iterdir() if _is_pickle(p)) if folder.is_dir() else []
        hint = f" It holds {', '.join(pickles)}: {_PICKLE_ADVICE}" if pickles else ""
        raise BundleError(
            f"{source} is not an SCDL model bundle: it has no {META_FILE} (a bundle holds {META_FILE} and "
            f"{WEIGHTS_FILE}).{hint}"
        )
    bundle = ModelBundle.from_dict(read_meta(meta_path, f"{META_FILE} in {source}"), f"{META_FILE} in {source}")
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise BundleError(f"{source} has no {WEIGHTS_FILE}; the bundle is incomplete.")
    _check_tensors(weights, bundle, source)
    expected, actual = bundle.sha256.get(WEIGHTS_FILE), sha256_file(weights)
    if expected != actual:
        raise BundleError(
            f"{WEIGHTS_FILE} in {source} does not match the sha256 recorded in {META_FILE} "
            f"(expected {expected}, got {actual}): the file was changed or damaged. "
            "Get the bundle again from its source."
        )
    bundle.path, bundle._weights = source, weights
    return bundle


def _check_tensors(weights: Path, bundle: ModelBundle, source: Path) -> None:
    """Every tensor the described networks need, with its shape, and nothing else (header only)."""
    from safetensors import SafetensorError, safe_open

    label = f"{WEIGHTS_FILE} in {source}"
    try:
        with safe_open(str(weights), framework="pt") as handle:
            found = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except (SafetensorError, OSError) as err:
        raise BundleError(
            f"{label} is not a valid safetensors file ({err}); the bundle is damaged. Get it again."
        ) from err
    expected = {}
    with torch.device("meta"):  # shapes only, no memory
        for index, description in enumerate(bundle.networks):
            try:
                net = build_network(**description)
            except ValueError as err:
                raise BundleError(f"{META_FILE} in {source}: network {index}: {err}") from err
            expected.update({f"net{index}.{key}": tuple(t.shape) for key, t in net.state_dict().items()})
    missing = sorted(expected.keys() - found.keys())
    unexpected = sorted(found.keys() - expected.keys())
    mismatched = [
        f"{key} is {list(found[key])} in the file, {list(shape)} by {META_FILE}"
        for key, shape in expected.items()
        if key in found and found[key] != shape
    ]
    problems = [
        f"{title}: {_first(items)}"
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatch", mismatched))
        if items
    ]
    if problems:
        raise BundleError(
            f"{label} does not match the networks described in {META_FILE}: "
            + "; ".join(problems)
            + ". The weights belong to a different network; "
            "save the bundle again with scdlcore.bundle.format.save_bundle."
        )
    _check_finite(weights, label)


def _check_finite(weights: Path, label: str) -> None:
    """Refuse weights holding NaN or inf (a diverged training): they segment nothing, silently."""
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as handle:
        bad = [
            key
            for key in handle.keys()
            if (tensor := handle.get_tensor(key)).is_floating_point() and not bool(torch.isfinite(tensor).all())
        ]
    if bad:
        raise BundleError(
            f"{label} holds NaN or infinite weights ({_first(bad)}): the model diverged in training and "
            "would segment nothing. Use an earlier version, or retrain with a lower learning rate."
        )


def read_meta(path: Path, label: str | None = None) -> dict[str, Any]:
    label = label or str(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BundleError(f"{label} is not readable JSON ({err}).") from err


def _is_pickle(path: Path) -> bool:
    """A raw pickle (protocol >= 2) or a ``torch.save`` zip (which holds ``data.pkl``)."""
    if not path.is_file():
        return False
    with open(path, "rb") as handle:
        if handle.read(1) == b"\x80":
            return True
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith(".pkl") for name in archive.namelist())
    return False


def _extract_archive(archive_path: Path, dest: Path) -> None:
    """Extract model.json and the weights (flat, or inside one top folder); nothing else is written."""
    try:
        with zipfile.ZipFile(archive_path) as archive:
            members = {}
            for info in archive.infolist():
                parts = info.filename.rstrip("/").split("/")
                if len(parts) <= 2 and parts[-1] in (META_FILE, WEIGHTS_FILE) and not info.is_dir():
                    members.setdefault(parts[-1], info)
            for name, info in members.items():
                with archive.open(info) as source, open(dest / name, "wb") as target:
                    shutil.copyfileobj(source, target, length=1 << 20)
    except (zipfile.BadZipFile, zlib.error, EOFError) as err:  # a bad CRC, a damaged deflate stream, a cut file
        raise BundleError(f"{archive_path} is damaged ({err}); copy or export the model again.") from err


def _stage(bundle: ModelBundle, tmp: Path) -> Path:
    """A complete copy of a loaded bundle in the new folder ``tmp/bundle``: its weights and model.json."""
    folder = tmp / "bundle"
    folder.mkdir()
    shutil.copyfile(bundle._weights, folder / WEIGHTS_FILE)  # type: ignore[arg-type]
    write_json(folder / META_FILE, bundle.to_dict())
    return folder


def write_archive(bundle: ModelBundle, weights: Path, dest: Path) -> None:
    """Zip ``bundle``'s model.json and the ``weights`` file (flat) to ``dest`` atomically.
    Safetensors compress poorly: stored."""

    def write(tmp: Path) -> None:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as archive:
            archive.writestr(META_FILE, _json_text(bundle.to_dict()))
            archive.write(weights, arcname=WEIGHTS_FILE)

    atomic_write(dest, write)


def _replace_folder(new: Path, dest: Path) -> None:
    """Move the complete folder ``new`` to ``dest``; an old ``dest`` is moved aside next to ``new`` first."""
    if dest.exists():
        os.replace(dest, new.parent / "previous")
    os.replace(new, dest)


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    atomic_write_text(path, _json_text(data), durable=True)


def _json_text(data: Mapping[str, Any]) -> str:
    return json.dumps(data, indent=2) + "\n"


def _stored(tensor: torch.Tensor, weights_dtype: torch.dtype | None) -> torch.Tensor:
    """A CPU copy (no shared storage) of a state-dict tensor, floating point cast to ``weights_dtype`` if given."""
    dtype = weights_dtype if weights_dtype is not None and tensor.is_floating_point() else tensor.dtype
    return tensor.detach().to("cpu", dtype=dtype, copy=True).contiguous()


def _unwrap(net: nn.Module) -> nn.Module:
    """The plain network inside DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        inner = getattr(net, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(net, "module", None)
        if not isinstance(inner, nn.Module):
            return net
        net = inner


def labels_digest(table: LabelTable) -> str:
    """sha256 of a label table's canonical JSON: model.json records it beside the weights' (key ``"labels"``)."""
    return hashlib.sha256(json.dumps(table.to_dict(), sort_keys=True).encode("utf-8")).hexdigest()


def _floats(values: Sequence[Any], count: int) -> tuple[float, ...]:
    floats = tuple(float(v) for v in values)
    if len(floats) != count:
        raise ValueError(f"expected {count} numbers, got {list(values)}")
    return floats


def _first(items: list[str], limit: int = 5) -> str:
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more
