"""Progress reporting: one source for the CLI's tqdm bar and the GUI's JSON-lines events.

Long operations call :meth:`Progress.update` and :meth:`Progress.emit`; with ``json_lines=True``
every call writes one JSON object per line to the stream (stdout by default, flushed at once,
so a parent process reading the pipe sees it immediately); otherwise a tqdm bar is shown on
stderr and notable events are logged. Every event carries ``"protocol": PROTOCOL_VERSION``.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Mapping
from typing import IO, Any

__all__ = ["PROTOCOL_VERSION", "Progress", "to_jsonable", "write_event"]

PROTOCOL_VERSION = 1
_log = logging.getLogger("scdl")


class Progress:
    """Reports the progress of one operation.

    Args:
        total: number of units (steps) of the whole operation, for the bar and the ETA.
        stage: name of the current stage (``"train"``, ``"infer"``...).
        json_lines: emit JSON lines instead of showing a bar.
        stream: where JSON lines go (default ``sys.stdout``).
        request_id: copied into every event (the worker's request id), or None.
        enabled: False silences everything (non-zero DDP ranks).
        initial: units already done (a resumed run).
        context: fields copied into every JSON event (which case of a batch it is about).
    """

    def __init__(
        self,
        total: int,
        stage: str,
        *,
        json_lines: bool = False,
        stream: IO[str] | None = None,
        request_id: str | None = None,
        enabled: bool = True,
        initial: int = 0,
        context: Mapping[str, Any] | None = None,
    ) -> None:
        self.total, self.stage, self.json_lines = total, stage, json_lines
        self.stream = stream or sys.stdout
        self.request_id, self.enabled = request_id, enabled
        self.context = dict(context or {})
        self.done = initial
        self._start_time, self._start_done = time.monotonic(), initial
        self._bar = None
        if enabled and not json_lines:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=stage, unit="step", dynamic_ncols=True, file=sys.stderr)

    def eta_seconds(self) -> float | None:
        elapsed, advanced = time.monotonic() - self._start_time, self.done - self._start_done
        return None if advanced <= 0 else elapsed / advanced * (self.total - self.done)

    def update(self, done: int, **fields: Any) -> None:
        """Set progress to ``done`` units and report ``fields`` (losses, lr...) with it."""
        advance, self.done = done - self.done, done
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(advance)
            if fields:
                self._bar.set_postfix(_short(fields), refresh=False)
        else:
            eta = self.eta_seconds()
            self.emit(
                "progress",
                step=done,
                total=self.total,
                progress=done / max(self.total, 1),
                eta_s=None if eta is None else round(eta, 1),
                **fields,
            )

    def emit(self, event: str, **fields: Any) -> None:
        """Report a notable event (``validation``, ``result``, ``error``...)."""
        if not self.enabled:
            return
        if self.json_lines:
            write_event(self.stream, self.request_id, event, stage=self.stage, **self.context, **fields)
        elif event != "progress":
            message = fields.get("message") or ", ".join(f"{k}={v}" for k, v in _short(fields).items())
            if self._bar is not None:
                self._bar.write(
                    f"[{event}] {message}", file=sys.stderr
                )  # where the bar is, so neither garbles the other
            else:
                _log.info("[%s] %s", event, message)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def write_event(stream: IO[str], request_id: str | None, event: str, **fields: Any) -> None:
    """One JSON-lines event record, the protocol's only shape: ``{"protocol", "id", "event", **fields}``."""
    record = {"protocol": PROTOCOL_VERSION, "id": request_id, "event": event, **fields}
    stream.write(json.dumps(to_jsonable(record)) + "\n")
    stream.flush()


def to_jsonable(value: Any) -> Any:
    """Floats rounded to 6 significant digits, NaN/inf as null, numpy/torch scalars as Python numbers."""
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, float):
        return None if not math.isfinite(value) else float(f"{value:.6g}")
    return value


def _short(fields: Mapping[str, Any]) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in fields.items():
        if isinstance(value, Mapping):
            flat.update({f"{key}.{k}" if key != "losses" else k: v for k, v in value.items()})
        else:
            flat[key] = value
    return {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in flat.items()}
