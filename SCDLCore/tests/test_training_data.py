"""What the trainer is fed: patch sampling, the partial-review mask and the preprocessing cache.

Small synthetic volumes only (no real CT, no training), so the module runs in about a second.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

from scdlcore.dataset.manifest import Case, Dataset
from scdlcore.io.volume import Volume
from scdlcore.io.write import write_image, write_label
from scdlcore.labels import SYNAPSE13, LabelTable
from scdlcore.training import cache
from scdlcore.training.cache import PARTIAL_BAND_MM, PreparedCase, _cache_key, _partial_valid, prepare_case
from scdlcore.training.config import DataConfig
from scdlcore.training.patches import PatchSampler

PATCH = (8, 10, 12)  # (D, H, W), unequal so that a swapped axis shows
SHAPE = (20, 24, 28)


def labeled_case(case_id: str, value: float, seed: int = 0) -> PreparedCase:
    """A labeled case whose image is ``value`` plus its own class map / 100 (so a patch tells which case and where
    it came from), with classes 1 and 2 as two boxes and its own median HU per class."""
    classes = np.zeros(SHAPE, np.uint8)
    classes[2:9, 3:12, 4:14] = 1
    classes[12:18, 14:22, 16:26] = 2
    rng = np.random.default_rng(seed)
    image = (value + classes / 100 + rng.uniform(0, 0.001, SHAPE)).astype(np.float16)
    indices = {int(c): np.flatnonzero(classes.ravel() == c) for c in np.unique(classes)}
    return PreparedCase(case_id, image, classes, None, indices, {1: 10.0 * value, 2: 20.0 * value})


def unlabeled_case(case_id: str, value: float) -> PreparedCase:
    return PreparedCase(case_id, np.full(SHAPE, value, np.float16))


def sampler(labeled, unlabeled=(), **kwargs) -> PatchSampler:
    options = dict(patch_size=PATCH, labeled_batch=2, unlabeled_batch=3, rare_class_prob=0.5, seed=7)
    return PatchSampler(labeled, unlabeled, **{**options, **kwargs})


def case_value(patch: np.ndarray) -> float:
    """The case constant of a patch (0 is the padding outside the volume)."""
    inside = patch[patch > 0]
    assert inside.size, "a patch is centred inside its volume, so it holds some of it"
    return round(float(np.min(inside)), 2)


# ---------------------------------------------------------------- patch sampling


def test_a_batch_has_the_documented_shapes_and_types():
    batch = sampler([labeled_case("a", 0.25)], [unlabeled_case("u", 0.75)], num_classes=14).batch(0)
    assert batch["image"].shape == (5, 1, *PATCH) and batch["image"].dtype == np.float32
    assert batch["labels"].shape == (2, *PATCH) and batch["labels"].dtype == np.int64
    assert batch["valid"].shape == (2, *PATCH) and batch["valid"].dtype == bool
    assert batch["class_hu"].shape == (2, 14) and batch["class_hu"].dtype == np.float32


def test_labeled_patches_come_first_then_unlabeled_ones():
    labeled = [labeled_case("a", 0.25), labeled_case("b", 0.5, seed=1)]
    unlabeled = [unlabeled_case("u", 0.75), unlabeled_case("v", 0.875)]
    for step in range(5):
        image = sampler(labeled, unlabeled).batch(step)["image"][:, 0]
        assert {case_value(p) for p in image[:2]} <= {0.25, 0.5}, step
        assert {case_value(p) for p in image[2:]} <= {0.75, 0.88}, step


def test_without_unlabeled_cases_the_unlabeled_stream_draws_labeled_images():
    image = sampler([labeled_case("a", 0.25)], []).batch(0)["image"][:, 0]
    assert [case_value(p) for p in image] == [0.25] * 5


def test_labels_valid_and_organ_hu_belong_to_the_image_patch_they_come_with():
    labeled = [labeled_case("a", 0.25), labeled_case("b", 0.5, seed=1)]
    for step in range(6):
        batch = sampler(labeled, [unlabeled_case("u", 0.75)]).batch(step)
        for row in range(2):
            image, labels = batch["image"][row, 0], batch["labels"][row]
            value = case_value(image)
            inside = image > 0
            # the image encodes its class map: the label patch is cropped at the same place
            np.testing.assert_array_equal(labels[inside], np.round((image[inside] - value) * 100).astype(np.int64))
            assert (labels[~inside] == 0).all()  # padding outside the volume is background
            assert batch["valid"][row].all()  # a fully labeled case: every voxel is known
            hu = batch["class_hu"][row]
            assert (hu[1], hu[2]) == (pytest.approx(10.0 * value), pytest.approx(20.0 * value))
            assert np.isnan(hu[0]) and np.isnan(hu[3:]).all()  # classes the case does not have


def test_the_valid_mask_of_a_partial_case_is_cropped_with_its_patch():
    case = labeled_case("a", 0.25)
    case.valid = case.classes == 1  # only class 1 is known
    batch = sampler([case], labeled_batch=4, rare_class_prob=1.0).batch(3)
    for row in range(4):
        image, labels, valid = batch["image"][row, 0], batch["labels"][row], batch["valid"][row]
        inside = image > 0
        np.testing.assert_array_equal(valid[inside], labels[inside] == 1)
        assert valid[~inside].all()  # outside the volume: known background (padding)


def test_batches_are_a_pure_function_of_seed_rank_and_step():
    labeled, unlabeled = [labeled_case("a", 0.25), labeled_case("b", 0.5, seed=1)], [unlabeled_case("u", 0.75)]
    uninterrupted = sampler(labeled, unlabeled)
    batches = [uninterrupted.batch(step) for step in range(6)]
    resumed = sampler(labeled, unlabeled).batch(5)  # a new sampler that starts at step 5, as a resumed run does
    for key in ("image", "labels", "valid", "class_hu"):
        np.testing.assert_array_equal(resumed[key], batches[5][key])
    assert not np.array_equal(batches[4]["image"], batches[5]["image"])  # each step draws anew
    assert not np.array_equal(sampler(labeled, unlabeled, seed=8).batch(5)["image"], batches[5]["image"])


def test_ranks_draw_different_patches():
    labeled, unlabeled = [labeled_case("a", 0.25)], [unlabeled_case("u", 0.75)]
    images = [sampler(labeled, unlabeled, rank=rank).batch(0)["image"] for rank in range(4)]
    for first in range(4):
        for second in range(first + 1, 4):
            assert not np.array_equal(images[first], images[second]), (first, second)
    np.testing.assert_array_equal(sampler(labeled, unlabeled, rank=2).batch(0)["image"], images[2])


def test_rare_class_prob_one_centres_every_labeled_patch_on_an_organ_each_as_often():
    """A 2x2x2-voxel organ next to one that fills a third of the volume: picked half the time, not 0.1 %."""
    classes = np.zeros((40, 40, 40), np.uint8)
    classes[:, :, :13] = 1  # large
    classes[30:32, 30:32, 30:32] = 2  # tiny, 17+ voxels from the large one
    image = np.full(classes.shape, 0.5, np.float16)
    case = PreparedCase("c", image, classes, None, {c: np.flatnonzero(classes.ravel() == c) for c in (0, 1, 2)})
    patch = (8, 8, 8)

    def organ_counts(prob: float) -> tuple[int, int, int]:
        draw = sampler([case], patch_size=patch, labeled_batch=4, unlabeled_batch=1, rare_class_prob=prob)
        labels = np.concatenate([draw.batch(step)["labels"] for step in range(50)])  # 200 patches
        return sum(bool((p == 1).any()) for p in labels), sum(bool((p == 2).any()) for p in labels), len(labels)

    large, tiny, total = organ_counts(1.0)
    assert large + tiny >= total  # every patch holds an organ (the one it is centred on)
    assert 0.3 * total < tiny < 0.7 * total  # each organ is chosen about half the time, whatever its size
    _, tiny_uniform, _ = organ_counts(0.0)
    assert tiny_uniform < 0.1 * total  # uniform centres almost never meet it


def test_a_sampler_without_labeled_cases_is_refused():
    with pytest.raises(ValueError, match="at least one labeled case"):
        sampler([], [unlabeled_case("u", 0.75)])


# ---------------------------------------------------------------- partial review


SPACING = (2.0, 2.5, 5.0)  # (x, y, z) mm: the band is a different number of voxels on each axis
LIVER, SPLEEN, AORTA = (SYNAPSE13.class_index(n) for n in ("liver", "spleen", "aorta"))


@pytest.fixture
def partial_classes() -> np.ndarray:
    """(z, y, x) = (30, 40, 50): a reviewed liver box, an unreviewed spleen touching it, an aorta far away."""
    classes = np.zeros((30, 40, 50), np.uint8)
    classes[12:16, 15:20, 20:25] = LIVER
    classes[12:16, 15:20, 25:28] = SPLEEN  # inside the liver's band
    classes[25:28, 33:38, 42:47] = AORTA
    return classes


def band_voxels(spacing_mm: float) -> tuple[int, int]:
    """Voxels from an organ's face that are surely within the band, and surely beyond it."""
    return math.floor(PARTIAL_BAND_MM / spacing_mm), math.ceil(PARTIAL_BAND_MM / spacing_mm) + 1


def test_reviewed_organs_and_background_in_their_band_are_valid_the_rest_is_not(partial_classes):
    valid = _partial_valid(partial_classes, [LIVER], SPACING)
    assert valid.shape == partial_classes.shape and valid.dtype == bool
    assert valid[partial_classes == LIVER].all()
    assert not valid[partial_classes == SPLEEN].any()  # an unreviewed organ, even next to a reviewed one
    assert not valid[partial_classes == AORTA].any()
    assert not valid[0, 0, 0] and not valid[29, 39, 0]  # background far from the liver

    # Along each axis from the liver's face: background within PARTIAL_BAND_MM is valid, beyond it is not.
    (zin, zout), (yin, yout), (xin, xout) = (band_voxels(s) for s in SPACING[::-1])
    assert valid[12 - zin, 17, 22] and not valid[12 - zout, 17, 22]
    assert valid[15 + zin, 17, 22] and not valid[15 + zout, 17, 22]
    assert valid[13, 15 - yin, 22] and not valid[13, 15 - yout, 22]
    assert valid[13, 19 + yin, 22] and not valid[13, 19 + yout, 22]
    assert valid[13, 17, 20 - xin] and not valid[13, 17, 20 - xout]


def test_reviewing_two_organs_unions_their_masks(partial_classes):
    both = _partial_valid(partial_classes, [LIVER, AORTA], SPACING)
    liver = _partial_valid(partial_classes, [LIVER], SPACING)
    aorta = _partial_valid(partial_classes, [AORTA], SPACING)
    np.testing.assert_array_equal(both, liver | aorta)
    assert both[partial_classes == AORTA].all() and not both[partial_classes == SPLEEN].any()


def test_a_reviewed_organ_that_is_absent_leaves_nothing_valid(partial_classes):
    pancreas = SYNAPSE13.class_index("pancreas")
    assert not _partial_valid(partial_classes, [pancreas], SPACING).any()


def test_kept_unreviewed_organs_are_known_as_drawn_with_their_band_and_far_background_is_not(partial_classes):
    """Kept, the spleen and the far aorta train as drawn: what reviewing every drawn organ would make known."""
    kept = _partial_valid(partial_classes, None, SPACING)
    every_organ = _partial_valid(partial_classes, [LIVER, SPLEEN, AORTA], SPACING)
    np.testing.assert_array_equal(kept, every_organ)
    assert kept[partial_classes > 0].all()
    zin, zout = band_voxels(SPACING[2])
    assert kept[25 - zin, 35, 44] and not kept[25 - zout, 35, 44]  # background in the aorta's band, and beyond
    assert not kept[0, 0, 0] and not kept[29, 39, 0]  # far from every drawn organ: it may hide a missed one


# ---------------------------------------------------------------- the preprocessing cache


@pytest.fixture
def dataset(tmp_path) -> Dataset:
    """Two files on an axis-aligned 2 mm grid: a CT (air around a 40 HU body) and its label map (liver, spleen)."""
    array = np.full((16, 20, 24), -1000.0, np.float32)
    array[3:13, 4:16, 4:20] = 40.0
    ct = Volume(array, (2.0, 2.0, 2.0), (-20.0, 10.0, 30.0), np.eye(3).ravel())
    labels = np.zeros(array.shape, np.uint8)
    labels[4:9, 6:12, 5:12] = SYNAPSE13["liver"].value
    labels[5:8, 6:10, 14:18] = SYNAPSE13["spleen"].value
    (tmp_path / "data" / "images").mkdir(parents=True)
    write_image(tmp_path / "data" / "images" / "c1.nii.gz", ct)
    write_label(tmp_path / "data" / "labels" / "c1.nii.gz", ct.with_array(labels))
    case = Case("c1", "images/c1.nii.gz", "labels/c1.nii.gz")
    return Dataset(tmp_path / "data", SYNAPSE13, [case])


CONFIG = DataConfig(spacing=(2.0, 2.0, 2.0))


def touch_later(path) -> None:
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))


def test_the_cache_key_is_stable_for_the_same_files_and_settings(dataset):
    key = _cache_key(dataset, dataset.cases[0], CONFIG)
    again = Dataset(dataset.root, SYNAPSE13, [Case("c1", "images/c1.nii.gz", "labels/c1.nii.gz")])
    assert _cache_key(again, again.cases[0], DataConfig(spacing=(2.0, 2.0, 2.0))) == key
    # settings that do not change the preprocessed arrays do not change the key
    unrelated = DataConfig(spacing=(2.0, 2.0, 2.0), val_cases=["c1"], cache_dir="/elsewhere", num_val_cases=1)
    assert _cache_key(dataset, dataset.cases[0], unrelated) == key


@pytest.mark.parametrize("which", ["images/c1.nii.gz", "labels/c1.nii.gz"])
def test_the_cache_key_changes_when_a_source_file_changes(dataset, which):
    key = _cache_key(dataset, dataset.cases[0], CONFIG)
    touch_later(dataset.root / which)
    assert _cache_key(dataset, dataset.cases[0], CONFIG) != key


def test_the_cache_key_changes_when_a_dicom_folders_file_changes(dataset, tmp_path):
    folder = dataset.root / "images" / "series"
    folder.mkdir()
    for name in ("1.dcm", "2.dcm"):
        (folder / name).write_bytes(b"slice")
    case = Case("s", "images/series")
    key = _cache_key(dataset, case, CONFIG)
    (folder / "2.dcm").write_bytes(b"another slice")
    assert _cache_key(dataset, case, CONFIG) != key


@pytest.mark.parametrize(
    "change",
    [
        {"spacing": (2.0, 2.0, 3.0)},
        {"hu_window": (-100.0, 400.0)},
        {"orientation": "LPS"},
        {"unreviewed": "unknown"},
    ],
    ids=lambda change: next(iter(change)),
)
def test_the_cache_key_changes_with_each_preprocessing_setting(dataset, change):
    key = _cache_key(dataset, dataset.cases[0], CONFIG)
    assert _cache_key(dataset, dataset.cases[0], DataConfig(**{"spacing": (2.0, 2.0, 2.0), **change})) != key


def test_the_cache_key_changes_with_the_reviewed_organs_the_label_table_and_the_band(dataset, monkeypatch):
    case = dataset.cases[0]
    key = _cache_key(dataset, case, CONFIG)
    partial = Case(case.id, case.image, case.label, reviewed=["liver"])
    assert _cache_key(dataset, partial, CONFIG) != key
    assert _cache_key(dataset, Case(case.id, case.image, case.label, reviewed=["spleen"]), CONFIG) != _cache_key(
        dataset, partial, CONFIG
    )
    renamed = LabelTable("my_organs", SYNAPSE13.labels)  # the same organs under another table's name
    assert _cache_key(Dataset(dataset.root, renamed, [case]), case, CONFIG) != key
    monkeypatch.setattr(cache, "PARTIAL_BAND_MM", PARTIAL_BAND_MM + 5)
    assert _cache_key(dataset, case, CONFIG) != key


def test_a_cached_case_is_reused_and_a_changed_source_is_prepared_again(dataset, tmp_path, monkeypatch):
    case = Case("c1", "images/c1.nii.gz", "labels/c1.nii.gz", reviewed=["liver"])
    cache_dir = tmp_path / "cache"
    first = prepare_case(dataset, case, CONFIG, cache_dir)
    files = sorted(p.name for p in cache_dir.iterdir())
    assert files == [f"c1-{_cache_key(dataset, case, CONFIG)}.npz"]

    calls = []
    real = cache._preprocess
    monkeypatch.setattr(cache, "_preprocess", lambda *args: calls.append(args) or real(*args))
    cached = prepare_case(dataset, case, CONFIG, cache_dir)
    assert calls == []  # read from the cache, not preprocessed again
    np.testing.assert_array_equal(cached.image, first.image)
    np.testing.assert_array_equal(cached.classes, first.classes)
    np.testing.assert_array_equal(cached.valid, first.valid)
    assert cached.class_indices.keys() == first.class_indices.keys()
    for cls in first.class_indices:
        np.testing.assert_array_equal(cached.class_indices[cls], first.class_indices[cls])
    assert cached.class_hu == pytest.approx(first.class_hu, abs=1e-3)

    touch_later(dataset.root / case.label)
    prepare_case(dataset, case, CONFIG, cache_dir)
    assert len(calls) == 1 and len(list(cache_dir.iterdir())) == 2  # a new key: prepared and stored again


def test_a_partially_reviewed_case_keeps_its_unreviewed_organs_as_drawn_by_default(dataset):
    """The default: the unreviewed spleen trains as drawn, a valid voxel and a class to centre on."""
    case = Case("c1", "images/c1.nii.gz", "labels/c1.nii.gz", reviewed=["liver"])
    prepared = prepare_case(dataset, case, CONFIG, None)
    assert CONFIG.unreviewed == "kept"
    assert prepared.valid[prepared.classes == SPLEEN].all() and prepared.valid[prepared.classes == LIVER].all()
    assert set(prepared.class_indices) == {0, LIVER, SPLEEN}
    assert prepared.valid.ravel()[prepared.class_indices[0]].all()


def test_a_partially_reviewed_case_with_unreviewed_unknown_samples_only_its_reviewed_voxels(dataset):
    """The reviewed liver is known, the unreviewed spleen is not: neither a valid voxel nor a class to centre on."""
    case = Case("c1", "images/c1.nii.gz", "labels/c1.nii.gz", reviewed=["liver"])
    prepared = prepare_case(dataset, case, DataConfig(spacing=(2.0, 2.0, 2.0), unreviewed="unknown"), None)
    assert prepared.valid is not None and prepared.valid.shape == prepared.classes.shape
    assert prepared.valid[prepared.classes == LIVER].all()
    assert (prepared.classes == SPLEEN).any() and not prepared.valid[prepared.classes == SPLEEN].any()
    assert set(prepared.class_indices) == {0, LIVER}
    assert prepared.valid.ravel()[prepared.class_indices[0]].all()  # background drawn only from the band
    full = prepare_case(dataset, dataset.cases[0], CONFIG, None)
    assert full.valid is None and set(full.class_indices) == {0, LIVER, SPLEEN}
