"""Train, export and evaluate the bundled starter model, reproducibly.

1. builds the sample dataset (``scdl sample-data --dataset``), 2. trains ``starter_cpu.yaml`` (or resumes
it; ``--run`` names the run folder), 3. exports network A of the CPS pair as the bundle ``starter`` (one
network keeps the bundle under 16 MB), 4. segments the held-out CT (``ct_abdomen_dicom``) and the training
CT with it and scores both on their native grids, 5. records those scores in ``model.json`` and installs
the bundle into ``SCDLCore/scdlcore/resources/starter_model``.

Usage: ``python Testing/StarterModel/make_starter_model.py --work /tmp/starter``
"""

from __future__ import annotations

import argparse
import platform
import shutil
import tempfile
from pathlib import Path

import torch

from scdlcore.bundle import STARTER_MODEL_DIR, load_bundle, save_bundle, update_bundle_metadata
from scdlcore.events import to_jsonable
from scdlcore.config import load_config
from scdlcore.infer import Predictor
from scdlcore.metrics import evaluate_files
from scdlcore.sample_data import fetch_all, make_sample_dataset
from scdlcore.train import Trainer

HERE = Path(__file__).resolve().parent
DESCRIPTION = (
    "Provisional starter model trained on a 2-core CPU: CPS + GA + SCDL, VNet width 8, 3 mm, on ONE labeled CT "
    "(ct_abdomen) with TotalSegmentator reference labels, plus one unlabeled CT. Expect little on other patients; "
    "adapt it to your scans with the annotation loop."
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="folder for the dataset and the training run")
    parser.add_argument("--run", type=Path, help="an existing run folder of this config to export (default WORK/run)")
    args = parser.parse_args()
    samples = fetch_all()
    dataset = make_sample_dataset(args.work / "dataset", samples)
    run = args.run or args.work / "run"
    config = load_config(HERE / "starter_cpu.yaml").with_overrides({"data.dataset": str(dataset)})
    if not (run / "model" / "model.json").is_file():
        Trainer(config, run, resume=(run / "checkpoints" / "last.safetensors").is_file()).run()

    trained = load_bundle(run / "model")
    with tempfile.TemporaryDirectory() as tmp:
        starter = save_bundle(
            Path(tmp) / "starter", trained.build_networks("cpu", count=1), name="starter", labels=trained.labels,
            spacing=trained.spacing, hu_window=trained.hu_window, patch_size=trained.patch_size, base=trained.base,
            scdl=trained.scdl, metrics=trained.metrics, description=DESCRIPTION,
            lineage={**trained.lineage, "trained_on": "ct_abdomen (labeled) + ct_chest_cta (unlabeled), TotalSegmentator 2.18.0 "
                     "sample CTs", "machine": f"CPU ({platform.machine()}), torch {torch.__version__}"},
        )
        predictor = Predictor(load_bundle(starter), torch.device("cpu"))
        scores = {}
        for name, role in (("ct_abdomen_dicom", "held_out"), ("ct_abdomen", "training")):
            output = Path(tmp) / f"{name}.nii.gz"
            predictor.predict_file(samples[name].image, output)
            result = evaluate_files(output, samples[name].label, trained.labels)
            scores[role] = {"case": name, **to_jsonable(result.to_dict())}
            print(f"{role} case {name}:\n{result.format_table()}\n")
        update_bundle_metadata(starter, metrics={**trained.metrics, "native_grid": scores,
                                                 "reference_labels": "TotalSegmentator outputs, not manual annotations"})
        shutil.rmtree(STARTER_MODEL_DIR, ignore_errors=True)
        shutil.copytree(starter, STARTER_MODEL_DIR)
    print(f"installed {STARTER_MODEL_DIR} ({sum(p.stat().st_size for p in STARTER_MODEL_DIR.iterdir()) / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
