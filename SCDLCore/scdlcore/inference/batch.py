"""Segmenting many CTs with one loaded model: output names, per-case failures, resuming, the volumes table.

``scdl segment CT1 CT2 ... -o FOLDER`` plans one :class:`BatchCase` per CT with :func:`plan_cases` and
runs them with :func:`segment_cases`:

- the model is loaded once; each CT is read, segmented and written in turn, so memory holds one CT;
- a CT that cannot be read or segmented is reported as failed and the next one goes on;
- with ``skip_existing``, a run started again after an interruption keeps the outputs that exist
  (they are complete: every write is atomic) and reads their organ volumes back;
- :func:`write_volumes_csv` writes every case's organ volumes as one table.

Example::

    cases = plan_cases(["a.nii.gz", "dicom/patient2"], "results")   # results/a.seg.nrrd, results/patient2.seg.nrrd
    for result in segment_cases(predictor, cases, skip_existing=True):
        print(result.case.input, result.status, result.volumes_ml.get("liver"))
"""

from __future__ import annotations

import csv
import io as text_io
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from scdlcore._atomic import atomic_write_text
from scdlcore.events import Progress
from scdlcore.inference.predictor import InferenceCancelled, Predictor, organ_volumes_ml
from scdlcore.io.files import WRITE_SUFFIXES, case_name
from scdlcore.io.read import read_image
from scdlcore.io.segnrrd import read_label_map
from scdlcore.io.write import write_label
from scdlcore.labels import LabelTable
from scdlcore.visualize.overview import save_overview

__all__ = ["BatchCase", "CaseResult", "overview_path", "plan_cases", "segment_cases", "write_volumes_csv"]


@dataclass(frozen=True)
class BatchCase:
    """One CT of a batch and where its results go (not a dataset case: see scdlcore.dataset.manifest.Case).

    Attributes:
        input: CT file or DICOM series folder.
        output: label map or ``.seg.nrrd`` to write.
        overview: PNG montage to write, or None.
    """

    input: Path
    output: Path
    overview: Path | None = None


@dataclass
class CaseResult:
    """What became of one case.

    Attributes:
        case: the case.
        status: ``"segmented"``, ``"skipped"`` (its output existed) or ``"failed"``.
        seconds: time spent on it.
        volumes_ml: organ volumes in mL, every organ of the label table (empty when failed).
        error: why it failed (its message names the file), else None.
    """

    case: BatchCase
    status: str
    seconds: float = 0.0
    volumes_ml: dict[str, float] = field(default_factory=dict)
    error: Exception | None = None


def overview_path(output: str | os.PathLike) -> Path:
    """The overview PNG next to a label output: ``out/ct_001.seg.nrrd`` -> ``out/ct_001_overview.png``."""
    output = Path(output)
    return output.with_name(f"{case_name(output)}_overview.png")


def plan_cases(
    inputs: Sequence[str | os.PathLike],
    folder: str | os.PathLike,
    *,
    suffix: str = ".seg.nrrd",
    overviews: bool = False,
) -> list[BatchCase]:
    """One case per input, written into ``folder`` as ``<name><suffix>`` (and ``<name>_overview.png``).

    Raises:
        ValueError: an unsupported ``suffix``, or two inputs with the same name (they would overwrite
            each other's output; the message names both).
    """
    if suffix not in WRITE_SUFFIXES:
        raise ValueError(f"Cannot write label maps as {suffix!r}; use one of {', '.join(WRITE_SUFFIXES)}.")
    folder = Path(folder)
    first_by_output: dict[Path, Path] = {}
    cases = []
    for source in map(Path, inputs):
        output = folder / f"{case_name(source)}{suffix}"
        if output in first_by_output:
            raise ValueError(
                f"Inputs {first_by_output[output]} and {source} would both be written to {output}. "
                "Rename one, or segment them into different folders."
            )
        first_by_output[output] = source
        cases.append(BatchCase(source, output, overview_path(output) if overviews else None))
    return cases


def segment_cases(
    predictor: Predictor,
    cases: Sequence[BatchCase],
    *,
    organs: Sequence[str] | None = None,
    skip_existing: bool = False,
    progress: Callable[[int, BatchCase], Progress] | None = None,
    cancel: threading.Event | None = None,
) -> Iterator[CaseResult]:
    """Segment the cases in turn, yielding each one's result as soon as it is written.

    Args:
        predictor: the loaded model.
        cases: what to segment and where to write it.
        organs: machine names of the organs to keep; None = all.
        skip_existing: keep an output that exists, reading its volumes back, instead of segmenting again.
        progress: makes the progress reporter of case ``index``; closed when the case ends.
        cancel: set it to stop; the case being segmented is abandoned (nothing of it is written).

    Raises:
        ValueError: an output would overwrite one of the input CTs (checked before any work).
        InferenceCancelled: ``cancel`` was set. Any other failure is a ``"failed"`` result.
    """
    _check_inputs_kept(cases)
    table = predictor.bundle.labels
    for index, case in enumerate(cases):
        start = time.monotonic()
        reporter = None
        try:
            if skip_existing and case.output.exists():
                volumes = _existing_volumes(case.output, table)
                yield CaseResult(case, "skipped", time.monotonic() - start, volumes)
                continue
            image = read_image(case.input)
            reporter = progress(index, case) if progress else None
            labels = predictor.predict_volume(image, organs=organs, progress=reporter, cancel=cancel)
            write_label(case.output, labels, table)
            if case.overview is not None:
                save_overview(case.overview, image, labels, table)
        except InferenceCancelled:
            raise
        except Exception as err:  # one bad CT must not stop the others; the error names the file
            yield CaseResult(case, "failed", time.monotonic() - start, error=err)
            continue
        finally:
            if reporter is not None:
                reporter.close()
        yield CaseResult(case, "segmented", time.monotonic() - start, organ_volumes_ml(labels, table))


def write_volumes_csv(path: str | os.PathLike, results: Sequence[CaseResult], organs: Sequence[str]) -> Path:
    """Write one row per case: name, input, output, status, seconds, error, then ``<organ>_ml`` columns.

    Written atomically, so a run can rewrite it after every case and an interrupted run leaves a
    complete table of the cases done.
    """
    buffer = text_io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["case", "input", "output", "status", "seconds", "error", *(f"{organ}_ml" for organ in organs)])
    for result in results:
        volumes = [f"{result.volumes_ml[organ]:.3f}" if result.volumes_ml else "" for organ in organs]
        error = "" if result.error is None else str(result.error)
        writer.writerow(
            [
                case_name(result.case.input),
                result.case.input,
                result.case.output,
                result.status,
                f"{result.seconds:.2f}",
                error,
                *volumes,
            ]
        )
    return atomic_write_text(path, buffer.getvalue())


def _check_inputs_kept(cases: Sequence[BatchCase]) -> None:
    """Refuse outputs that are input CTs (``-o`` into the scans' own folder with their file type)."""
    inputs = {case.input.resolve() for case in cases}
    for case in cases:
        for path in filter(None, (case.output, case.overview)):
            if path.resolve() in inputs:
                raise ValueError(
                    f"{path} is one of the input CTs; writing a segmentation there would destroy it. "
                    "Write the outputs to another file or folder."
                )


def _existing_volumes(output: Path, table: LabelTable) -> dict[str, float]:
    try:
        labels = read_label_map(output, table)
    except ValueError as err:
        raise ValueError(f"{err} The existing output was kept; delete it to segment this CT again.") from err
    return organ_volumes_ml(labels, table)
