"""The command lines and environment that start the ``scdl`` engine as a child process.

In Slicer the engine runs as ``PythonSlicer -m scdlcore <command>`` (the same as the ``scdl``
console script), so it uses Slicer's Python and packages but never Slicer's process. Tests point
:class:`EngineCommand` at a stand-in script that speaks the same protocol.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .settings import Device

__all__ = ["MODELS_DIR_ENV", "EngineCommand", "default_python"]

#: Environment variable naming the engine's model registry folder (see ``scdlcore.bundle``).
MODELS_DIR_ENV = "SCDL_MODELS_DIR"


@dataclass(frozen=True)
class EngineCommand:
    """How to start the engine.

    Attributes:
        python: the Python executable (in Slicer: PythonSlicer, see :func:`default_python`).
        entry: arguments after ``python`` that reach the ``scdl`` command line, ``("-m", "scdlcore")``.
        python_path: folders prepended to ``PYTHONPATH`` (where the bundled ``scdlcore`` package lives).
        model_dir: model registry folder passed as ``SCDL_MODELS_DIR``; empty = the engine's default.
    """

    python: str
    entry: tuple[str, ...] = ("-m", "scdlcore")
    python_path: tuple[str, ...] = ()
    model_dir: str = ""

    def environment(self, base: Mapping[str, str]) -> dict[str, str]:
        """The child's environment: ``base`` plus the package path, the model folder and unbuffered output."""
        env = dict(base)
        if self.python_path:
            env["PYTHONPATH"] = os.pathsep.join([*self.python_path, *filter(None, [env.get("PYTHONPATH", "")])])
        if self.model_dir:
            env[MODELS_DIR_ENV] = self.model_dir
        env["PYTHONUNBUFFERED"] = "1"  # progress lines must reach the panel as they are printed
        env["PYTHONIOENCODING"] = "utf-8"
        return env

    def worker(self, model: str, device: Device) -> list[str]:
        """``scdl worker --model NAME --device auto|cuda|cpu``: the long-lived inference process."""
        return self._scdl("worker", "--model", _required(model, "model"), "--device", device.value)

    def finetune(self, dataset: str | os.PathLike, model: str, steps: int | None, device: Device) -> list[str]:
        """``scdl finetune --dataset DIR --model NAME [--steps N] --device D --events``: JSON-lines progress on stdout.

        ``steps`` None leaves the step count to the engine, which picks the default of the device it runs on.
        """
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
            raise ValueError(f"Fine-tuning steps must be a whole number >= 1, got {steps!r}.")
        step_args = [] if steps is None else ["--steps", str(steps)]
        return self._scdl(
            "finetune",
            "--dataset",
            _folder(dataset),
            "--model",
            _required(model, "model"),
            *step_args,
            "--device",
            device.value,
            "--events",
        )

    def models_list(self) -> list[str]:
        return self._scdl("models", "list", "--json")

    def models_info(self, model: str) -> list[str]:
        """``scdl models info NAME --json``: a model's full description (labels, spacing, lineage, metrics)."""
        return self._scdl("models", "info", _required(model, "model"), "--json")

    def models_import(self, path: str | os.PathLike) -> list[str]:
        """``scdl models import PATH --json``: copy a bundle (folder or ``.scdlmodel`` archive) into the registry."""
        return self._scdl("models", "import", _required(str(path), "model bundle path"), "--json")

    def dataset_list(self, dataset: str | os.PathLike) -> list[str]:
        return self._scdl("dataset", "list", _folder(dataset), "--json")

    def dataset_suggest(self, dataset: str | os.PathLike, model: str, device: Device) -> list[str]:
        """``scdl dataset suggest DIR --model NAME --device D --top 1 --json``: the unlabeled case whose
        correction would help ``model`` most."""
        return self._scdl(
            "dataset",
            "suggest",
            _folder(dataset),
            "--model",
            _required(model, "model"),
            "--device",
            device.value,
            "--top",
            "1",
            "--json",
        )

    def sample_data(self, name: str) -> list[str]:
        """``scdl sample-data NAME --json``: fetch a public sample CT into the engine's cache (once) and
        print ``[{"name", "image", "label", "licence"}]``."""
        return self._scdl("sample-data", _required(name, "sample name"), "--json")

    def _scdl(self, *args: str) -> list[str]:
        return [self.python, *self.entry, *args]


def default_python() -> str:
    """PythonSlicer, the interpreter for the engine's child processes in Slicer (it sets up Slicer's Python
    environment). Outside Slicer, pass ``EngineCommand(python=...)`` instead.

    Raises:
        RuntimeError: PythonSlicer is not on the PATH (inside Slicer ``sys.executable`` is Slicer itself,
            so there is no fallback).
    """
    found = shutil.which("PythonSlicer")
    if found is None:
        raise RuntimeError(
            "PythonSlicer, Slicer's Python launcher, was not found on the PATH, so the SCDL engine cannot start. "
            "Start Slicer with its own launcher (the Slicer executable), or reinstall Slicer."
        )
    return found


def _required(value: str, what: str) -> str:
    if not value:
        raise ValueError(f"No {what} given.")
    return value


def _folder(path: str | os.PathLike) -> str:
    if not str(path):
        raise ValueError("No dataset folder given: choose one under 'Setup and advanced'.")
    return str(Path(path).expanduser())
