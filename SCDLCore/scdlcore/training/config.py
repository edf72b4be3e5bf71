"""The one training configuration: typed, validated, serialisable (YAML or JSON).

A config file has up to six sections, each optional, every key optional (defaults below)::

    data:    {dataset: path/to/dataset, spacing: [1.5, 1.5, 2.0], hu_window: [-150, 450], val_cases: [case7]}
    network: {width: 16}
    ssl:     {base: cps}
    scdl:    {enabled: true, p2e: tokens}
    augment: {rotate_deg: 15}
    train:   {steps: 20000, patch_size: [96, 96, 96]}

Unknown keys and bad values are refused with the file, the key and the closest valid name. Relative
paths in ``data`` are resolved against the config file's folder. :func:`config_reference` prints
every key with its default (``scdl train --print-config``); the comments in this module give their meaning.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scdlcore.choices import ANCHOR_MODES, ARCHS, BASES, NORMS, P2E_MODES, UNREVIEWED_MODES

__all__ = [
    "AugmentConfig",
    "Config",
    "ConfigError",
    "DEFAULT_FINETUNE_STEPS",
    "CPU_FINETUNE_SECONDS_PER_STEP",
    "default_finetune_steps",
    "expected_cpu_finetune_seconds",
    "DataConfig",
    "NetworkConfig",
    "SCDLConfig",
    "SSLConfig",
    "TrainConfig",
    "config_reference",
    "load_config",
    "parse_override",
]


#: Optimiser steps of ``scdl finetune`` unless told otherwise, by the device type it runs on. On a 2-core CPU (AMD
#: EPYC) a step of the starter (a VNet-8 pair on 16 x 96 x 96 patches) takes about 1.7 s, so 120 steps take under 4
#: minutes end to end (Testing/Benchmarks/results/finetune_cpu.md); a GPU keeps the longer schedule.
DEFAULT_FINETUNE_STEPS = {"cuda": 300, "cpu": 120}


#: Seconds per step of ``scdl finetune`` end to end (start, preprocessing, validations and registering included) of
#: the starter (starter@4) on a store of one reviewed and one unlabeled CT, on a 2-core CPU: 197 s for 120 steps,
#: median of 3 (Testing/Benchmarks/results/finetune_cpu.md). A faster CPU takes less; larger models and stores
#: take more.
CPU_FINETUNE_SECONDS_PER_STEP = 1.64


def default_finetune_steps(device_type: str) -> int:
    """The fine-tune's default step count on a device of ``device_type`` ("cpu", "cuda"; other types as the CPU)."""
    return DEFAULT_FINETUNE_STEPS.get(device_type, DEFAULT_FINETUNE_STEPS["cpu"])


def expected_cpu_finetune_seconds(steps: int | None = None) -> float:
    """How long a fine-tune of ``steps`` (None: the CPU default) takes on the measured 2-core CPU."""
    return CPU_FINETUNE_SECONDS_PER_STEP * (default_finetune_steps("cpu") if steps is None else steps)


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the file, key and what is allowed."""


@dataclass
class DataConfig:
    """Training data and its preprocessing (also stored in exported bundles)."""

    dataset: str = ""  # folder holding dataset.json (see README: "Dataset folders")
    labels: str = "synapse13"  # built-in label table
    spacing: tuple[float, float, float] = (1.5, 1.5, 2.0)  # model voxel size (x, y, z) in mm
    # HU mapped to [0, 1]: wide enough that an arterial aorta (about 400 HU) and kidney (220) stay below white
    hu_window: tuple[float, float] = (-150.0, 450.0)
    orientation: str = "RAS"  # axis codes every CT is put in before the network (scdlcore.preprocess)
    val_cases: list[str] = field(default_factory=list)  # ids of labeled cases held out for validation
    num_val_cases: int = 0  # or: hold out this many labeled cases (the last ones by id) when val_cases is empty
    val_on_train: bool = False  # with no case held out, score the labeled training cases (fit, not generalisation)
    cache_dir: str = ""  # preprocessed-volume cache; default <output>/cache
    rehearsal: str = ""  # another dataset folder whose labeled cases also train (fine-tuning keeps old knowledge)
    # Partially reviewed cases, their organs left as the model drew them: "kept" trains them as drawn (else the
    # fine-tune forgets them: bench_loop measured aorta 0.72 -> 0.00) | "unknown" leaves them out of the losses
    unreviewed: str = "kept"

    def __post_init__(self) -> None:
        _require(all(s > 0 for s in self.spacing), "data.spacing", "three positive numbers (mm)", self.spacing)
        _require(self.hu_window[0] < self.hu_window[1], "data.hu_window", "[low, high] with low < high", self.hu_window)
        _require(self.num_val_cases >= 0, "data.num_val_cases", ">= 0", self.num_val_cases)
        _choice(self.unreviewed, UNREVIEWED_MODES, "data.unreviewed")
        from scdlcore.preprocess import orientation_directions

        try:
            orientation_directions(self.orientation)
        except ValueError as err:
            raise ConfigError(f"data.orientation: {err}") from None

    @property
    def preprocessing(self):  # -> scdlcore.preprocess.Preprocessing (imported lazily: config stays light)
        """The preprocessing plan of this data: the one that training, validation and the exported bundle share."""
        from scdlcore.preprocess import Preprocessing

        return Preprocessing(tuple(self.spacing), tuple(self.hu_window), self.orientation)


@dataclass
class NetworkConfig:
    """The backbone (SCDLCore/docs/METHOD.md section 1)."""

    arch: str = "vnet"
    width: int = 16  # w, channels of the first stage and of the embedding
    norm: str = "auto"  # batch | instance | auto (batch for cps/supervised, instance for mean_teacher)

    def __post_init__(self) -> None:
        _require(self.width >= 1, "network.width", ">= 1", self.width)
        _choice(self.norm, ("auto", *NORMS), "network.norm")
        _choice(self.arch, ARCHS, "network.arch")


@dataclass
class SSLConfig:
    """The semi-supervised base SCDL plugs into."""

    base: str = "cps"  # cps | mean_teacher | supervised
    cps_weight: float = 0.1  # final weight of cross pseudo supervision (sigmoid ramp over the run)
    consistency_weight: float = 0.1  # Mean Teacher: final weight of the consistency loss
    ema_decay: float = 0.99  # Mean Teacher: cap of the EMA coefficient
    noise_std: float = 0.1  # Mean Teacher: teacher input noise
    top_k: float = 0.1  # GACE: fraction of hardest labeled voxels kept

    def __post_init__(self) -> None:
        _choice(self.base, BASES, "ssl.base")
        _require(0 < self.top_k <= 1, "ssl.top_k", "a fraction in (0, 1]", self.top_k)
        _require(0 <= self.ema_decay < 1, "ssl.ema_decay", "in [0, 1)", self.ema_decay)


@dataclass
class SCDLConfig:
    """The SCDL plug-in (SCDLCore/docs/METHOD.md section 3); the open choices are marked [choice].

    Each [choice] default was argued first and then kept by the GPU ablation, where no alternative did better
    (Testing/Benchmarks/results/ablation_h200.md; the README's "The method and our choices").
    """

    enabled: bool = True
    weight: float = 0.1  # lambda: L = L_base + lambda * (proxy_weight L_proxy + sac_weight L_sac + kl_weight L_kl)
    grid: int = 12  # [choice] tokens per axis (12 for 96^3 patches; 32 is the alternative)
    hidden: tuple[int, ...] = (512, 512)  # projection MLP hidden widths
    embed_dim: int = 256
    dropout: float = 0.2
    num_samples: int = 50  # S, samples per class proxy
    tau_e2p: float = 0.2
    tau_p2e: float = 0.2
    p2e: str = "tokens"  # [choice] tokens: softmax over tokens (real p2e) | classes: released code (p2e == e2p)
    distance_weight: float = 0.1
    proxy_weight: float = 0.3
    sac_weight: float = 0.1
    kl_weight: float = 0.02
    unlabeled: bool = True  # [choice] proxy loss on unlabeled tokens too (weighted by detached agreement, ramped)
    anchor: str = "batch"  # [choice] batch: per-batch SAC centres (released) | ema: EMA memory of centres
    anchor_momentum: float = 0.9
    prior: bool = (
        False  # the released prior path: class-prior features added before the output conv (kept in the exported model)
    )

    def __post_init__(self) -> None:
        _choice(self.p2e, P2E_MODES, "scdl.p2e")
        _choice(self.anchor, ANCHOR_MODES, "scdl.anchor")
        _require(self.grid >= 1, "scdl.grid", ">= 1", self.grid)
        _require(self.num_samples >= 1, "scdl.num_samples", ">= 1", self.num_samples)
        _require(self.tau_e2p > 0 and self.tau_p2e > 0, "scdl.tau_e2p/tau_p2e", "> 0", (self.tau_e2p, self.tau_p2e))
        _require(0 <= self.anchor_momentum < 1, "scdl.anchor_momentum", "in [0, 1)", self.anchor_momentum)

    def module_kwargs(self) -> dict[str, Any]:
        """Constructor arguments of :class:`scdlcore.nets.scdl.SCDLModule`."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("enabled", "weight", "prior")}


@dataclass
class AugmentConfig:
    """Patch augmentation (MONAI transforms, on the training device). Probabilities are per patch.

    No left-right flips by default: kidneys and adrenal glands are sided.
    """

    enabled: bool = True
    phase_prob: float = 0.0  # labeled patches whose organs move to the HU of a random contrast phase (contrast.py);
    # off for the default cubes, where it cost Dice on the held-out CT; on wide slabs (the starter's 16 x 96 x 96) it
    # helps, and starter.yaml sets 0.5 (SCDLCore/docs/ACCURACY.md, section 3)
    spatial_prob: float = 0.3  # rotation + scaling
    rotate_deg: float = 15.0  # max rotation about each axis
    scale: tuple[float, float] = (0.85, 1.25)
    flip_axes: tuple[int, ...] = ()  # array axes (0=z, 1=y, 2=x) to flip at random
    intensity_prob: float = 0.3  # brightness (scale) and shift
    intensity_scale: float = 0.1
    intensity_shift: float = 0.1
    gamma_prob: float = 0.2
    gamma: tuple[float, float] = (0.7, 1.5)
    noise_prob: float = 0.15
    noise_std: float = 0.03
    blur_prob: float = 0.1
    lowres_prob: float = 0.1  # simulate thicker slices / coarser scanners
    lowres_zoom: tuple[float, float] = (0.5, 1.0)
    slab_prob: float = 0.0  # labeled patches cut down to a slab along z, as a short scan (slab.py)
    slab_mm: tuple[float, float] = (30.0, 120.0)  # the slab's thickness range

    def __post_init__(self) -> None:
        for name in (
            "phase_prob",
            "spatial_prob",
            "intensity_prob",
            "gamma_prob",
            "noise_prob",
            "blur_prob",
            "lowres_prob",
            "slab_prob",
        ):
            _require(0 <= getattr(self, name) <= 1, f"augment.{name}", "a probability in [0, 1]", getattr(self, name))
        _require(all(a in (0, 1, 2) for a in self.flip_axes), "augment.flip_axes", "axes among 0, 1, 2", self.flip_axes)
        _require(0 < self.scale[0] <= self.scale[1], "augment.scale", "[low, high] with 0 < low <= high", self.scale)
        _require(
            0 < self.slab_mm[0] <= self.slab_mm[1], "augment.slab_mm", "[low, high] with 0 < low <= high", self.slab_mm
        )


@dataclass
class TrainConfig:
    """Schedule, batch, patches, precision, checkpoints."""

    steps: int = 20000
    patch_size: tuple[int, int, int] = (96, 96, 96)  # (D, H, W) voxels, each divisible by 16
    labeled_batch: int = 2
    unlabeled_batch: int = 2
    lr: float = 0.01  # SGD, poly(poly_power) decay over `steps`
    momentum: float = 0.9
    weight_decay: float = 1e-4
    poly_power: float = 0.9
    rare_class_prob: float = 0.67  # chance a labeled patch is centred on a class drawn uniformly among those present
    seed: int = 0
    val_every: int = 1000  # validate (Dice per class on held-out cases) every N steps; 0 = never
    checkpoint_every: int = 500
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: bool = True  # bf16 autocast on CUDA (ignored on CPU: fp32)
    channels_last: bool = True  # channels_last_3d memory format: the fast cuDNN kernels on CUDA, oneDNN's on the CPU
    compile: bool = True  # torch.compile the networks (CUDA only; fuses norm/activation passes, ~1.3x)
    deterministic: bool = False  # deterministic cuDNN (the slow reference setting)

    def __post_init__(self) -> None:
        _require(self.steps >= 1, "train.steps", ">= 1", self.steps)
        _require(
            all(p >= 16 and p % 16 == 0 for p in self.patch_size),
            "train.patch_size",
            "three multiples of 16",
            self.patch_size,
        )
        _require(
            self.labeled_batch >= 1 and self.unlabeled_batch >= 0,
            "train.labeled_batch/unlabeled_batch",
            ">= 1 / >= 0",
            (self.labeled_batch, self.unlabeled_batch),
        )
        _require(self.lr > 0, "train.lr", "> 0", self.lr)
        _require(0 <= self.rare_class_prob <= 1, "train.rare_class_prob", "a probability", self.rare_class_prob)
        _require(
            self.val_every >= 0 and self.checkpoint_every >= 1,
            "train.val_every/checkpoint_every",
            ">= 0 / >= 1",
            (self.val_every, self.checkpoint_every),
        )


@dataclass
class Config:
    """Everything a training run needs; ``scdl train --config FILE`` reads it."""

    data: DataConfig = field(default_factory=DataConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    ssl: SSLConfig = field(default_factory=SSLConfig)
    scdl: SCDLConfig = field(default_factory=SCDLConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def norm(self) -> str:
        if self.network.norm != "auto":
            return self.network.norm
        return "instance" if self.ssl.base == "mean_teacher" else "batch"

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> Config:
        """Build and validate from nested dicts; ``source`` names the file in error messages."""
        return _build(cls, data, source, "")

    def with_overrides(self, overrides: dict[str, Any]) -> Config:
        """A copy with ``{"train.steps": 10, ...}`` applied (dotted keys), validated like a file."""
        data = self.to_dict()
        for dotted, value in overrides.items():
            section, _, key = dotted.partition(".")
            if section not in data or not key:
                raise ConfigError(f"Override {dotted!r}: expected SECTION.KEY with SECTION in {', '.join(data)}.")
            data[section][key] = value
        return Config.from_dict(data, "overrides")


def parse_override(item: str) -> tuple[str, Any]:
    """``"SECTION.KEY=VALUE"`` (the value in JSON; a bare word is a string) as ``("SECTION.KEY", value)``."""
    key, sep, value = item.partition("=")
    if not sep:
        raise ConfigError(f"Override {item!r}: expected SECTION.KEY=VALUE.")
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value  # ssl.base=cps


def load_config(path: str | Path) -> Config:
    """Read a YAML (.yaml/.yml) or JSON config file; relative ``data`` paths become relative to its folder."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"Cannot read config file {path}: {err.strerror or err}.") from err
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"Config file {path} is not a text file (YAML or JSON); is it an image or an archive?"
        ) from err
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            raw = yaml.safe_load(text) or {}
        else:
            raw = json.loads(text)
    except Exception as err:  # yaml and json raise different types; both mean "not parseable"
        raise ConfigError(
            f"Config file {path} is not valid {'YAML' if path.suffix.lower() in ('.yaml', '.yml') else 'JSON'}: {err}"
        ) from err
    if not isinstance(raw, dict):
        raise ConfigError(f"Config file {path} must hold a mapping of sections, got {type(raw).__name__}.")
    config = Config.from_dict(raw, str(path))
    for name in ("dataset", "cache_dir", "rehearsal"):
        value = getattr(config.data, name)
        if value and not Path(value).is_absolute():
            setattr(config.data, name, str((path.parent / value).resolve()))
    return config


def config_reference() -> str:
    """Every section and key with its default, as a commented YAML document."""
    lines = ["# SCDL training configuration: every key, with its default."]
    for section in dataclasses.fields(Config):
        cls = section.default_factory  # type: ignore[misc]
        lines.append(f"{section.name}:  # {(cls.__doc__ or '').strip().splitlines()[0]}")
        instance = cls()
        for item in dataclasses.fields(cls):
            value = json.dumps(getattr(instance, item.name))
            lines.append(f"  {item.name}: {value}")
    return "\n".join(lines)


def _build(cls: type, data: Any, source: str, where: str) -> Any:
    if data is None:  # a section whose keys are all commented out: its defaults
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: section {where.rstrip('.') or 'top level'!r} must be a mapping, got {data!r}.")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{source}: unknown key {where + key!r}.{hint} Valid keys: {', '.join(names)}.")
        kwargs[key] = _coerce(hints[key], value, source, where + key)
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None


def _coerce(hint: Any, value: Any, source: str, key: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, source, key + ".")
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: {key} must be a list, got {value!r}.")
        if origin is tuple and args and args[-1] is not Ellipsis and len(value) != len(args):
            raise ConfigError(f"{source}: {key} must have {len(args)} values, got {value!r}.")
        item_types = [args[0]] * len(value) if origin is list or args[-1] is Ellipsis else list(args)
        return origin(_coerce(t, v, source, key) for t, v in zip(item_types, value))
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {key} must be true or false, got {value!r}.")
        return value
    if hint in (int, float):
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or (hint is int and isinstance(value, float) and not value.is_integer())
        ):
            raise ConfigError(f"{source}: {key} must be {'an integer' if hint is int else 'a number'}, got {value!r}.")
        return hint(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: {key} must be a string, got {value!r}.")
        return value
    return value


def _require(condition: bool, key: str, expected: str, got: Any) -> None:
    if not condition:
        raise ConfigError(f"{key} must be {expected}, got {got!r}.")


def _choice(value: str, choices: tuple[str, ...], key: str) -> None:
    if value not in choices:
        close = difflib.get_close_matches(value, choices, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{key} must be one of {', '.join(choices)}; got {value!r}.{hint}")
