"""The trainer: one loop of named steps over a semi-supervised base, driven by one :class:`Config`.

Runs on CPU, one GPU, or several under ``torchrun`` (DDP; gloo on CPU, NCCL on CUDA; each rank draws
different patches, rank 0 validates and writes). Checkpoints are single safetensors files written
atomically (no pickle): weights, optimiser momentum and RNG state as tensors, everything else as JSON
metadata. ``resume=True`` continues at the saved step with the same optimiser, scheduler, EMA and RNG
state; since patches and augmentations are drawn from (seed, rank, step), the resumed run follows the
uninterrupted one. SIGINT/SIGTERM (or ``cancel``) stop after the current step with a checkpoint written.

Output folder::

    checkpoints/last.safetensors, checkpoints/best.safetensors
    history.jsonl        one JSON object per logged step / validation
    curves.png           loss and validation Dice curves
    model/               the best checkpoint exported as a model bundle
    cache/               preprocessed volumes (unless data.cache_dir says otherwise)
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from scdlcore._atomic import atomic_write, atomic_write_text, remove_stale_temporaries
from scdlcore.bundle.format import ModelBundle
from scdlcore.dataset.manifest import Case, Dataset, DatasetError, load_dataset
from scdlcore.device import resolve_device
from scdlcore.events import Progress
from scdlcore.inference.predictor import Predictor
from scdlcore.io.volume import Volume
from scdlcore.training.augment import Augmenter
from scdlcore.training.cache import prepare_dataset
from scdlcore.training.checkpoints import (
    BUNDLE_DIR,
    CHECKPOINT_FORMAT,
    HISTORY_FILE,
    checkpoint_path,
    holds_run,
    load_checkpoint_weights,
    resume_checkpoint,
)
from scdlcore.training.config import Config
from scdlcore.training.patches import PatchSampler
from scdlcore.training.ssl import Batch, build_base
from scdlcore.visualize.curves import plot_curves

__all__ = ["Trainer", "TrainResult", "optimisation_step", "split_validation"]

_log = logging.getLogger(__name__)


LOG_EVERY = 10


@dataclass
class TrainResult:
    """What a run ended with. ``status``: "completed" or "cancelled"."""

    status: str
    step: int
    best_mean_dice: float | None
    best_step: int | None
    output: Path
    bundle: Path | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class ValidationCase:
    """A labeled case as ``scdl evaluate`` sees it: the CT and its label map on the CT's own grid.

    Attributes:
        organs: the organs scored: all of the table's, or a partially reviewed case's reviewed ones.
    """

    id: str
    image: Volume
    label: Volume
    organs: list[str]

    @classmethod
    def read(cls, dataset: Dataset, case: Case) -> ValidationCase:
        from scdlcore.io.read import read_image, read_label

        image = read_image(dataset.path(case.image))
        label = read_label(dataset.path(case.label), reference=image)  # type: ignore[arg-type]
        return cls(
            case.id, image, label, list(case.reviewed) if case.reviewed is not None else list(dataset.table.names)
        )

    def score(self, predictor: Predictor) -> dict[str, float]:
        """Dice of each scored organ that is in the reference or the prediction (NaN-free)."""
        from scdlcore.evaluation.metrics import dice

        predicted = predictor.predict_volume(self.image).array
        values = {label.name: label.value for label in predictor.bundle.labels.labels}
        scores = {name: dice(predicted == values[name], self.label.array == values[name]) for name in self.organs}
        return {name: score for name, score in scores.items() if not math.isnan(score)}


def split_validation(dataset: Dataset, config: Config) -> tuple[list, list, list]:
    """(train_labeled, validation, unlabeled) cases. Validation: data.val_cases, else the last num_val_cases labeled."""
    labeled = sorted(dataset.labeled, key=lambda c: c.id)
    if not labeled:
        raise DatasetError(
            f"Dataset {dataset.root} has no labeled case ({len(dataset.cases)} cases, none with a label map): "
            "SCDL needs at least one labeled case to train."
        )
    if config.data.val_cases:
        validation = [dataset.case(case_id) for case_id in config.data.val_cases]
        if any(not case.is_labeled for case in validation):
            raise DatasetError(f"Validation cases {config.data.val_cases} must be labeled cases of {dataset.root}.")
    else:
        validation = labeled[len(labeled) - config.data.num_val_cases :] if config.data.num_val_cases else []
    train_labeled = [case for case in labeled if case not in validation]
    if not train_labeled:
        raise DatasetError(
            f"Dataset {dataset.root}: every labeled case is held out for validation; none is left to train on."
        )
    return train_labeled, validation, dataset.unlabeled


class Trainer:
    """Trains ``config`` into ``output``.

    Args:
        config: the whole run's configuration (data.dataset must name a dataset folder).
        output: the run's folder (created).
        json_events: progress as JSON lines on stdout instead of a tqdm bar.
        resume: continue from ``output/checkpoints/last.safetensors``.
        cancel: set it (from another thread) to stop after the current step; SIGINT/SIGTERM set it too.
        init_weights: safetensors state dict of the base's networks to start from (fine-tuning), or None.
        bundle_meta: fields of the exported bundle's model.json that override the defaults (name, lineage...).
        final_event: name of the closing event of a completed run ("result"; a fine-tune sends its own result).
    """

    def __init__(
        self,
        config: Config,
        output: str | Path,
        *,
        json_events: bool = False,
        resume: bool = False,
        cancel: threading.Event | None = None,
        init_weights: dict[str, torch.Tensor] | None = None,
        bundle_meta: dict[str, Any] | None = None,
        final_event: str = "result",
    ) -> None:
        self.config, self.output = config, Path(output)
        self.json_events, self.resume, self.cancel = json_events, resume, cancel or threading.Event()
        self.init_weights, self.bundle_meta, self.final_event = init_weights, bundle_meta or {}, final_event
        self.rank, self.world_size = _distributed_rank()
        self.device = resolve_device(config.train.device)
        self.history: list[dict[str, Any]] = []
        self.best_mean_dice: float | None = None
        self.best_step: int | None = None
        self.step = 0

    # --- the loop -------------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        with _distributed(self.device, self.world_size), _stop_on_signals(self.cancel):
            self.setup()
            progress = Progress(
                self.config.train.steps, "train", json_lines=self.json_events, enabled=self.is_main, initial=self.step
            )
            try:
                if self.step == 0 and self.init_weights is not None and self.validates and self.config.train.val_every:
                    self.validate()  # the starting model's scores: the "before" of a fine-tune
                while self.step < self.config.train.steps and not self.cancel.is_set():
                    losses = self.train_step()
                    self.step += 1
                    self.after_step(losses, progress)
                cancelled = self.step < self.config.train.steps
                self.save_checkpoint()
                bundle = None if cancelled else self.finish()
            finally:
                progress.close()
            status = "cancelled" if cancelled else "completed"
            if self.is_main:
                progress.emit(
                    self.final_event if not cancelled else "cancelled",
                    status=status,
                    step=self.step,
                    best_mean_dice=self.best_mean_dice,
                    best_step=self.best_step,
                    bundle=None if bundle is None else str(bundle),
                )
            return TrainResult(
                status, self.step, self.best_mean_dice, self.best_step, self.output, bundle, self.history
            )

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def setup(self) -> None:
        """Data, model, optimiser, and the checkpoint to resume from."""
        config = self.config
        if not self.resume and holds_run(self.output):  # its checkpoints and history would be mixed with this run's
            raise ValueError(
                f"{self.output} holds a training run already: continue it with --resume, or choose a new output folder."
            )
        if not self.resume and self.is_main:  # leftovers of a run killed before its first checkpoint
            (self.output / HISTORY_FILE).unlink(missing_ok=True)
        if self.is_main:  # half-written checkpoints and bundles of a killed process
            for folder in (self.output, checkpoint_path(self.output).parent):
                remove_stale_temporaries(folder)
        if not config.data.dataset:
            raise ValueError("The config names no dataset folder (data.dataset).")
        dataset = load_dataset(config.data.dataset)
        self.table = dataset.table
        train_cases, val_cases, unlabeled_cases = split_validation(dataset, config)
        self.output.mkdir(parents=True, exist_ok=True)
        cache_dir = Path(config.data.cache_dir) if config.data.cache_dir else self.output / "cache"
        rehearsal = load_dataset(config.data.rehearsal) if config.data.rehearsal else None
        with _main_first(self.is_main, self.world_size):
            labeled = prepare_dataset(dataset, train_cases, config.data, cache_dir)
            if not val_cases and config.data.val_on_train:
                val_cases = train_cases  # this dataset's own labeled cases, not the rehearsal ones
            self.validates = bool(val_cases)  # every rank takes part in validate(); rank 0 reads and scores the cases
            self.validation = [ValidationCase.read(dataset, case) for case in val_cases] if self.is_main else []
            if rehearsal is not None:
                labeled += prepare_dataset(rehearsal, rehearsal.labeled, config.data, cache_dir / "rehearsal")
            unlabeled = prepare_dataset(dataset, unlabeled_cases, config.data, cache_dir)
        self.data_fingerprint = dataset.fingerprint()[:16]
        self.sampler = PatchSampler(
            labeled,
            unlabeled,
            config.train.patch_size,
            config.train.labeled_batch,
            config.train.unlabeled_batch,
            config.train.rare_class_prob,
            config.train.seed,
            self.rank,
            num_classes=dataset.table.num_classes,
        )
        self.augmenter = Augmenter(
            config.augment, dataset.table, config.data.hu_window, config.data.spacing[2], config.train.seed, self.rank
        )

        torch.manual_seed(config.train.seed)  # identical initial weights on every rank
        self.base = build_base(config, dataset.table.num_classes).to(self.device)
        if self.init_weights is not None:
            self._load_init_weights()
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = not config.train.deterministic
            torch.backends.cudnn.deterministic = config.train.deterministic
        if config.train.channels_last:
            self.base.to(memory_format=torch.channels_last_3d)
        if config.train.compile and self.device.type == "cuda":
            for network in self.base.networks:
                network.compile()
        self.model: nn.Module = self.base
        if self.world_size > 1:
            self.model = nn.parallel.DistributedDataParallel(
                self.base, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        trainable = [p for p in self.base.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(
            trainable, lr=config.train.lr, momentum=config.train.momentum, weight_decay=config.train.weight_decay
        )
        total, power = config.train.steps, config.train.poly_power
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: max(1.0 - s / total, 0.0) ** power)
        if self.resume:
            self.load_checkpoint(resume_checkpoint(self.output) or checkpoint_path(self.output))  # none: its error

    def _load_init_weights(self) -> None:
        """Start from ``init_weights``. A network they do not cover starts as a copy of the first network: a
        bundle may ship one network of its CPS pair, and an untrained partner would teach the other noise."""
        missing = set(self.base.load_state_dict(self.init_weights, strict=False).missing_keys)
        networks = self.base.networks
        for index in range(1, len(networks)):
            keys = {f"networks.{index}.{name}" for name, _ in networks[index].named_parameters()}
            if keys <= missing:
                networks[index].load_state_dict(networks[0].state_dict())
                missing = {key for key in missing if not key.startswith(f"networks.{index}.")}
                _log.info("Network %d starts as a copy of network 0 (the given weights hold one network).", index)
        _log.info("Initialised from given weights; %d parameters kept their fresh values.", len(missing))

    def train_step(self) -> dict[str, float]:
        """One optimiser step on the batch of ``self.step``; returns the losses as floats."""
        self.model.train()
        torch.manual_seed(_step_seed(self.config.train.seed, self.rank, self.step))  # dropout, proxy samples
        batch = self.augmented_batch(self.sampler.batch(self.step), self.step)
        losses = optimisation_step(
            self.model, self.optimizer, batch, self.step / self.config.train.steps, amp=self._amp
        )
        self.scheduler.step()
        self.base.after_optimizer_step(self.step + 1)  # optimiser steps taken so far
        values = {name: float(value) for name, value in losses.items()}
        if not all(math.isfinite(v) for v in values.values()):
            raise FloatingPointError(
                f"Non-finite loss at step {self.step}: {values}. Lower train.lr or check the data."
            )
        return values

    def augmented_batch(self, arrays: dict[str, np.ndarray], step: int) -> Batch:
        """The network's batch from the sampler's ``arrays`` of ``step``: on the device, augmented, in the memory
        format of the networks."""
        images = torch.from_numpy(arrays["image"]).to(self.device)
        labels = torch.from_numpy(arrays["labels"]).to(self.device)
        valid = torch.from_numpy(arrays["valid"]).to(self.device)
        images, labels, valid = self.augmenter(images, labels, valid, step, torch.from_numpy(arrays["class_hu"]))
        if self.config.train.channels_last:
            images = images.contiguous(memory_format=torch.channels_last_3d)
        return Batch(images, labels, None if bool(valid.all()) else valid)

    def after_step(self, losses: dict[str, float], progress: Progress) -> None:
        """Logging, validation and checkpoints at their cadences."""
        train = self.config.train
        lr = self.optimizer.param_groups[0]["lr"]
        if self.step % LOG_EVERY == 0 or self.step == train.steps:
            self._record({"event": "train", "step": self.step, "lr": lr, **losses})
        progress.update(self.step, losses=losses, lr=lr)
        if train.val_every and (self.step % train.val_every == 0 or self.step == train.steps) and self.validates:
            dice = self.validate()
            if dice is not None and self.is_main:
                progress.emit("validation", step=self.step, dice=dice["organs"], mean_dice=dice["mean"])
        if self.step % train.checkpoint_every == 0 and self.step < train.steps:
            self.save_checkpoint()

    # --- validation -------------------------------------------------------------------------------------
    def validate(self) -> dict[str, Any] | None:
        """Dice per organ over the validation cases, as ``scdl segment`` + ``scdl evaluate`` would measure it: the
        shipped predictor on each CT's own grid, :func:`scdlcore.evaluation.metrics.dice` per organ; rank 0
        computes, every rank waits."""
        result = None
        if self.is_main:
            predictor = self.predictor()
            organs: dict[str, list[float]] = {name: [] for name in self.table.names}
            for case in self.validation:
                for name, score in case.score(predictor).items():
                    organs[name].append(score)
            per_organ = {name: float(np.mean(v)) for name, v in organs.items() if v}
            mean = float(np.mean(list(per_organ.values()))) if per_organ else float("nan")
            result = {"organs": per_organ, "mean": mean}
            self._record({"event": "validation", "step": self.step, "mean_dice": mean, "dice": per_organ})
            if self.best_mean_dice is None or mean > self.best_mean_dice:
                self.best_mean_dice, self.best_step = mean, self.step
                self.save_checkpoint("best")
        _barrier(self.world_size)
        return result

    def predictor(self) -> Predictor:
        """The predictor ``scdl segment`` would build from the bundle this run exports, over the current networks
        (the first only when ``bundle_meta`` says ``ensemble: first``)."""
        data = self.config.data
        description = ModelBundle(
            name="validation",
            networks=[],
            labels=self.table,
            spacing=tuple(data.spacing),
            hu_window=tuple(data.hu_window),
            orientation=data.orientation,
            patch_size=tuple(self.config.train.patch_size),
            ensemble=self.bundle_meta.get("ensemble", "mean"),
        )
        networks = self.base.inference_networks()
        for network in networks:
            network.eval()  # train_step puts them back in training mode
        return Predictor(description, self.device, networks=networks)

    # --- checkpoints ------------------------------------------------------------------------------------
    def save_checkpoint(self, name: str = "last") -> Path | None:
        """Atomically write ``checkpoints/<name>.safetensors`` (rank 0 only)."""
        if not self.is_main:
            return None
        from safetensors.torch import save_file

        tensors = {f"model.{k}": v.detach().contiguous().cpu() for k, v in self.base.state_dict().items()}
        optimizer_state = self.optimizer.state_dict()
        for index, state in optimizer_state["state"].items():
            for key, value in state.items():
                if torch.is_tensor(value):
                    tensors[f"optim.{index}.{key}"] = value.detach().contiguous().cpu()
        tensors["rng.torch"] = torch.get_rng_state()
        meta = {
            "format": CHECKPOINT_FORMAT,
            "step": self.step,
            "config": self.config.to_dict(),
            "param_groups": optimizer_state["param_groups"],
            "scheduler": self.scheduler.state_dict(),
            "best_mean_dice": self.best_mean_dice,
            "best_step": self.best_step,
        }
        path = checkpoint_path(self.output, name)
        return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"scdl": json.dumps(meta)}))

    def load_checkpoint(self, path: Path) -> None:
        """Restore weights, optimiser, scheduler, RNG, step and best score from a checkpoint."""
        from safetensors import safe_open

        if not path.is_file():
            raise FileNotFoundError(
                f"Cannot resume: no checkpoint at {path}. Start without --resume, or check --output."
            )
        try:
            with safe_open(str(path), framework="pt") as handle:
                meta = json.loads(handle.metadata()["scdl"])
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        except Exception as err:  # safetensors raises several types for a damaged file
            raise ValueError(f"Checkpoint {path} is damaged or not an SCDL checkpoint: {err}") from err
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path} is not an SCDL checkpoint (format {meta.get('format')!r}).")
        saved_steps = meta["config"]["train"]["steps"]
        if saved_steps != self.config.train.steps:  # the learning-rate schedule is laid over the run's length
            raise ValueError(
                f"Cannot resume {path}: the run was started for {saved_steps} steps, this one asks for "
                f"{self.config.train.steps}; resuming would silently rescale its learning-rate schedule. "
                f"Resume with train.steps = {saved_steps} (--steps {saved_steps}), or start a new run."
            )
        self.base.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        state: dict[int, dict[str, Any]] = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, index, name = key.split(".", 2)
                state.setdefault(int(index), {})[name] = value.to(self.device)
        self.optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        self.scheduler.load_state_dict(meta["scheduler"])
        torch.set_rng_state(tensors["rng.torch"])
        self.step = int(meta["step"])
        self.best_mean_dice, self.best_step = meta["best_mean_dice"], meta["best_step"]
        self.history = _read_history(self.output / HISTORY_FILE, up_to_step=self.step)
        _log.info("Resumed %s at step %d.", path, self.step)

    # --- the end of a run -------------------------------------------------------------------------------
    def finish(self) -> Path | None:
        """Curves PNG and the bundle of the best (else last) weights; rank 0 only."""
        if not self.is_main:
            return None
        plot_curves(self.history, self.output / "curves.png")
        best = checkpoint_path(self.output, "best")
        if best.is_file():
            self.base.load_state_dict(load_checkpoint_weights(best))
        return self.export_bundle(self.output / BUNDLE_DIR)

    def export_bundle(self, path: Path) -> Path:
        from scdlcore.bundle.format import save_bundle

        config = self.config
        metrics = {"validation_mean_dice": self.best_mean_dice, "validation_step": self.best_step}
        last_validation = next(
            (h for h in reversed(self.history) if h["event"] == "validation" and h["step"] == self.best_step), None
        )
        if last_validation is not None:
            metrics["validation_dice"] = last_validation["dice"]
        meta = {
            "name": "scdl-model",
            "labels": self.table.to_dict(),
            "spacing": list(config.data.spacing),
            "hu_window": list(config.data.hu_window),
            "orientation": config.data.orientation,
            "patch_size": list(config.train.patch_size),
            "base": config.ssl.base,
            "scdl": config.to_dict()["scdl"] if config.scdl.enabled else None,
            "lineage": {
                "parent": None,
                "data_fingerprint": self.data_fingerprint,
                "steps": self.step,
                "trained_on": str(config.data.dataset),
            },
            "metrics": metrics,
            **self.bundle_meta,
        }
        return save_bundle(path, self.base.inference_networks(), **meta)

    # --- helpers ----------------------------------------------------------------------------------------
    @property
    def _amp(self) -> bool:
        return self.config.train.amp and self.device.type == "cuda"

    def _record(self, entry: dict[str, Any]) -> None:
        if not self.is_main:
            return
        self.history.append(entry)
        from scdlcore.events import to_jsonable

        with open(self.output / HISTORY_FILE, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(to_jsonable(entry)) + "\n")


def optimisation_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, batch: Batch, progress: float, *, amp: bool
) -> dict[str, torch.Tensor]:
    """Forward (bf16 autocast when ``amp``), backward and one optimiser step; returns the detached losses.

    ``model`` is the base (or its DDP wrapper) whose forward returns the loss dict. The speed benchmark times
    exactly this function.
    """
    device_type = batch.images.device.type
    with torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=amp):
        losses = model(batch, progress)
    optimizer.zero_grad(set_to_none=True)
    losses["total"].backward()
    optimizer.step()
    return {name: value.detach() for name, value in losses.items()}


def _step_seed(seed: int, rank: int, step: int) -> int:
    return int(np.random.default_rng([seed, rank, step, 3]).integers(2**62))


def _read_history(path: Path, up_to_step: int) -> list[dict[str, Any]]:
    """History up to the resumed step; later entries (logged after that checkpoint) are dropped from the file too."""
    if not path.is_file():
        return []
    entries = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    kept = [entry for entry in entries if entry["step"] <= up_to_step]
    if len(kept) != len(entries):
        atomic_write_text(path, "".join(json.dumps(entry) + "\n" for entry in kept))
    return kept


def _distributed_rank() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


@contextmanager
def _distributed(device: torch.device, world_size: int) -> Iterator[None]:
    """Join the torchrun process group for the run (gloo on CPU, NCCL on CUDA)."""
    if world_size <= 1:
        yield
        return
    import torch.distributed as dist

    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


@contextmanager
def _main_first(is_main: bool, world_size: int) -> Iterator[None]:
    """Rank 0 runs the block first (it fills the cache), the others after it."""
    if not is_main:
        _barrier(world_size)
    yield
    if is_main:
        _barrier(world_size)


def _barrier(world_size: int) -> None:
    if world_size > 1:
        import torch.distributed as dist

        dist.barrier()


@contextmanager
def _stop_on_signals(cancel: threading.Event) -> Iterator[None]:
    """SIGINT/SIGTERM set ``cancel`` (the loop then stops cleanly); handlers only in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous: dict[int, Callable | int | None] = {}

    def handler(signum: int, _frame: Any) -> None:
        _log.warning("Signal %d received: stopping after this step and writing a checkpoint.", signum)
        cancel.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        previous[signum] = signal.signal(signum, handler)
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
