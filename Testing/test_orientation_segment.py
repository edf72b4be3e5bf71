"""The shipped predictor sees the anatomy the same way whatever the file's axis order.

Real models, real files: the bundled starter segments ct_abdomen stored in each of the 8 flip combinations
and an axis permutation (the same physical image, written with SimpleITK and read back), and a model
trained in the canonical orientation on ct_abdomen alone (``Testing/data/fold1_model``, made by
``make_starter_model.py --labeled ct_abdomen``) is checked on another patient's CT for the side of its organs.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from scdlcore.bundle.format import BundleError, load_bundle
from scdlcore.bundle.registry import ModelRegistry
from scdlcore.inference.predictor import Predictor
from scdlcore.io.read import read_image
from scdlcore.io.segnrrd import read_label_map
from scdlcore.io.volume import resample_onto
from scdlcore.io.write import write_image
from scdlcore.labels import SYNAPSE13
from scdlcore.preprocess import Reorientation

FOLD1_MODEL = Path(__file__).resolve().parent / "data" / "fold1_model"
TWINS = [((0, 1, 2), flips) for flips in itertools.product([False, True], repeat=3)] + [
    ((2, 0, 1), (False, True, False))
]


@pytest.fixture(scope="module")
def starter_predictor(tmp_path_factory) -> Predictor:
    return Predictor(ModelRegistry(tmp_path_factory.mktemp("models")).resolve("starter"), "cpu")


@pytest.fixture(scope="module")
def reference(samples, starter_predictor):
    ct = read_image(samples["ct_abdomen"].image)
    labels = starter_predictor.predict_volume(ct)
    found = [label.name for label in SYNAPSE13.labels if (labels.array == label.value).sum() > 100]
    assert len(found) >= 6, found  # a result worth comparing: many organs
    return ct, labels


@pytest.mark.slow  # runs a real model on real CT
@pytest.mark.parametrize("axes, flips", TWINS)
def test_segmenting_a_twin_gives_the_same_organ_voxels_in_physical_space(
    reference, starter_predictor, tmp_path, axes, flips
):
    ct, expected = reference
    path = tmp_path / "twin.nrrd"
    write_image(path, Reorientation(axes, flips).volume(ct))
    output = tmp_path / "twin.seg.nrrd"
    starter_predictor.predict_file(path, output)
    got = read_label_map(output, SYNAPSE13)
    assert got.same_grid(read_image(path))  # on the twin's own grid ...
    on_reference_grid = resample_onto(got, ct, is_label=True)  # ... and, in physical space, the same voxels
    np.testing.assert_array_equal(on_reference_grid.array, expected.array)


@pytest.mark.slow  # runs a real model on real CT
def test_a_model_trained_on_ct_abdomen_finds_the_liver_on_the_patients_right_of_the_spleen_on_another_ct(samples):
    """ct_abdomen_dicom is another patient, stored in another axis order (identity direction, ct_abdomen's is
    diag(-1, -1, 1)) and another phase (portal venous); the model never saw it."""
    bundle = load_bundle(FOLD1_MODEL)
    assert bundle.lineage["labeled"] == ["ct_abdomen"]
    ct = read_image(samples["ct_abdomen_dicom"].image)
    labels = Predictor(bundle, "cpu").predict_volume(ct)

    def centroid_lps(name: str) -> np.ndarray:
        voxels = np.argwhere(labels.array == SYNAPSE13[name].value)
        assert len(voxels) > 1000, name
        index_xyz = voxels.mean(axis=0)[::-1]
        return (ct.ijk_to_lps @ np.array([*index_xyz, 1.0]))[:3]

    liver, spleen = centroid_lps("liver"), centroid_lps("spleen")
    assert liver[0] < spleen[0] - 50, (liver, spleen)  # LPS x grows to the patient's left: the liver is far right


def test_a_bundle_that_records_no_orientation_is_refused_with_the_reason(threshold_bundle, tmp_path):
    import json
    import shutil

    legacy = tmp_path / "legacy"
    shutil.copytree(threshold_bundle, legacy)
    meta = json.loads((legacy / "model.json").read_text())
    del meta["orientation"]
    (legacy / "model.json").write_text(json.dumps(meta))
    bundle = load_bundle(legacy)  # it can still be listed, inspected, exported and removed
    assert bundle.orientation is None
    with pytest.raises(
        BundleError,
        match=r"records no input orientation: it was trained on CTs in their files' own "
        r"axis order.*mirrors the anatomy",
    ):
        Predictor(bundle, "cpu")
