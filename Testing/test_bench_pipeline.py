"""The training benchmarks' building blocks: every accuracy configuration is a valid run configuration, only a
configuration named transductive trains with the scored CT (unlabeled), a CPS pair is scored both as shipped (the
mean of its networks) and by its first network alone, the stage timer of ``bench_train_pipeline.py`` times each
stage of a real trainer on real CTs, and ``bench_atlas.py``'s registration carries one patient's labels onto
another's CT."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import SimpleITK as sitk
import torch
from scdl_test_support import threshold_vnet

from scdlcore.bundle.format import load_bundle, save_bundle
from scdlcore.dataset.store import DatasetStore
from scdlcore.evaluation.metrics import dice
from scdlcore.io.read import read_image, read_label
from scdlcore.sample_data import make_sample_dataset
from scdlcore.training.config import Config
from scdlcore.training.trainer import Trainer

LIVER = 6  # Synapse-13

BENCHMARKS = Path(__file__).resolve().parent / "Benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import bench_accuracy  # noqa: E402
import bench_atlas  # noqa: E402
import bench_train_pipeline  # noqa: E402


@pytest.mark.parametrize("name", list(bench_accuracy.configurations(48)))
def test_every_accuracy_configuration_is_a_valid_config(name):
    config = Config().with_overrides(bench_accuracy.configurations(48)[name].overrides)
    assert all(edge % 16 == 0 for edge in config.train.patch_size)


def test_only_configurations_named_transductive_are_transductive():
    for name, config in bench_accuracy.configurations(48).items():
        assert config.transductive == ("TRANSDUCTIVE" in config.label) == name.endswith("_transductive")


@pytest.mark.slow  # copies four real CTs into two dataset stores
def test_a_transductive_store_holds_the_scored_ct_without_its_labels(samples, sample_cache_dir, tmp_path):
    """The benchmark data folder is built from the test cache; ct_chest_nrrd's CT stands in for the resampled chest
    CTA that ``prepare_data`` writes (only its presence in the store matters here)."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "samples").symlink_to(sample_cache_dir / "samples", target_is_directory=True)
    sitk.WriteImage(
        sitk.ReadImage(str(samples["ct_chest_nrrd"].image)), str(tmp_path / "data" / bench_accuracy.CTA_FILE)
    )
    data = bench_accuracy.BenchData(tmp_path / "data")
    train, test = bench_accuracy.FOLDS[1]

    folder = data.train_store(tmp_path / "transductive", [train], [test])

    cases = {case.id: case for case in DatasetStore(folder).dataset().cases}
    assert sorted(cases) == sorted([train, test, "ct_chest_cta", "ct_chest_nrrd"])
    assert cases[train].label is not None and cases[test].label is None
    with pytest.raises(ValueError, match="unlabeled"):  # a store without the scored CT is not reused for it
        data.train_store(data.train_store(tmp_path / "inductive", [train]), [train], [test])


@pytest.mark.slow  # a real CT through the predictor
def test_a_pair_is_scored_as_its_mean_and_by_its_first_network_alone(samples, threshold_bundle, tmp_path):
    single = load_bundle(threshold_bundle)
    blank = threshold_vnet()
    with torch.no_grad():  # background everywhere, loudly enough to outvote the threshold network in the mean
        blank.head.weight.zero_()
        blank.head.bias.fill_(-20.0)
        blank.head.bias[0] = 20.0
    pair = save_bundle(
        tmp_path / "pair",
        [threshold_vnet(), blank],
        name="pair",
        labels=single.labels,
        spacing=single.spacing,
        hu_window=single.hu_window,
        patch_size=single.patch_size,
        description="test stand-in: a threshold network and a blank one",
    )
    image = read_image(samples["ct_abdomen"].image)
    reference = read_label(samples["ct_abdomen"].label, reference=image)

    def dice(bundle: Path, **options: str) -> dict[str, float]:
        result = bench_accuracy.score_bundle(bundle, image, reference, torch.device("cpu"), **options)
        return bench_accuracy.summarise(result).dice

    alone = dice(threshold_bundle)
    assert alone["spleen"] > 0  # the threshold network finds something (its soft tissue overlaps the spleen)
    assert dice(pair, ensemble="first") == alone
    assert set(dice(pair).values()) == {0.0}  # the mean, as shipped: the blank network outvotes it


@pytest.mark.slow
def test_the_stage_timer_times_every_stage_of_a_real_trainer(samples, tmp_path):
    dataset = make_sample_dataset(tmp_path / "data", samples)
    overrides = {
        "data.dataset": str(dataset),
        "data.spacing": [6.0, 6.0, 6.0],
        "network.width": 2,
        "scdl.grid": 2,
        "train.patch_size": [16, 32, 32],
        "train.device": "cpu",
        "train.val_every": 0,
    }
    trainer = Trainer(Config().with_overrides(overrides), tmp_path / "run")
    trainer.setup()
    times = bench_train_pipeline.time_stages(trainer, steps=2, warmup=1)
    assert list(times) == ["sample", "augment", "step", "step on MetaTensors"]
    assert all(len(seconds) == 2 and min(seconds) > 0 for seconds in times.values())


@pytest.mark.slow  # registers two real CTs
def test_registration_carries_one_patients_liver_onto_another_patients_ct(samples):
    """A (non-contrast, abdomen) onto B (portal venous, 40 mm of upper abdomen, another scanner): without the
    registration the labels miss B entirely (the two patients' LPS origins lie a metre apart); the z search and the
    affine stage put A's liver onto B's."""
    atlas = read_image(samples["ct_abdomen"].image)
    atlas_labels = read_label(samples["ct_abdomen"].label, reference=atlas)
    target = read_image(samples["ct_abdomen_dicom"].image)
    target_liver = read_label(samples["ct_abdomen_dicom"].label, reference=target).array == LIVER

    transforms = bench_atlas.register(
        bench_atlas.metric_image(target), bench_atlas.metric_image(atlas), deformable=False
    )

    def liver_dice(transform: sitk.Transform) -> float:
        return dice(bench_atlas.propagate(atlas_labels, transform, target) == LIVER, target_liver)

    assert list(transforms) == ["translation", "affine"]
    assert liver_dice(sitk.TranslationTransform(3)) == 0
    assert liver_dice(transforms["translation"][0]) > 0.3
    assert liver_dice(transforms["affine"][0]) > 0.6
