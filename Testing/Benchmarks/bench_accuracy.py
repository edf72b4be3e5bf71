"""Accuracy on another patient's real CT, leave one patient out: supervised, CPS + GA, Mean Teacher + GA, each
with and without SCDL, next to the naive floor.

One command trains every configuration of one fold with the same network, budget and seeds, in-process and
one after another (``scdlcore.training.trainer.Trainer``), and scores each run on the fold's held-out labeled CT, which
no run ever sees. There are two labeled abdominal CTs, of two patients, stored in two axis orders and
two contrast phases, so there are two folds (``--fold``):

- fold 1: trains on ``ct_abdomen`` (A: non-contrast, 3 mm, direction diag(-1, -1, 1)) and scores
  ``ct_abdomen_dicom`` (B: portal venous, another scanner (PET/CT), 0.98 x 0.98 x 2 mm, 20 slices, identity
  direction);
- fold 2: trains on B and scores A;
- unlabeled in both: ``ct_chest_cta`` (C, arterial chest CT angiography) and ``ct_chest_nrrd`` (F, a 3D Slicer
  chest CT). The held-out CT takes no part in training, except in a configuration named *transductive*: there it
  joins the unlabeled pool (never its labels), as a user's own CTs do when a model is fine-tuned on them.

Each configuration is a dict of dotted config overrides applied to ONE base config (the trainer's defaults,
CPS + GA + SCDL, with this benchmark's budget): see :func:`configurations`. It includes the naive floor of
SCDLCore/docs/ACCURACY.md (plain supervised, uniform crops, no augmentation) and an ablation of SCDL's open choices.
Each run exports its last weights as a bundle (``RUN/model``; no model selection: nothing of B takes part
in training), :class:`scdlcore.inference.predictor.Predictor` segments B from that bundle, and
:mod:`scdlcore.evaluation.metrics` scores it on B's native grid: Dice and HD95 (mm) per organ, the mean over
the organs present in B's reference, and the mean over its minority organs (under 1% of its foreground).
SCDL's effect is reported as the paired difference (same seed) of mean Dice, mean +- std over seeds.

Every CT reaches the networks in the canonical orientation (``scdlcore.preprocess``), in training and
scoring alike; results measured before that (``results/accuracy_h100.*``, ``results/ablation_h200.*``) are
superseded. The labels of A and B are TotalSegmentator model outputs, not manual ground truth; the tables say so.

Data: the first run builds a self-contained data folder (``--data``; default ``WORK/data``) from the
sample CTs of :mod:`scdlcore.sample_data` and reuses it afterwards, offline. The GPU machine has no network,
so build it here and carry it there (see ``gpu_check.sh``)::

    PYTHONPATH=SCDLCore python Testing/Benchmarks/bench_accuracy.py --data .bench-data --prepare-only

Usage::

    PYTHONPATH=SCDLCore python Testing/Benchmarks/bench_accuracy.py --smoke --out /tmp/acc
        # CPU, 2 configurations, ~2 min
    PYTHONPATH=SCDLCore python Testing/Benchmarks/bench_accuracy.py --device cuda --data .bench-data
        # every configuration, 3 seeds, VNet-16, 3000 steps of 96^3 at 3 mm -> Testing/Benchmarks/results/accuracy.*

``--add-to EARLIER/accuracy.json`` extends an earlier invocation's results (same budget; e.g. a third seed in a
later GPU session): its finished runs are kept and only the (configuration, seed) pairs it lacks are trained.

Results: ``accuracy.md`` (Markdown tables), ``accuracy.json`` (every run's scores) and ``accuracy.png``
(per-organ Dice bars) in ``--out`` (default ``Testing/Benchmarks/results/`` for a non-smoke CUDA run, else a
new temporary folder). ``--smoke`` never writes into ``results/``: its numbers only show that the pipeline runs.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import json
import math
import multiprocessing
import os
import shutil
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from bench_common import machine_name

from scdlcore.bundle.format import load_bundle
from scdlcore.dataset.manifest import MANIFEST_NAME
from scdlcore.dataset.store import DatasetStore
from scdlcore.inference.postprocess import POSTPROCESSING
from scdlcore.io.volume import Volume
from scdlcore.sample_data import fetch_sample
from scdlcore.training.config import Config

__all__ = [
    "DATA_MANIFEST",
    "FOLDS",
    "RESULTS_DIR",
    "TEST_SAMPLE",
    "UNLABELED_STORE_SPACING_MM",
    "BenchData",
    "Configuration",
    "OrganSummary",
    "RunCancelled",
    "add_budget_arguments",
    "base_config",
    "configurations",
    "format_mean_std",
    "output_folder",
    "portable_command",
    "prepare_data",
    "resolve_budget",
    "score_bundle",
    "summarise",
    "train_run",
]

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DATA_MANIFEST = "bench-data.json"
DATA_FORMAT = "scdl-bench-data"
#: The unlabeled chest CTA (C) is stored resampled to this spacing: it is 10.5 MB at its 1.5 mm and 1.3 MB at 3 mm,
#: and the data folder travels to the GPU machine beside SimpleITK's 52 MB wheel under a 64 MiB limit. The
#: benchmarks train at 3 mm (or coarser), where the trainer would resample it anyway.
UNLABELED_STORE_SPACING_MM = 3.0
TEST_SAMPLE = "ct_abdomen_dicom"
#: Leave-one-patient-out folds: fold -> (the labeled training CT, the held-out test CT).
#: (z, y, x) voxels of a patch that sees a whole axial cross-section at 3 mm (288 mm) through a 48 mm slab: the
#: context that tells the spleen from the liver by where it lies, not by how bright it is.
WIDE_SLAB = (16, 96, 96)
FOLDS = {1: ("ct_abdomen", TEST_SAMPLE), 2: (TEST_SAMPLE, "ct_abdomen")}
#: Short names of the labeled samples in tables (SCDLCore/docs/ACCURACY.md's letters) with their contrast phase.
SAMPLE_NAMES = {"ct_abdomen": "A, non-contrast", TEST_SAMPLE: "B, portal venous"}
CARRIED_SAMPLES = ("ct_abdomen", TEST_SAMPLE, "ct_chest_nrrd")
CTA_FILE = "ct_chest_cta.nii.gz"
SMOKE_CONFIGS = ("cps_ga", "cps_ga_scdl")
#: Configurations named so are the ablation of SCDL's open choices: run after (a)-(d) when time is short.
ABLATION_PREFIX = "scdl_"
#: (configuration, the one it is compared with, what the difference measures); paired by seed.
COMPARISONS = (
    ("cps_ga_scdl", "cps_ga", "SCDL on CPS + GA: (c) - (b)"),
    ("cps_ga_scdl_wide_phase", "cps_ga_wide_phase", "SCDL on CPS + GA, wide slabs + phase: (c12) - (b12)"),
    ("cps_ga_wide_phase", "supervised_wide_phase", "CPS + GA over supervised, wide slabs + phase: (b12) - (a12)"),
    (
        "cps_ga_scdl_instance_wide_phase",
        "cps_ga_scdl_wide_phase",
        "instance norm instead of batch norm on CPS + GA + SCDL, wide slabs + phase: (c13) - (c12)",
    ),
    (
        "cps_ga_scdl_wide_phase_transductive",
        "cps_ga_scdl_wide_phase",
        "the scored CT unlabeled in training (transductive), CPS + GA + SCDL: (c12t) - (c12)",
    ),
    ("mt_ga_scdl", "mt_ga", "SCDL on Mean Teacher + GA: (d + SCDL) - (d)"),
    (
        "supervised_instance_wide_phase",
        "supervised_wide_phase",
        "instance norm instead of batch norm on supervised, wide slabs + phase: (a13) - (a12)",
    ),
    ("mt_ga_scdl_wide_phase", "mt_ga_wide_phase", "SCDL on Mean Teacher + GA, wide slabs + phase: (e12) - (d12)"),
    (
        "mt_ga_wide_phase",
        "supervised_wide_phase",
        "Mean Teacher + GA over supervised, wide slabs + phase: (d12) - (a12)",
    ),
    ("cps_ga", "supervised_no_phase", "CPS + GA over supervised: (b) - (a')"),
    ("cps_ga_scdl", "supervised_no_phase", "CPS + GA + SCDL over supervised: (c) - (a')"),
    (
        "supervised_no_phase",
        "floor",
        "the recipe (augmentation, rare-class crops, window) over the naive floor: (a') - floor",
    ),
    ("supervised", "supervised_no_phase", "contrast phase augmentation on supervised: (a) - (a')"),
    ("supervised_intensity", "supervised_no_phase", "strong global intensity augmentation on supervised: (a'') - (a')"),
    ("supervised_instance", "supervised_no_phase", "instance norm on supervised: (a3) - (a')"),
    ("supervised_instance_phase", "supervised_instance", "contrast phase augmentation with instance norm: (a4) - (a3)"),
    ("supervised_coarse", "supervised_no_phase", "4.5 mm instead of 3 mm on supervised: (a5) - (a')"),
    ("supervised_short_scan", "supervised_no_phase", "short-scan cuts on supervised: (a6) - (a')"),
    (
        "supervised_instance_short_scan",
        "supervised_instance",
        "short-scan cuts on supervised with instance norm: (a7) - (a3)",
    ),
    ("scdl_p2e_classes", "cps_ga_scdl", "ablation: p2e over classes (released) - over tokens"),
    ("scdl_labeled_only", "cps_ga_scdl", "ablation: SCDL on labeled tokens only - labeled + unlabeled"),
    ("scdl_grid_fine", "cps_ga_scdl", "ablation: fine token grid (32 per 96^3) - coarse (12 per 96^3)"),
    ("scdl_anchor_ema", "cps_ga_scdl", "ablation: EMA class anchors - per-batch anchors"),
)


class Configuration(NamedTuple):
    """A benchmark configuration: a label for tables and the dotted overrides of the base config.

    ``transductive``: the fold's held-out CT is added to the unlabeled pool (its labels never are); the label says so.
    """

    label: str
    overrides: dict[str, Any]
    transductive: bool = False


class RunCancelled(RuntimeError):
    """A training run stopped early (SIGINT/SIGTERM, e.g. a time limit): no bundle to score."""


@dataclass(frozen=True)
class BenchData:
    """The benchmark data folder (see :func:`prepare_data`): everything the benchmarks read, offline.

    Layout::

        bench-data.json                 what the folder holds (written last: its presence means complete)
        samples/ct_abdomen/             verbatim sample cache entries with their manifests and licences
        samples/ct_abdomen_dicom/       (SCDL_CACHE_DIR=<folder> serves them to any scdlcore code)
        samples/ct_chest_nrrd/
        ct_chest_cta.nii.gz             C resampled to UNLABELED_STORE_SPACING_MM, int16 HU
        LICENSE-ct_chest_cta
    """

    root: Path

    def train_store(
        self, folder: Path, labeled: Sequence[str] = ("ct_abdomen",), unlabeled: Sequence[str] = ()
    ) -> Path:
        """A dataset store of the training CTs in ``folder`` (built once): the ``labeled`` samples (A, B) labeled,
        C and F unlabeled, and the ``unlabeled`` samples without their labels (a transductive configuration's
        held-out CT).

        Raises:
            ValueError: ``folder`` holds a store built with other samples.
        """
        if not (folder / MANIFEST_NAME).is_file():
            store = DatasetStore.init(folder)
            for name in labeled:
                sample = fetch_sample(name, cache_dir=self.root)
                store.add(
                    sample.image, sample.label, case_id=name, source=f"scdlcore sample {name} (TotalSegmentator labels)"
                )
            self.add_unlabeled(store)
            for name in unlabeled:
                store.add(fetch_sample(name, cache_dir=self.root).image, case_id=name, source=f"scdlcore sample {name}")
        dataset = DatasetStore(folder).dataset()
        held_labeled = sorted(case.id for case in dataset.labeled)
        held_unlabeled = sorted(case.id for case in dataset.unlabeled)
        if held_labeled != sorted(labeled) or not set(unlabeled) <= set(held_unlabeled):
            raise ValueError(
                f"{folder} holds the labeled cases {held_labeled} and unlabeled {held_unlabeled}, "
                f"not {sorted(labeled)} and {sorted(unlabeled)}; give another folder."
            )
        return folder

    def add_unlabeled(self, store: DatasetStore) -> None:
        """Add C and F to a dataset store as unlabeled cases."""
        store.add(
            self.root / CTA_FILE,
            case_id="ct_chest_cta",
            source=f"scdlcore sample ct_chest_cta at {UNLABELED_STORE_SPACING_MM:g} mm or coarser",
        )
        store.add(
            fetch_sample("ct_chest_nrrd", cache_dir=self.root).image,
            case_id="ct_chest_nrrd",
            source="scdlcore sample ct_chest_nrrd",
        )

    def test_case(self, name: str = TEST_SAMPLE) -> tuple[Volume, Volume]:
        """A labeled sample (B by default): its CT (D, H, W) in HU and its Synapse-13 reference labels.

        The labels are on the CT's grid.
        """
        from scdlcore.io.read import read_image, read_label

        sample = fetch_sample(name, cache_dir=self.root)
        image = read_image(sample.image)
        return image, read_label(sample.label, reference=image)


class OrganSummary(NamedTuple):
    """Scores of one segmented CT, restricted to the organs present in its reference.

    Attributes:
        mean_dice: mean Dice over the organs present in the reference.
        minority_mean_dice: mean Dice over the minority organs (under 1% of the reference foreground).
        mean_hd95: mean HD95 (mm) over the present organs that were found (a missed organ has none).
        dice, hd95: per present organ (HD95 NaN for a missed organ).
        missed: present organs not predicted at all. false_positives: absent organs that were predicted.
        minority: the minority organs.
    """

    mean_dice: float
    minority_mean_dice: float
    mean_hd95: float
    dice: dict[str, float]
    hd95: dict[str, float]
    missed: list[str]
    false_positives: list[str]
    minority: list[str]


def configurations(patch_edge: int) -> dict[str, Configuration]:
    """Every configuration, by name, as overrides of :func:`base_config` (CPS + GA + SCDL with its defaults).

    Args:
        patch_edge: the patch edge in voxels; the SCDL token grids scale with it (12 and 32 tokens per axis
            for a 96^3 patch, i.e. tokens of 8 and 3 voxels).
    """
    no_unlabeled = {"train.unlabeled_batch": 0}
    recipe = {"ssl.base": "supervised", "scdl.enabled": False, "augment.phase_prob": 0.0, **no_unlabeled}  # (a')
    wide_phase = {"train.patch_size": list(WIDE_SLAB), "augment.phase_prob": 0.5}  # starter@3's patches and phase
    return {
        "floor": Configuration(
            "naive floor: supervised, uniform crops, no augmentation, window [-125, 275]",
            {
                "ssl.base": "supervised",
                "scdl.enabled": False,
                "augment.enabled": False,
                "train.rare_class_prob": 0.0,
                "data.hu_window": [-125, 275],
                **no_unlabeled,
            },
        ),
        "supervised": Configuration(
            "(a) supervised, the recipe + contrast phase augmentation (p 0.5)",
            {"ssl.base": "supervised", "scdl.enabled": False, "augment.phase_prob": 0.5, **no_unlabeled},
        ),
        "supervised_no_phase": Configuration(
            "(a') supervised, the recipe on 48^3 cubes (no phase augmentation): starter@2's",
            dict(recipe),
        ),
        "supervised_intensity": Configuration(
            "(a'') supervised, the recipe with strong global intensity augmentation",
            {
                "ssl.base": "supervised",
                "scdl.enabled": False,
                "augment.phase_prob": 0.0,
                "augment.intensity_prob": 0.8,
                "augment.intensity_scale": 0.2,
                "augment.intensity_shift": 0.15,
                **no_unlabeled,
            },
        ),
        "supervised_instance": Configuration(
            "(a3) supervised, the recipe with instance norm",
            {**recipe, "network.norm": "instance"},
        ),
        "supervised_instance_phase": Configuration(
            "(a4) supervised, the recipe with instance norm + contrast phase augmentation (p 0.5)",
            {**recipe, "network.norm": "instance", "augment.phase_prob": 0.5},
        ),
        "supervised_coarse": Configuration(
            "(a5) supervised, the recipe at 4.5 mm (1.5x the patch's context)",
            {**recipe, "data.spacing": [4.5, 4.5, 4.5]},
        ),
        "supervised_short_scan": Configuration(
            "(a6) supervised, the recipe + short-scan cuts (p 0.5)",
            {**recipe, "augment.slab_prob": 0.5},
        ),
        "supervised_instance_short_scan": Configuration(
            "(a7) supervised, the recipe with instance norm + short-scan cuts (p 0.5)",
            {**recipe, "network.norm": "instance", "augment.slab_prob": 0.5},
        ),
        "supervised_lr3": Configuration(
            "(a8) supervised, the recipe at 3x the learning rate (0.03)",
            {**recipe, "train.lr": 0.03},
        ),
        "supervised_lr3_short_scan": Configuration(
            "(a9) supervised, the recipe at 3x the learning rate + short-scan cuts (p 0.5)",
            {**recipe, "train.lr": 0.03, "augment.slab_prob": 0.5},
        ),
        "supervised_lr3_short_scan_phase": Configuration(
            "(a10) supervised, the recipe at 3x the learning rate + short-scan cuts + contrast phase (p 0.5 each)",
            {**recipe, "train.lr": 0.03, "augment.slab_prob": 0.5, "augment.phase_prob": 0.5},
        ),
        "supervised_wide": Configuration(
            "(a11) supervised, the recipe on wide slabs: patches of 16 x 96 x 96 (z, y, x)",
            {**recipe, "train.patch_size": list(WIDE_SLAB)},
        ),
        "supervised_wide_phase": Configuration(
            "(a12) supervised, the recipe on wide slabs + contrast phase augmentation (p 0.5): starter@3's",
            {**recipe, **wide_phase},
        ),
        "supervised_instance_wide_phase": Configuration(
            "(a13) supervised, the recipe with instance norm on wide slabs + contrast phase (p 0.5)",
            {**recipe, **wide_phase, "network.norm": "instance"},
        ),
        "cps_ga": Configuration("(b) CPS + GA", {"scdl.enabled": False}),
        "cps_ga_wide_phase": Configuration(
            "(b12) CPS + GA on wide slabs + contrast phase (p 0.5): (a12) with the unlabeled CTs",
            {"scdl.enabled": False, **wide_phase},
        ),
        "cps_ga_scdl_wide_phase": Configuration(
            "(c12) CPS + GA + SCDL on wide slabs + contrast phase (p 0.5)", wide_phase
        ),
        "cps_ga_scdl_instance_wide_phase": Configuration(
            "(c13) CPS + GA + SCDL with instance norm on wide slabs + contrast phase (p 0.5)",
            {**wide_phase, "network.norm": "instance"},
        ),
        "cps_ga_scdl_wide_phase_transductive": Configuration(
            "(c12t) TRANSDUCTIVE: (c12) with the scored CT in the unlabeled pool, as in a fine-tune on a user's CTs",
            wide_phase,
            transductive=True,
        ),
        "cps_ga_scdl": Configuration("(c) CPS + GA + SCDL", {}),
        "mt_ga": Configuration("(d) Mean Teacher + GA", {"ssl.base": "mean_teacher", "scdl.enabled": False}),
        "mt_ga_scdl": Configuration("(d) Mean Teacher + GA + SCDL", {"ssl.base": "mean_teacher"}),
        "mt_ga_wide_phase": Configuration(
            "(d12) Mean Teacher + GA on wide slabs + contrast phase (p 0.5)",
            {"ssl.base": "mean_teacher", "scdl.enabled": False, **wide_phase},
        ),
        "mt_ga_scdl_wide_phase": Configuration(
            "(e12) Mean Teacher + GA + SCDL on wide slabs + contrast phase (p 0.5)",
            {"ssl.base": "mean_teacher", **wide_phase},
        ),
        "scdl_p2e_classes": Configuration("(c) with scdl.p2e = classes", {"scdl.p2e": "classes"}),
        "scdl_labeled_only": Configuration("(c) with scdl.unlabeled = off", {"scdl.unlabeled": False}),
        "scdl_grid_fine": Configuration(
            f"(c) with scdl.grid = {_token_grid(patch_edge, 32)}", {"scdl.grid": _token_grid(patch_edge, 32)}
        ),
        "scdl_anchor_ema": Configuration("(c) with scdl.anchor = ema", {"scdl.anchor": "ema"}),
    }


def add_budget_arguments(parser: argparse.ArgumentParser) -> None:
    """The options shared by the accuracy and annotation-loop benchmarks (defaults resolved by ``--smoke``)."""
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny CPU check that the pipeline runs: 6 steps, width 2, patch 32, spacing 6 mm (numbers meaningless)",
    )
    parser.add_argument("--steps", type=int, help="optimiser steps per run (default 3000; smoke 6)")
    parser.add_argument("--width", type=int, help="VNet width (default 16; smoke 2)")
    parser.add_argument("--patch", type=int, help="cubic patch edge in voxels, a multiple of 16 (default 96; smoke 32)")
    parser.add_argument(
        "--spacing",
        type=float,
        nargs="+",
        metavar="MM",
        help="model spacing: one value (isotropic) or x y z in mm (default 3; smoke 6)",
    )
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (training and segmentation)")
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="torch.compile the networks on CUDA (the trainer's default); --no-compile for short runs",
    )
    parser.add_argument("--work", type=Path, help="folder for the runs (default: a new temporary folder, kept)")
    parser.add_argument("--data", type=Path, help="benchmark data folder, built when missing (default: WORK/data)")
    parser.add_argument(
        "--out",
        type=Path,
        help="results folder (default: Testing/Benchmarks/results for a non-smoke CUDA run, "
        "else a new temporary folder)",
    )


def resolve_budget(args: argparse.Namespace, prefix: str) -> None:
    """Fill the unset budget options (smoke or full defaults), the device and the work/data folders, in place."""
    from scdlcore.device import resolve_device

    smoke = args.smoke
    args.steps = args.steps or (6 if smoke else 3000)
    args.width = args.width or (2 if smoke else 16)
    args.patch = args.patch or (32 if smoke else 96)
    spacing = args.spacing or [6.0 if smoke else 3.0]
    if len(spacing) not in (1, 3) or min(spacing) <= 0:
        raise SystemExit(f"--spacing takes one or three positive values in mm, got {spacing}.")
    args.spacing = tuple(spacing * 3 if len(spacing) == 1 else spacing)
    args.device = resolve_device(args.device)
    args.work = args.work or Path(tempfile.mkdtemp(prefix=f"scdl-{prefix}-"))
    args.data = args.data or args.work / "data"


def base_config(args: argparse.Namespace, train: Path) -> Config:
    """The one base config: the trainer's defaults (CPS + GA + SCDL) with the benchmark's data and budget.

    No validation and no model selection (``train.val_every = 0``): runs export their last weights, and the
    test CT never takes part in training.

    Args:
        args: the resolved budget options (see :func:`add_budget_arguments`). train: the training dataset store.
    """
    return Config().with_overrides(
        {
            "data.dataset": str(train),
            "data.spacing": list(args.spacing),
            "data.cache_dir": str(args.work / "cache"),
            "network.width": args.width,
            "scdl.grid": _token_grid(args.patch, 12),
            "train.steps": args.steps,
            "train.patch_size": [args.patch] * 3,
            "train.device": str(args.device),
            "train.val_every": 0,
            "train.checkpoint_every": args.steps,
            "train.compile": args.compile,
        }
    )


def train_run(
    config: Config, output: Path, stop_at: float | None = None, resume: bool = False
) -> tuple[Path, float, int]:
    """Train one run in-process; returns its exported bundle folder, the training wall time (s) and the steps done.

    Args:
        stop_at: wall-clock time (``time.time()``) at which training stops; a run past half its steps by then
            exports the weights it reached (fewer steps than planned), so a time limit still yields a model.
        resume: go on from ``output``'s last checkpoint (``output`` may exist then).

    Raises:
        FileExistsError: ``output`` exists and ``resume`` is off (runs never mix; give a new --work).
        RunCancelled: the run was stopped (a signal, or ``stop_at`` before half its steps) before its last step.
    """
    from scdlcore.training.checkpoints import holds_run
    from scdlcore.training.trainer import Trainer

    if output.exists() and not resume:
        raise FileExistsError(f"Run folder {output} already exists; give a new --work folder.")
    start = time.perf_counter()
    cancel = threading.Event()
    if stop_at is not None:
        timer = threading.Timer(max(0.0, stop_at - time.time()), cancel.set)
        timer.daemon = True
        timer.start()
    trainer = Trainer(config, output, resume=resume and holds_run(output), cancel=cancel)
    result = trainer.run()
    bundle = result.bundle
    if bundle is None and stop_at is not None and time.time() >= stop_at and result.step >= config.train.steps // 2:
        bundle = trainer.finish()
    seconds = time.perf_counter() - start
    del trainer
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if bundle is None:
        raise RunCancelled(f"Run {output.name} stopped at step {result.step} of {config.train.steps}.")
    return bundle, seconds, result.step


def score_bundle(
    bundle_dir: Path,
    image: Volume,
    reference: Volume,
    device: torch.device,
    *,
    largest_component: bool = True,
    ensemble: str | None = None,
) -> Any:
    """Segment ``image`` with a bundle (``Predictor``) and score it against ``reference`` on its native grid.

    Args:
        largest_component: the predictor's postprocessing (one region per organ), on as shipped.
        ensemble: the predictor's ``ensemble`` ("mean" of the networks, or the "first" alone); None: the bundle's.

    Returns:
        ``scdlcore.evaluation.metrics.EvaluationResult`` (Dice, HD95 and ASD in mm per organ of the bundle's
        label table).
    """
    from scdlcore.evaluation.metrics import evaluate_labels
    from scdlcore.inference.predictor import Predictor

    bundle = load_bundle(bundle_dir)
    predicted = Predictor(bundle, device, ensemble=ensemble, largest_component=largest_component).predict_volume(image)
    return evaluate_labels(predicted.array, reference.array, reference.spacing_zyx, bundle.labels)


def summarise(result: Any) -> OrganSummary:
    """The scores of an ``EvaluationResult`` over the organs present in its reference (see :class:`OrganSummary`)."""
    present = {name: s for name, s in result.organs.items() if s.reference_voxels > 0}
    hd95 = [s.hd95_mm for s in present.values() if not math.isnan(s.hd95_mm)]
    return OrganSummary(
        mean_dice=float(np.mean([s.dice for s in present.values()])) if present else math.nan,
        minority_mean_dice=result.minority_mean_dice,
        mean_hd95=float(np.mean(hd95)) if hd95 else math.nan,
        dice={name: s.dice for name, s in present.items()},
        hd95={name: s.hd95_mm for name, s in present.items()},
        missed=[name for name, s in present.items() if s.predicted_voxels == 0],
        false_positives=[
            name for name, s in result.organs.items() if s.reference_voxels == 0 and s.predicted_voxels > 0
        ],
        minority=list(result.minority_organs),
    )


def prepare_data(folder: Path) -> BenchData:
    """The benchmark data folder: built once from the sample CTs (downloaded with pip if not cached), then reused.

    Raises:
        FileExistsError: ``folder`` is not empty and has no ``bench-data.json`` (an interrupted build).
        ValueError: its ``bench-data.json`` is not this benchmark's.
        scdlcore.sample_data.SampleDataError: the samples cannot be fetched (no network and no cache).
    """
    folder = Path(folder)
    manifest = folder / DATA_MANIFEST
    if not manifest.is_file():
        if folder.exists() and any(folder.iterdir()):
            raise FileExistsError(
                f"{folder} is not empty and holds no {DATA_MANIFEST} (an interrupted build?); "
                "delete it or give another --data folder."
            )
        _build_data(folder)
    elif json.loads(manifest.read_text(encoding="utf-8")).get("format") != DATA_FORMAT:
        raise ValueError(
            f"{manifest} is not a benchmark data manifest (format {DATA_FORMAT!r}); give another --data folder."
        )
    return BenchData(folder)


def output_folder(args: argparse.Namespace, prefix: str) -> Path:
    """Where results go: --out, else results/ for a non-smoke CUDA run, else a new temporary folder.

    Raises:
        SystemExit: a smoke run asked to write into results/ (smoke numbers are not results).
    """
    if args.out is None:
        if args.smoke or args.device.type != "cuda":
            return Path(tempfile.mkdtemp(prefix=f"scdl-{prefix}-results-"))
        return RESULTS_DIR
    if args.smoke and args.out.resolve().is_relative_to(RESULTS_DIR):
        raise SystemExit(f"--smoke writes no results into {RESULTS_DIR}; give another --out (e.g. /tmp/{prefix}).")
    return args.out


def portable_command(args: argparse.Namespace) -> str:
    """This invocation's command line with no machine paths: the script by its place in the repository (wherever the
    checkout that ran it lies), its work and results folders written as WORK and OUT, other absolute paths relative
    to the current folder when inside it, else as ``PATH/<file name>``."""
    folders = {str(args.out): "OUT", str(args.work): "WORK"}  # OUT first: it may lie inside WORK

    def portable(argument: str) -> str:
        for folder, name in folders.items():
            if argument == folder or argument.startswith(folder + "/"):
                return name + argument[len(folder) :]
        path = Path(argument)
        if not path.is_absolute():
            return argument
        return path.relative_to(Path.cwd()).as_posix() if path.is_relative_to(Path.cwd()) else f"PATH/{path.name}"

    return "python " + " ".join([f"Testing/Benchmarks/{Path(__file__).name}", *map(portable, sys.argv[1:])])


def format_mean_std(values: Sequence[float], digits: int = 3, signed: bool = False) -> str:
    """``mean +- std`` over the finite values (std with ddof 1; only the mean for one value; ``-`` for none)."""
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return "-"
    sign = "+" if signed else ""
    text = f"{np.mean(finite):{sign}.{digits}f}"
    return text + (f" ± {np.std(finite, ddof=1):.{digits}f}" if len(finite) > 1 else "")


def main() -> None:
    args = _parse()
    data = prepare_data(args.data)
    if args.prepare_only:
        print(f"Benchmark data ready in {data.root} ({_folder_mib(data.root):.1f} MiB).")
        return
    earlier = _earlier_results(args.add_to, args) if args.add_to else {"runs": [], "earlier": []}
    out = output_folder(args, "accuracy")
    configs = configurations(args.patch)
    train, test = FOLDS[args.fold]
    bases = {  # one training store per kind of configuration asked for: the scored CT left out, or unlabeled too
        transductive: base_config(
            args,
            data.train_store(
                args.work / f"train-fold{args.fold}{'-transductive' if transductive else ''}",
                [train],
                [test] if transductive else [],
            ),
        )
        for transductive in {configs[name].transductive for name in args.configs}
    }
    image, reference = data.test_case(test)
    done = {(run["config"], run["seed"]) for run in earlier["runs"]}
    # The comparisons (a)-(d) over every seed first, then the ablation;
    # seed-major within each, so pairs finish together.
    groups = (
        [n for n in args.configs if not n.startswith(ABLATION_PREFIX)],
        [n for n in args.configs if n.startswith(ABLATION_PREFIX)],
    )
    tasks = [
        (name, seed) for group in groups for seed in range(args.seeds) for name in group if (name, seed) not in done
    ]
    kept = (
        f", less {len(args.configs) * args.seeds - len(tasks)} already in {', '.join(map(str, args.add_to))}"
        if args.add_to
        else ""
    )
    print(
        f"Work folder {args.work}; results to {out}; "
        f"{len(tasks)} runs ({len(args.configs)} configurations x {args.seeds} "
        f"seeds{kept}) on {machine_name(args.device)}, {args.jobs} at a time",
        flush=True,
    )
    outcome = Outcome(runs=earlier["runs"], earlier=earlier["earlier"])
    order = {name: index for index, name in enumerate(dict.fromkeys([*args.configs, *configs]))}

    def record(task: tuple[str, int], run: dict[str, Any] | None, error: str | None) -> None:
        if run is not None:
            outcome.runs.append(run)
            outcome.runs.sort(key=lambda r: (r["seed"], order[r["config"]]))
        else:
            outcome.failed.append(f"{task[0]} seed {task[1]}: {error}")
            print(f"=== {task[0]} seed {task[1]} FAILED: {error}", flush=True)
        _write_results(outcome, configs, args, out)

    args.stop_at = None if args.time_limit is None else time.time() + args.time_limit
    runner = functools.partial(_run_in_pool, jobs=args.jobs) if args.jobs > 1 else _run_in_process
    outcome.not_run = runner(
        tasks,
        lambda task: (task[0], configs[task[0]], task[1], bases[configs[task[0]].transductive], args, image, reference),
        record,
        args.time_limit,
    )
    _write_results(outcome, configs, args, out)
    if outcome.runs:
        print((out / "accuracy.md").read_text(encoding="utf-8"))
    print(f"Results in {out}", flush=True)
    if outcome.failed or outcome.not_run:
        raise SystemExit(f"{len(outcome.failed)} runs failed or stopped, {len(outcome.not_run)} not run (time limit).")


@dataclass
class Outcome:
    """What a benchmark invocation produced: finished runs, failed or stopped ones, ones never started."""

    runs: list[dict[str, Any]] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    not_run: list[str] = field(default_factory=list)
    #: the invocations whose runs were taken over with --add-to: command, machine, torch, date, runs (how many it made)
    earlier: list[dict[str, Any]] = field(default_factory=list)


def _earlier_results(paths: Sequence[Path], args: argparse.Namespace) -> dict[str, Any]:
    """The finished runs of earlier ``accuracy.json`` files (each run stamped with its machine) and their provenance.

    Several files are united: tables made side by side from one committed table hold its runs each, once in the
    result. A (configuration, seed) pair that two files hold as different runs is refused.

    Raises:
        SystemExit: naming the file, when it is not a results file of this script, its budget or data differ, or
            one of its runs conflicts with another file's.
    """
    runs: dict[tuple[str, int], dict[str, Any]] = {}
    provenance: list[dict[str, Any]] = []
    for path in paths:
        earlier = _one_earlier_results(path, args)
        for run in earlier["runs"]:
            key = (run["config"], run["seed"])
            if key in runs and _run_identity(runs[key]) != _run_identity(run):
                raise SystemExit(f"{path}: its run {key[0]} seed {key[1]} is another run than an earlier file's.")
            runs.setdefault(key, run)
        for entry in earlier["earlier"]:  # each invocation once, also where one file lists a command twice
            if entry not in provenance:
                provenance.append(entry)
    return {"runs": list(runs.values()), "earlier": provenance}


def _run_identity(run: dict[str, Any]) -> tuple:
    return run.get("machine"), run.get("bundle"), run.get("train_seconds")


def _one_earlier_results(path: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The runs and provenance of one earlier ``accuracy.json`` (see :func:`_earlier_results`)."""
    try:
        earlier = json.loads(path.read_text(encoding="utf-8"))
        theirs = _shared_budget(earlier)
        if not all(isinstance(run, dict) and {"config", "seed", "summary"} <= run.keys() for run in earlier["runs"]):
            raise TypeError("a run without config, seed and summary")
        runs = [
            {"machine": earlier["machine"], **run, "summary": _summary_from_json(run["summary"])}
            for run in earlier["runs"]
        ]
        # The invocations that file itself extended, then its own. No run counts: where tables made side by side
        # are united, one command run twice (resumed, or extended twice) cannot say which runs were its own.
        provenance = [*(_provenance(entry) for entry in earlier.get("earlier", [])), _provenance(earlier)]
    except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError, AttributeError) as err:
        raise SystemExit(f"{path}: not a results file of bench_accuracy.py ({type(err).__name__}: {err}).") from None
    ours = _shared_budget(_meta(args, Outcome()))
    for key, value in ours.items():
        if theirs[key] != value:
            raise SystemExit(
                f"{path}: its runs had {key} = {json.dumps(theirs[key])}, this invocation has "
                f"{json.dumps(value)}; only runs with the same budget and data share a table."
            )
    unknown = sorted({run["config"] for run in runs} - set(configurations(args.patch)))
    if unknown:
        raise SystemExit(f"{path}: unknown configurations {', '.join(unknown)}.")
    return {"runs": runs, "earlier": provenance}


def _provenance(meta: dict[str, Any]) -> dict[str, Any]:
    return {key: meta.get(key) for key in ("command", "machine", "torch", "date")}


def _summary_from_json(summary: dict[str, Any]) -> dict[str, Any]:
    """A run's summary as read back from accuracy.json, which holds NaN (a missed organ's HD95) as null."""

    def number(value: float | None) -> float:
        return math.nan if value is None else value

    scalars = {key: number(summary[key]) for key in ("mean_dice", "minority_mean_dice", "mean_hd95")}
    per_organ = {key: {organ: number(value) for organ, value in summary[key].items()} for key in ("dice", "hd95")}
    return {**summary, **scalars, **per_organ}


def _shared_budget(meta: dict[str, Any]) -> dict[str, Any]:
    """What must match for the runs of two invocations to share one table (``--add-to``)."""
    return {
        "smoke": meta["smoke"],
        "data": meta["data"],
        **{key: meta["budget"][key] for key in ("steps", "width", "patch", "spacing_mm", "compile")},
    }


Task = tuple[str, int]
Record = Callable[[Task, "dict[str, Any] | None", "str | None"], None]


def _run_in_process(
    tasks: list[Task], arguments: Callable[[Task], tuple], record: Record, time_limit: float | None
) -> list[str]:
    """Run the tasks one after another in this process; returns those not started for the time limit."""
    start, longest = time.monotonic(), 0.0
    for index, task in enumerate(tasks):
        if time_limit is not None and time.monotonic() - start + longest > time_limit:
            return [f"{name} seed {seed}" for name, seed in tasks[index:]]
        began = time.monotonic()
        try:
            record(task, _run_one(*arguments(task)), None)
        except RunCancelled as err:
            record(task, None, str(err))
            return [f"{name} seed {seed}" for name, seed in tasks[index + 1 :]]
        longest = max(longest, time.monotonic() - began)
    return []


def _run_in_pool(
    tasks: list[Task], arguments: Callable[[Task], tuple], record: Record, time_limit: float | None, jobs: int
) -> list[str]:
    """Run up to ``jobs`` tasks at once in spawned processes (small networks leave a big GPU mostly idle).

    A task starts only while the time limit leaves room for the longest run so far of its configuration
    (of any configuration before one of its own finished). Each process gets an equal share of the CPU cores
    as torch threads: every process on every core made each 3.4x slower on the 2-core CPU
    (Testing/Benchmarks/README.md). Returns the tasks never started.
    """
    start = time.monotonic()
    pending, running = deque(tasks), {}
    longest: dict[str, float] = {}
    threads = max(1, (os.cpu_count() or 1) // jobs)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=torch.set_num_threads, initargs=(threads,)) as pool:
        while pending or running:
            while pending and len(running) < jobs:
                name, _ = pending[0]
                estimate = longest.get(name, max(longest.values(), default=0.0))
                if time_limit is not None and time.monotonic() - start + estimate > time_limit:
                    break
                task = pending.popleft()
                running[pool.submit(_run_one, *arguments(task))] = (task, time.monotonic())
            if not running:
                break
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                task, began = running.pop(future)
                longest[task[0]] = max(longest.get(task[0], 0.0), time.monotonic() - began)
                try:
                    record(task, future.result(), None)
                except Exception as err:  # a run's failure is reported; the others go on
                    record(task, None, f"{type(err).__name__}: {err}")
    return [f"{name} seed {seed}" for name, seed in pending]


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    names = list(configurations(96))
    parser.add_argument(
        "--configs",
        nargs="+",
        choices=names,
        metavar="NAME",
        help=f"configurations to run, in this order (default: all; smoke: {' '.join(SMOKE_CONFIGS)}). "
        f"Names: {', '.join(names)}",
    )
    parser.add_argument("--seeds", type=int, help="seeds 0..N-1 per configuration (default 3; smoke 1)")
    parser.add_argument(
        "--fold",
        type=int,
        choices=sorted(FOLDS),
        default=1,
        help="1: train on ct_abdomen (A), score ct_abdomen_dicom (B); 2: train on B, score A (default 1)",
    )
    parser.add_argument("--prepare-only", action="store_true", help="build the --data folder and stop")
    parser.add_argument(
        "--add-to",
        type=Path,
        nargs="+",
        metavar="ACCURACY_JSON",
        help="extend earlier invocations' results (same budget and data; several files are united): their "
        "finished runs are kept in the tables and only the (configuration, seed) pairs they lack are trained",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs trained at once, each in its own process (default 1: one after another, in this process)",
    )
    parser.add_argument(
        "--time-limit",
        type=float,
        metavar="SECONDS",
        help="start no run that would likely end after this many seconds (listed as not run); runs still "
        "training then stop and are scored with the weights reached if past half their steps",
    )
    add_budget_arguments(parser)
    args = parser.parse_args()
    if args.prepare_only:
        if args.data is None:
            parser.error("--prepare-only needs --data FOLDER.")
        return args
    resolve_budget(args, "accuracy")
    args.configs = args.configs or list(SMOKE_CONFIGS if args.smoke else names)
    args.seeds = args.seeds or (1 if args.smoke else 3)
    return args


def _run_one(
    name: str,
    config: Configuration,
    seed: int,
    base: Config,
    args: argparse.Namespace,
    image: Volume,
    reference: Volume,
) -> dict[str, Any]:
    """Train, segment the held-out CT and score one (configuration, seed)."""
    print(f"=== {name} seed {seed}: {config.label}", flush=True)
    run_config = base.with_overrides({**config.overrides, "train.seed": seed})
    bundle, seconds, steps = train_run(run_config, args.work / "runs" / f"{name}-seed{seed}", args.stop_at)
    start = time.perf_counter()
    result = score_bundle(bundle, image, reference, args.device)
    summary = summarise(result)
    unprocessed = summarise(score_bundle(bundle, image, reference, args.device, largest_component=False))
    first_network = (  # a CPS pair: what shipping one of its networks alone would give
        summarise(score_bundle(bundle, image, reference, args.device, ensemble="first"))
        if len(load_bundle(bundle).networks) > 1
        else None
    )
    print(
        f"=== {name} seed {seed}: trained in {seconds:.0f} s, scored in {time.perf_counter() - start:.0f} s: "
        f"mean Dice {summary.mean_dice:.3f}, "
        f"minority {summary.minority_mean_dice:.3f}, mean HD95 {summary.mean_hd95:.1f} mm",
        flush=True,
    )
    return {
        "config": name,
        "seed": seed,
        "machine": machine_name(args.device),
        "overrides": config.overrides,
        "train_seconds": seconds,
        "steps": steps,
        "bundle": bundle.relative_to(args.work).as_posix(),
        "summary": summary._asdict(),
        "scores": result.to_dict(),
        "summary_without_postprocessing": unprocessed._asdict(),
        **({"summary_first_network": first_network._asdict()} if first_network else {}),
    }


def _write_results(outcome: Outcome, configs: dict[str, Configuration], args: argparse.Namespace, out: Path) -> None:
    """accuracy.md, accuracy.json and accuracy.png from the runs so far (rewritten after every run).

    Each file is replaced atomically: accuracy.json may be the very table this invocation extends (``--add-to``),
    and an interrupted write must not lose its earlier runs.
    """
    from scdlcore._atomic import atomic_write, atomic_write_text
    from scdlcore.events import to_jsonable

    runs = outcome.runs
    meta = _meta(args, outcome)
    atomic_write_text(out / "accuracy.json", json.dumps(to_jsonable({**meta, "runs": runs}), indent=1) + "\n")
    if not runs:
        return
    atomic_write_text(out / "accuracy.md", _markdown(runs, configs, meta) + "\n")
    atomic_write(out / "accuracy.png", lambda tmp: _plot(runs, configs, meta, tmp))


def _meta(args: argparse.Namespace, outcome: Outcome) -> dict[str, Any]:
    return {
        "command": portable_command(args),
        "machine": machine_name(args.device),
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "smoke": args.smoke,
        "budget": {
            "steps": args.steps,
            "width": args.width,
            "patch": args.patch,
            "spacing_mm": list(args.spacing),
            "seeds": args.seeds,
            "compile": args.compile,
            "device": str(args.device),
            "jobs": args.jobs,
            "time_limit_s": args.time_limit,
        },
        "data": {
            "fold": args.fold,
            "labeled": _sample(FOLDS[args.fold][0]),
            "unlabeled": ["ct_chest_cta (C)", "ct_chest_nrrd (F)"],
            "test": _sample(FOLDS[args.fold][1]),
            "orientation": "RAS",
            "postprocessing": POSTPROCESSING,
            "reference_labels": "TotalSegmentator model outputs, not manual ground truth",
            "unlabeled_store_spacing_mm": UNLABELED_STORE_SPACING_MM,
        },
        "failed": outcome.failed,
        "not_run": outcome.not_run,
        "earlier": outcome.earlier,
    }


def _sample(name: str) -> str:
    return f"{name} ({SAMPLE_NAMES[name]})"


def _markdown(runs: list[dict[str, Any]], configs: dict[str, Configuration], meta: dict[str, Any]) -> str:
    by_config = _by_config(runs, configs)
    first = runs[0]["summary"]
    organs, minority = list(first["dice"]), first["minority"]
    budget = meta["budget"]
    spacing = " x ".join(f"{s:g}" for s in budget["spacing_mm"])
    seeds = "seed 0" if budget["seeds"] == 1 else f"seeds 0-{budget['seeds'] - 1}"
    data = meta["data"]
    lines = [
        f"# Accuracy on another patient's CT, fold {data['fold']}: train on {data['labeled']}, score {data['test']}",
        "",
        "**Reference labels of both labeled CTs are TotalSegmentator model outputs, not manual "
        "ground truth.**" + (" **Smoke run: tiny budget, the numbers are meaningless.**" if meta["smoke"] else ""),
        "",
        f"- Command: `{meta['command']}`",
        f"- Machine: {meta['machine']}; torch {meta['torch']}; {meta['date']}",
        *(
            f"- Extends (`--add-to`) runs made by `{e['command']}` on {e['machine']}; torch {e['torch']}; {e['date']}"
            for e in meta["earlier"]
        ),
        f"- Budget, the same for every configuration: VNet-{budget['width']}, {budget['steps']} steps, patches of "
        f"{budget['patch']}^3 (2 labeled + 2 unlabeled; supervised and floor: 2 labeled only), spacing {spacing} mm, "
        f"{seeds}, torch.compile {'on' if budget['compile'] and 'cuda' in budget['device'] else 'off'}; "
        "each run's last weights (no model selection).",
        f"- Data: labeled {data['labeled']}; unlabeled ct_chest_cta (C, arterial, stored at "
        f"{UNLABELED_STORE_SPACING_MM:g} mm) and ct_chest_nrrd (F). Test: {data['test']}, another patient, scanner, "
        "axis order and phase, never used in training. Every CT in the canonical RAS orientation before the network.",
        f"- Scores: Dice and HD95 (mm) on the test CT's native grid, from each run's exported bundle "
        "(`scdlcore.inference.predictor.Predictor`). "
        f"Means over the {len(organs)} organs present in its reference; minority organs "
        f"(< 1% of its reference foreground): {', '.join(minority) or 'none'}. HD95 means skip missed organs "
        "(counted in 'missed').",
    ]
    if meta["failed"]:
        lines.append(f"- **Failed or stopped runs** (not in the tables): {'; '.join(meta['failed'])}.")
    if meta["not_run"]:
        lines.append(f"- **Not run** (the time limit left no room): {', '.join(meta['not_run'])}.")
    short = [
        f"{r['config']} seed {r['seed']} at {r['steps']}"
        for r in runs
        if r.get("steps", budget["steps"]) < budget["steps"]
    ]
    if short:
        lines.append(
            f"- **Stopped by the time limit** and scored with the weights reached (steps of {budget['steps']}): "
            f"{', '.join(short)}."
        )
    if min(budget["spacing_mm"]) < UNLABELED_STORE_SPACING_MM:
        lines.append(f"- Note: C was stored at {UNLABELED_STORE_SPACING_MM:g} mm, coarser than this run's spacing.")
    lines += [
        "",
        "## Summary (mean ± std over seeds)",
        "",
        "| configuration | overrides of the base (CPS + GA + SCDL) | seeds | mean Dice | minority Dice "
        "| mean HD95 (mm) | missed organs (per run) | false-positive organs (per run) "
        "| mean Dice - floor (same seed) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, entries in by_config.items():
        summaries = [e["summary"] for e in entries]
        mean = [s["mean_dice"] for s in summaries]
        over_floor = [a["mean_dice"] - b["mean_dice"] for a, b in _paired(by_config, name, "floor")]
        overrides = (
            ", ".join(f"`{k}={json.dumps(v)}`" for k, v in configs[name].overrides.items()) or "(none: the base)"
        )
        lines.append(
            f"| {configs[name].label} | {overrides} | {len(entries)} | {format_mean_std(mean)} | "
            f"{format_mean_std([s['minority_mean_dice'] for s in summaries])} | "
            f"{format_mean_std([s['mean_hd95'] for s in summaries], 1)} | "
            f"{np.mean([len(s['missed']) for s in summaries]):.1f} | "
            f"{np.mean([len(s['false_positives']) for s in summaries]):.1f} | "
            f"{format_mean_std(over_floor, signed=True) if name != 'floor' else '-'} |"
        )
    lines += [
        "",
        "## Dice per organ (mean ± std over seeds; * minority organ)",
        "",
        *_organ_table(by_config, configs, organs, minority, "dice", 3),
    ]
    lines += [
        "",
        "## HD95 per organ, mm (mean over the seeds that found the organ; - never found)",
        "",
        *_organ_table(by_config, configs, organs, minority, "hd95", 1),
    ]
    lines += [
        "",
        "## Paired differences (same seed), mean ± std over seeds",
        "",
        "| comparison | seeds | mean Dice | minority Dice | reading |",
        "|---|---|---|---|---|",
    ]
    for name, other, what in COMPARISONS:
        pairs = _paired(by_config, name, other)
        if not pairs:
            continue
        dice = [a["mean_dice"] - b["mean_dice"] for a, b in pairs]
        minor = [a["minority_mean_dice"] - b["minority_mean_dice"] for a, b in pairs]
        lines.append(
            f"| {what} | {len(pairs)} | {format_mean_std(dice, signed=True)} | "
            f"{format_mean_std(minor, signed=True)} | {_reading(dice)} |"
        )
    lines += _same_bundle_rows(
        runs,
        "summary_without_postprocessing",
        f"the predictor's postprocessing ({POSTPROCESSING}) over none, same bundles (every run",
    )
    lines += _same_bundle_rows(
        runs, "summary_first_network", "the CPS pair's mean over its first network alone, same bundles (CPS runs"
    )
    return "\n".join(lines)


def _same_bundle_rows(runs: list[dict[str, Any]], key: str, what: str) -> list[str]:
    """The paired-differences row of the shipped scoring over another scoring (``key``) of the same bundles."""
    scored = [r for r in runs if key in r]
    if not scored:
        return []
    dice = [r["summary"]["mean_dice"] - r[key]["mean_dice"] for r in scored]
    minor = [r["summary"]["minority_mean_dice"] - r[key]["minority_mean_dice"] for r in scored]
    hd95 = [r["summary"]["mean_hd95"] - r[key]["mean_hd95"] for r in scored]
    return [
        f"| {what}; mean HD95 {format_mean_std(hd95, 1, signed=True)} mm) | {len(dice)} | "
        f"{format_mean_std(dice, signed=True)} | {format_mean_std(minor, signed=True)} | {_reading(dice)} |"
    ]


def _organ_table(
    by_config: dict[str, list[dict[str, Any]]],
    configs: dict[str, Configuration],
    organs: list[str],
    minority: list[str],
    key: str,
    digits: int,
) -> list[str]:
    header = " | ".join(name + ("*" if name in minority else "") for name in organs)
    lines = [f"| configuration | {header} |", "|---|" + "---|" * len(organs)]
    for name, entries in by_config.items():
        cells = [format_mean_std([e["summary"][key][organ] for e in entries], digits) for organ in organs]
        lines.append(f"| {configs[name].label} | " + " | ".join(cells) + " |")
    return lines


def _reading(differences: list[float]) -> str:
    """Plain words for a paired difference: is it outside the seed-to-seed spread?"""
    if len(differences) < 2:
        return "one seed: no spread to judge it by"
    mean, std = float(np.mean(differences)), float(np.std(differences, ddof=1))
    if abs(mean) <= std:
        return "within one std of zero: not distinguishable from seed noise"
    return ("better" if mean > 0 else "worse") + f" by more than one std ({len(differences)} seeds)"


def _plot(runs: list[dict[str, Any]], configs: dict[str, Configuration], meta: dict[str, Any], path: Path) -> None:
    """Grouped bars: Dice per organ present in the held-out CT (and the two means).

    One bar per configuration (up to 20 distinct colours), std as error bars; the legend sits below the bars so
    that it hides none of them.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_config = _by_config(runs, configs)
    first = runs[0]["summary"]
    groups = [*first["dice"], "mean", "minority mean"]

    def values(entry: dict[str, Any], group: str) -> float:
        summary = entry["summary"]
        return {"mean": summary["mean_dice"], "minority mean": summary["minority_mean_dice"]}.get(
            group, summary["dice"].get(group, math.nan)
        )

    legend_rows = math.ceil(len(by_config) / 2)
    figure, axes = plt.subplots(figsize=(max(9.0, 1.2 * len(groups)), 5 + 0.16 * legend_rows))
    colours = plt.get_cmap("tab20").colors
    width = 0.8 / len(by_config)
    x = np.arange(len(groups))
    for index, (name, entries) in enumerate(by_config.items()):
        per_group = [[v for entry in entries if not math.isnan(v := values(entry, group))] for group in groups]
        means = [np.mean(v) if v else 0.0 for v in per_group]
        stds = [np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in per_group] if len(entries) > 1 else None
        axes.bar(
            x + (index - (len(by_config) - 1) / 2) * width,
            means,
            width,
            yerr=stds,
            capsize=2,
            color=colours[index % len(colours)],
            label=configs[name].label,
        )
    axes.set_xticks(x, [g.replace("_", " ") for g in groups], rotation=30, ha="right", fontsize=8)
    axes.set(ylim=(0, 1), ylabel="Dice on the held-out CT (native grid)")
    axes.set_title(
        f"Fold {meta['data']['fold']}: trained on {meta['data']['labeled']}, Dice on {meta['data']['test']} "
        f"(TotalSegmentator reference labels) - {meta['machine']}",
        fontsize=9,
    )
    figure.legend(*axes.get_legend_handles_labels(), loc="lower center", fontsize=7, ncol=2, frameon=False)
    figure.tight_layout(rect=(0, 0.035 * legend_rows, 1, 1))
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _by_config(runs: list[dict[str, Any]], configs: dict[str, Configuration]) -> dict[str, list[dict[str, Any]]]:
    """The runs of each configuration that has any, in the order of :func:`configurations` (tables read the same
    whichever invocation trained which run)."""
    grouped = {name: [run for run in runs if run["config"] == name] for name in configs}
    return {name: entries for name, entries in grouped.items() if entries}


def _paired(by_config: dict[str, list[dict[str, Any]]], name: str, other: str) -> list[tuple[dict, dict]]:
    """Summaries of ``name`` and ``other`` with the same seed."""
    others = {e["seed"]: e["summary"] for e in by_config.get(other, [])}
    return [(e["summary"], others[e["seed"]]) for e in by_config.get(name, []) if e["seed"] in others]


def _token_grid(patch_edge: int, per_96: int) -> int:
    """SCDL tokens per axis for a patch edge, keeping the token size of ``per_96`` tokens on a 96-voxel patch."""
    return max(1, round(patch_edge * per_96 / 96))


def _build_data(folder: Path) -> None:
    """Write the data folder (see :class:`BenchData`) from the fetched samples; the manifest goes last."""
    from scdlcore.io.read import read_image
    from scdlcore.io.write import write_image
    from scdlcore.sample_data import fetch_all

    samples = fetch_all()
    print(f"Building the benchmark data folder {folder} from the sample CTs ...", flush=True)
    for name in CARRIED_SAMPLES:
        shutil.copytree(
            samples[name].image.parent, folder / "samples" / name
        )  # the cache entry: files, manifest, licence
    cta = samples["ct_chest_cta"]
    write_image(folder / CTA_FILE, _coarsened(read_image(cta.image)))
    shutil.copyfile(cta.image.parent / "LICENSE", folder / "LICENSE-ct_chest_cta")
    manifest = {
        "format": DATA_FORMAT,
        "version": 1,
        "test_sample": TEST_SAMPLE,
        "cases": {name: samples[name].description for name in (*CARRIED_SAMPLES, "ct_chest_cta")},
        "ct_chest_cta": f"{CTA_FILE}: resampled to {UNLABELED_STORE_SPACING_MM:g} mm (linear), int16 HU",
        "reference_labels": "TotalSegmentator model outputs, not manual ground truth",
    }
    (folder / DATA_MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")


def _coarsened(image: Volume) -> Volume:
    """``image`` resampled (linear) so that no axis is finer than UNLABELED_STORE_SPACING_MM, as int16 HU."""
    from scdlcore.preprocess import resample_to_spacing

    spacing = [max(s, UNLABELED_STORE_SPACING_MM) for s in image.spacing]
    coarse = resample_to_spacing(image, spacing, is_label=False)
    return coarse.with_array(np.round(coarse.array).astype(np.int16))


def _folder_mib(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


if __name__ == "__main__":
    main()
