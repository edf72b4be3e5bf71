"""A stand-in for the ``scdl`` engine that speaks its JSON protocols, for the panel's tests.

This is NOT the engine: it is a small, real child process the tests start instead of
``python -m scdlcore``, so the panel's process runner, worker client and logic are exercised
against real pipes, real JSON lines and real process trees, in well under a second, without
torch. It reads and writes real NRRD files (pynrrd) and keeps its registry and dataset as JSON.

Commands (the same command lines as ``scdl``):
    worker --model M --device D        protocol version 1 on stdin/stdout (``segment``, ``add_case``,
                                       ``status``, ``cancel``, ``shutdown``); jobs queue and run one at a
                                       time, as in the engine
    finetune --dataset D --model M --steps N --events
    models list --json | models info NAME --json | models import PATH --json
    dataset list DIR --json | dataset suggest DIR --model M --device D --top 1 --json
    spawn-tree                         starts a grandchild, prints both pids, then sleeps (tree-kill test)

Behaviour switches, through the model name:
    "slow"     segment takes many small steps and honours cancel between them
    "stuck"    segment never finishes and ignores cancel (the client must kill the tree)
    "crash"    segment (or finetune) dies with a traceback on stderr
and through the environment: ``FAKE_ENGINE_PROTOCOL`` overrides the protocol version it announces.

Segmentation rule (so tests can predict the result): voxels above 150 HU become liver (6),
voxels in (50, 150] spleen (1); everything else background.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import nrrd
import numpy as np

LIVER, SPLEEN = 6, 1
ORGAN_NAMES = {LIVER: "liver", SPLEEN: "spleen"}
ORGAN_COUNT = 13  # the panel's label table, Synapse-13: a case is fully labeled when all 13 are reviewed


_STDOUT_LOCK = threading.Lock()


def emit(event: dict) -> None:
    """One event = one line, written whole: the worker's threads must not interleave their lines."""
    with _STDOUT_LOCK:
        sys.stdout.write(json.dumps(event) + "\n")
        sys.stdout.flush()


def registry_file() -> Path:
    return Path(os.environ["SCDL_MODELS_DIR"]) / "fake_registry.json"


def read_registry() -> list[dict]:
    path = registry_file()
    models = [
        {
            "name": "starter",
            "version": 1,
            "ref": "starter@1",
            "builtin": True,
            "description": "Starter model",
            "spacing": [1.5, 1.5, 3.0],
            "lineage": {"parent": None},
            "metrics": {"mean_dice": 0.5},
        }
    ]
    if path.is_file():
        models += json.loads(path.read_text())
    return models


def write_registry(entries: list[dict]) -> None:
    path = registry_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([entry for entry in entries if not entry.get("builtin")]))


def manifest(dataset: Path) -> dict:
    path = dataset / "dataset.json"
    return json.loads(path.read_text()) if path.is_file() else {"cases": []}


# ----------------------------------------------------------------------------- worker


class Worker:
    def __init__(self, model: str, device: str) -> None:
        self.model, self.device = model, device
        self.cancelled: set[str] = set()
        self.lock = threading.Lock()
        self.jobs: queue.Queue[dict] = queue.Queue()
        self.running: str | None = None

    def run(self) -> None:
        emit(
            {
                "protocol": int(os.environ.get("FAKE_ENGINE_PROTOCOL", 1)),
                "id": None,
                "event": "ready",
                "model": f"{self.model}@1",
                "device": "cpu" if self.device != "cuda" else "cuda",
                "torch": "2.13.0",
                "cuda": False,
                "gpu": None,
                "gpu_memory_gb": None,
            }
        )
        print("fake worker ready", file=sys.stderr, flush=True)
        threading.Thread(target=self.run_jobs, daemon=True).start()
        for line in sys.stdin:
            request = json.loads(line)
            command, request_id = request["command"], request["id"]
            if command == "shutdown":
                emit({"id": request_id, "event": "result"})
                return
            if command == "cancel":
                if self.model != "stuck":
                    with self.lock:
                        self.cancelled.add(request["target"])
                emit({"id": request_id, "event": "result"})
            elif command == "status":
                emit({"id": request_id, "event": "result", "model": f"{self.model}@1", "busy": self.running})
            elif command in ("segment", "add_case"):
                self.jobs.put(request)
            else:
                emit({"id": request_id, "event": "error", "message": f"unknown command {command}"})

    def run_jobs(self) -> None:
        while True:
            request = self.jobs.get()
            with self.lock:
                if request["id"] in self.cancelled:  # cancelled while it waited
                    emit({"id": request["id"], "event": "cancelled"})
                    continue
                self.running = request["id"]
            (self.segment if request["command"] == "segment" else self.add_case)(request)
            self.running = None

    def segment(self, request: dict) -> None:
        request_id = request["id"]
        if self.model == "crash":
            print(
                "Traceback (most recent call last):\nRuntimeError: CUDA out of memory (simulated)",
                file=sys.stderr,
                flush=True,
            )
            os._exit(3)
        steps = 50 if self.model in ("slow", "stuck") else 1
        for stage in ("load", "preprocess", "infer", "postprocess"):
            for step in range(steps):
                if self.model == "stuck":
                    time.sleep(0.05)
                    continue
                with self.lock:
                    if request_id in self.cancelled:
                        emit({"id": request_id, "event": "cancelled"})
                        return
                emit(
                    {
                        "id": request_id,
                        "event": "progress",
                        "stage": stage,
                        "progress": (step + 1) / steps,
                        "message": stage,
                    }
                )
                if steps > 1:
                    time.sleep(0.02)
        image, header = nrrd.read(request["input"], index_order="C")
        labels = np.zeros(image.shape, dtype=np.uint8)
        labels[(image > 50) & (image <= 150)] = SPLEEN
        labels[image > 150] = LIVER
        organs = request.get("organs")
        if organs:
            for value, name in ORGAN_NAMES.items():
                if name not in organs:
                    labels[labels == value] = 0
        out_header = {key: header[key] for key in ("space", "space directions", "space origin") if key in header}
        nrrd.write(request["output"], labels, out_header, index_order="C")
        voxel_ml = abs(np.linalg.det(np.asarray(header["space directions"], dtype=float))) / 1000.0
        volumes = {name: float(np.count_nonzero(labels == value) * voxel_ml) for value, name in ORGAN_NAMES.items()}
        emit({"id": request_id, "event": "progress", "stage": "write", "progress": 1.0, "message": "write"})
        result = {
            "output": request["output"],
            "volumes_ml": volumes,
            "organs_found": sum(v > 0 for v in volumes.values()),
            "seconds": 0.1,
        }
        if request.get("collect"):  # keep the CT as an unlabeled case, once
            same = same_ct(Path(request["collect"]), request["input"])
            case_id = same["id"] if same else store_case(Path(request["collect"]), {"image": request["input"]})[0]
            result["collected"] = {
                "case_id": case_id,
                "new": same is None,
                "status": "labeled" if same and same["label"] else "unlabeled",
            }
        emit({"id": request_id, "event": "result", **result})

    def add_case(self, request: dict) -> None:
        """One CT is one case (as in the real store): the same voxels with a label update that case."""
        same = same_ct(Path(request["dataset"]), request["image"])
        if same is not None and not request.get("label"):
            emit(
                {
                    "id": request["id"],
                    "event": "error",
                    "message": f"The dataset already holds this CT as {same['id']}.",
                }
            )
            return
        case_id, labeled = store_case(Path(request["dataset"]), request, same)
        previous = None if same is None else "labeled" if same["label"] else "unlabeled"
        emit({"id": request["id"], "event": "result", "case_id": case_id, "labeled": labeled, "previous": previous})


def _digest(image: str) -> str:
    """The same voxels in any axis order give the same digest (the real store compares them in the canonical
    orientation; Slicer re-orders a left-handed CT): here, the sorted shape and the sorted voxel values."""
    array = nrrd.read(image)[0]
    digest = hashlib.sha256(str(sorted(array.shape)).encode())
    digest.update(np.sort(array, axis=None).data)
    return digest.hexdigest()


def same_ct(dataset: Path, image: str) -> dict | None:
    """The case of the dataset holding this CT's voxels, or None."""
    digest = _digest(image)
    return next((case for case in manifest(dataset)["cases"] if case["sha256"] == digest), None)


def store_case(dataset: Path, request: dict, same: dict | None = None) -> tuple[str, bool]:
    """Store the request's image (and label) as a new case, or as ``same`` updated; returns (id, labeled)."""
    data = manifest(dataset)
    case_id = same["id"] if same else f"case{len(data['cases']) + 1:03d}"
    folder = dataset / case_id
    folder.mkdir(parents=True, exist_ok=True)
    image = shutil.copy(request["image"], folder / "image.nrrd")
    label = shutil.copy(request["label"], folder / "label.nrrd") if request.get("label") else None
    entry = {
        "id": case_id,
        "image": str(image),
        "label": None if label is None else str(label),
        "reviewed": request.get("reviewed", []),
        "sha256": _digest(request["image"]),
    }
    data["cases"] = [case for case in data["cases"] if case["id"] != case_id] + [entry]
    (dataset / "dataset.json").write_text(json.dumps(data))
    return case_id, label is not None


# ----------------------------------------------------------------------------- one-shot commands


def finetune(args: argparse.Namespace) -> int:
    if args.model == "crash":
        print("Traceback (most recent call last):\nRuntimeError: fake finetune failure", file=sys.stderr, flush=True)
        return 1
    cases = manifest(Path(args.dataset))["cases"]
    if not any(case["label"] for case in cases):
        emit({"event": "error", "message": f"No reviewed case in {args.dataset}: submit at least one."})
        return 2
    for step in range(1, args.steps + 1):
        emit(
            {
                "event": "progress",
                "stage": "train",
                "step": step,
                "total": args.steps,
                "losses": {"total": 1.0 / step, "dice": 0.5 / step},
                "lr": 1e-4,
                "eta_s": 0.01 * (args.steps - step),
            }
        )
        time.sleep(float(os.environ.get("FAKE_ENGINE_STEP_S", "0")))
    emit({"event": "validation", "step": args.steps, "dice": {"liver": 0.9, "spleen": 0.8}, "mean_dice": 0.85})
    entries = read_registry()
    name = args.model.split("@")[0]
    version = max(entry["version"] for entry in entries if entry["name"] == name) + 1
    entries.append(
        {
            "name": name,
            "version": version,
            "ref": f"{name}@{version}",
            "builtin": False,
            "lineage": {"parent": args.model, "steps": args.steps},
            "metrics": {"mean_dice": 0.85},
        }
    )
    write_registry(entries)
    worse = bool(os.environ.get("FAKE_ENGINE_FINETUNE_WORSE"))  # a run that did not beat its parent
    verdict = {
        "better": not worse,
        "summary": "Not better than its parent (mean Dice 0.650 -> 0.650 on the training "
        "cases): the new version keeps the parent's weights."
        if worse
        else "Better than its parent: mean Dice 0.650 -> 0.850 on the training cases.",
    }
    emit(
        {
            "event": "result",
            "model": f"{name}@{version}",
            "before": {"liver": 0.7, "spleen": 0.6},
            "after": {"liver": 0.7, "spleen": 0.6} if worse else {"liver": 0.9, "spleen": 0.8},
            "verdict": verdict,
        }
    )
    return 0


def models(args: argparse.Namespace) -> int:
    entries = read_registry()
    if args.action == "list":
        print(
            json.dumps(
                [
                    {key: entry[key] for key in ("name", "version", "ref", "builtin", "description") if key in entry}
                    for entry in entries
                ],
                indent=2,
            )
        )
    elif args.action == "info":
        entry = next((e for e in entries if args.path in (e["ref"], e["name"])), None)
        if entry is None:
            print(f"scdl models: error: No model {args.path!r}", file=sys.stderr)
            return 2
        print(json.dumps({key: value for key, value in entry.items() if key not in ("ref", "builtin")}, indent=2))
    else:
        source = json.loads(Path(args.path).read_text())
        entries.append({**source, "ref": f"{source['name']}@{source['version']}", "builtin": False})
        write_registry(entries)
        print(json.dumps({"ref": entries[-1]["ref"], "path": str(registry_file().parent / source["name"])}))
    return 0


def dataset(args: argparse.Namespace) -> int:
    cases = manifest(Path(args.dir))["cases"]
    if args.action == "list":
        statuses = [status(case) for case in cases]
        print(
            json.dumps(
                {"counts": {name: statuses.count(name) for name in ("labeled", "partial", "unlabeled")}, "cases": cases}
            )
        )
    else:
        unlabeled = [case for case in cases if not case["label"]]
        print(
            json.dumps(
                {
                    "model": f"{args.model}@1",
                    "suggestions": [
                        {
                            "case_id": case["id"],
                            "image": case["image"],
                            "score": 0.5,
                            "measure": "entropy",
                            "organs": {},
                            "reason": "most uncertain",
                        }
                        for case in unlabeled
                    ][: args.top],
                }
            )
        )
    return 0


def status(case: dict) -> str:
    """As the engine's store: a label map with every organ reviewed is labeled, with some of them partial."""
    if not case["label"]:
        return "unlabeled"
    return "labeled" if len(case["reviewed"]) >= ORGAN_COUNT else "partial"


def spawn_tree() -> int:
    grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    emit({"event": "tree", "child": os.getpid(), "grandchild": grandchild.pid})
    time.sleep(60)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="fake-scdl")
    commands = parser.add_subparsers(dest="command", required=True)
    worker = commands.add_parser("worker")
    worker.add_argument("--model", required=True)
    worker.add_argument("--device", required=True)
    tune = commands.add_parser("finetune")
    tune.add_argument("--dataset", required=True)
    tune.add_argument("--model", required=True)
    tune.add_argument("--steps", type=int, required=True)
    tune.add_argument("--device", required=True)
    tune.add_argument("--events", action="store_true")
    model_cmd = commands.add_parser("models")
    model_cmd.add_argument("action", choices=["list", "info", "import"])
    model_cmd.add_argument("path", nargs="?")
    model_cmd.add_argument("--json", action="store_true")
    data_cmd = commands.add_parser("dataset")
    data_cmd.add_argument("action", choices=["list", "suggest"])
    data_cmd.add_argument("dir")
    data_cmd.add_argument("--model")
    data_cmd.add_argument("--device")
    data_cmd.add_argument("--top", type=int)
    data_cmd.add_argument("--json", action="store_true")
    commands.add_parser("spawn-tree")
    args = parser.parse_args()
    if args.command == "worker":
        Worker(args.model, args.device).run()
        return 0
    return {"finetune": finetune, "models": models, "dataset": dataset}.get(args.command, lambda _: spawn_tree())(args)


if __name__ == "__main__":
    sys.exit(main())
