"""The predictor: sliding window, label-aware return to the input grid, organ filter, cancel, overview.

The models here are stand-ins, not trained models: :func:`threshold_vnet` is a real VNet whose
weights are set by hand so that it labels voxels by intensity (HU -25..175 -> spleen, above 175 ->
liver), which makes "the output lies on the input's anatomy" checkable against the CT itself.
"""

from __future__ import annotations

import io
import itertools
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from scdl_test_support import threshold_vnet

from scdlcore.bundle.format import ModelBundle, load_bundle, save_bundle
from scdlcore.events import Progress
from scdlcore.inference.predictor import InferenceCancelled, Predictor, check_organs, organ_volumes_ml
from scdlcore.inference.sliding_window import window_starts
from scdlcore.inference.to_grid import _uniform_cell_values, probs_to_grid
from scdlcore.io.read import read_image, read_label
from scdlcore.io.segnrrd import read_segmentation_labels
from scdlcore.io.volume import Volume, resample_onto
from scdlcore.io.write import write_image
from scdlcore.labels import SYNAPSE13
from scdlcore.nets import VNet
from scdlcore.preprocess import hu_window, resample_to_spacing
from scdlcore.visualize.overview import save_overview

SPLEEN, LIVER = SYNAPSE13["spleen"].value, SYNAPSE13["liver"].value


def _threshold(hu: np.ndarray) -> np.ndarray:
    """What the threshold model should say, on the CT's own grid."""
    return np.where(hu > 175, LIVER, np.where(hu > -25, SPLEEN, 0)).astype(np.uint8)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float(np.count_nonzero(a & b)) / max(1, np.count_nonzero(a) + np.count_nonzero(b))


def _bundle(path: Path, spacing: float, patch: int = 32, networks: list[VNet] | None = None) -> ModelBundle:
    networks = networks or [threshold_vnet()]
    save_bundle(
        path,
        networks,
        name="threshold",
        labels=SYNAPSE13,
        spacing=(spacing,) * 3,
        hu_window=(-125, 275),
        patch_size=(patch,) * 3,
        description="test stand-in: labels by intensity, not a model",
    )
    return load_bundle(path)


@pytest.fixture(scope="module")
def coarse_bundle(tmp_path_factory: pytest.TempPathFactory) -> ModelBundle:
    return _bundle(tmp_path_factory.mktemp("bundle") / "coarse", spacing=6.0, patch=64)


@pytest.fixture
def sphere() -> Volume:
    """(80, 80, 80) CT at 1 mm: a 40 HU ball of radius 25 mm in air, off-centre origin."""
    z, y, x = np.meshgrid(*(np.arange(80) - 39.5,) * 3, indexing="ij")
    ball = x**2 + y**2 + z**2 <= 25**2
    return Volume(np.where(ball, 40.0, -1000.0).astype(np.float32), (1, 1, 1), (3.0, -2.0, 5.0), np.eye(3).ravel())


@pytest.mark.parametrize(
    ("size", "patch", "overlap", "starts"),
    [
        (32, 32, 0.5, [0]),  # one window
        (20, 32, 0.5, [0]),  # smaller than a patch: padded
        (64, 32, 0.5, [0, 16, 32]),  # stride 16
        (70, 32, 0.5, [0, 13, 25, 38]),  # evenly spread, the last window ends at 70
        (64, 32, 0.0, [0, 32]),
    ],
)
def test_windows_cover_the_axis_with_the_overlap(size: int, patch: int, overlap: float, starts: list[int]) -> None:
    assert window_starts(size, patch, overlap) == starts
    assert starts[-1] + patch >= size and all(b - a <= patch * (1 - overlap) for a, b in zip(starts, starts[1:]))


@pytest.mark.slow
def test_sliding_window_gives_probabilities_for_any_shape(tmp_path: Path) -> None:
    torch.manual_seed(1)
    bundle = _bundle(tmp_path / "random", spacing=6.0, networks=[VNet(num_classes=14, width=2) for _ in range(2)])
    image = torch.rand(20, 37, 45)  # (D, H, W), D below the patch, H and W not multiples of it
    probs = Predictor(bundle, "cpu").sliding_window(image)
    assert probs.shape == (14, 20, 37, 45) and probs.dtype == torch.float32
    assert torch.allclose(probs.sum(0), torch.ones(20, 37, 45), atol=1e-5)


@pytest.mark.slow
def test_real_ct_is_segmented_in_place(samples, coarse_bundle: ModelBundle) -> None:
    ct = read_image(samples["ct_abdomen"].image)  # 3 mm, model grid 6 mm
    labels = Predictor(coarse_bundle, "cpu").predict_volume(ct)
    assert labels.same_grid(ct, tol=0) and labels.array.dtype == np.uint8
    expected = _threshold(ct.array)
    assert _dice(labels.array == SPLEEN, expected == SPLEEN) > 0.8
    assert _dice(labels.array == LIVER, expected == LIVER) > 0.55  # thin bright structures blur at 6 mm


def test_oblique_volume_is_segmented_in_place(synthetic_ct: Volume, tmp_path: Path) -> None:
    labels = Predictor(_bundle(tmp_path / "fine", spacing=1.0), "cpu").predict_volume(synthetic_ct)
    assert labels.same_grid(synthetic_ct, tol=0)
    assert _dice(labels.array == SPLEEN, synthetic_ct.array > -25) > 0.9


def test_return_to_input_grid_follows_the_anatomy_better_than_nearest(sphere: Volume, tmp_path: Path) -> None:
    predictor = Predictor(_bundle(tmp_path / "m", spacing=5.0), "cpu", body_crop=False)
    ball = sphere.array > 0
    ours = _dice(predictor.predict_volume(sphere).array == SPLEEN, ball)
    work = resample_to_spacing(sphere, predictor.bundle.spacing, is_label=False)
    model_grid = predictor.sliding_window(torch.from_numpy(hu_window(work.array))).argmax(0).numpy().astype(np.uint8)
    nearest = resample_onto(work.with_array(model_grid), sphere, is_label=True).array == 1
    assert ours > 0.95 and ours > _dice(nearest, ball) + 0.02  # measured: 0.960 vs 0.926


def _dense_reference(
    probs: np.ndarray, scale: np.ndarray, offset: np.ndarray, shape: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """Trilinear interpolation of every class at every output voxel, in float64 (independent of the code under
    test): the argmax among the classes that win somewhere on the model grid, and its lead over the runner-up."""
    coords = [np.clip(o + s * np.arange(n), 0, m - 1) for s, o, n, m in zip(scale, offset, shape, probs.shape[1:])]
    lower = [np.floor(c).astype(int) for c in coords]
    upper = [np.minimum(lo + 1, m - 1) for lo, m in zip(lower, probs.shape[1:])]
    weight = [c - lo for c, lo in zip(coords, lower)]
    result = np.zeros((probs.shape[0], *shape))
    for corner in itertools.product((0, 1), repeat=3):
        index = np.ix_(*(upper[a] if corner[a] else lower[a] for a in range(3)))
        w = np.ix_(*(weight[a] if corner[a] else 1 - weight[a] for a in range(3)))
        result += probs[(slice(None), *index)] * (w[0] * w[1] * w[2])
    result[np.setdiff1d(np.arange(probs.shape[0]), np.unique(probs.argmax(0)))] = -np.inf
    ordered = np.sort(result, axis=0)
    return result.argmax(0), ordered[-1] - ordered[-2]


@pytest.mark.parametrize("noise", [0.0, 1.0], ids=["organs", "noise"])
def test_return_to_input_grid_equals_full_trilinear_interpolation(noise: float) -> None:
    """Organs: most input voxels lie between model voxels of one class and skip the interpolation; noise: hardly
    any do, and the slab is interpolated whole. Either way every label is the argmax of the interpolated
    probabilities (except exact near-ties, where float32 rounding may pick either)."""
    generator = torch.Generator().manual_seed(0)
    grid = (17, 19, 23)
    z, y, x = torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in grid), indexing="ij")
    centres = [(8, 9, 11, 6.0), (4, 5, 6, 3.0), (12, 14, 17, 2.5), (3, 15, 4, 1.5)]  # organs of several sizes
    logits = torch.stack(
        [torch.zeros(grid)] + [4 * (1 - ((z - a) ** 2 + (y - b) ** 2 + (x - c) ** 2) / r**2) for a, b, c, r in centres]
    )
    logits += 20 * noise * torch.rand(logits.shape, generator=generator)
    logits = torch.cat([logits, torch.full((2, *grid), -9.0)])  # two classes that win nowhere
    probs = torch.softmax(logits, 0)
    lut = torch.tensor([0, 5, 0, 7, 9, 11, 13], dtype=torch.int32)  # class 2 is filtered out (value 0)
    scale, offset = np.array([0.45, 0.31, 0.5]), np.array([-1.3, 0.2, 0.0])
    shape = (42, 60, 46)
    out = np.zeros(shape, np.uint8)
    probs_to_grid(probs, (scale, offset), lut, out)
    mixed = float((_uniform_cell_values(probs.argmax(0), lut) < 0).float().mean())
    assert mixed < 0.2 if noise == 0 else mixed > 0.6  # each case takes the path it is meant to (cut at 1/3)
    classes, lead = _dense_reference(probs.double().numpy(), scale, offset, shape)
    clear = lead > 1e-5
    np.testing.assert_array_equal(out[clear], lut.numpy()[classes][clear])
    assert clear.mean() > 0.99 and set(np.unique(out)) == {0, 5, 7, 9}


def test_an_organ_on_the_model_grid_edge_reaches_the_input_edge() -> None:
    """Input voxels beyond the model grid's ends take its edge voxels' class, however far out they lie."""
    probs = torch.zeros(2, 4, 5, 6)
    probs[0], probs[1, 0], probs[0, 0] = 1.0, 1.0, 0.0  # the organ (class 1) fills the first model slice only
    out = np.zeros((10, 12, 14), np.uint8)
    # z = -1.3 + 0.4 i: input slices 0-4 lie at z < 0.5, nearer the organ slice (slice 0 more than a model voxel out).
    probs_to_grid(
        probs, (np.array([0.4, 0.4, 0.45]), np.array([-1.3, -0.4, -0.45])), torch.tensor([0, 5], dtype=torch.int32), out
    )
    assert (out[:5] == 5).all() and (out[5:] == 0).all()


def test_organ_filter_keeps_only_the_chosen_organs(sphere: Volume, tmp_path: Path) -> None:
    sphere.array[36:44, 36:44, 36:44] = 400.0  # a bright core: liver
    predictor = Predictor(_bundle(tmp_path / "m", spacing=4.0), "cpu")
    everything = predictor.predict_volume(sphere).array
    liver_only = predictor.predict_volume(sphere, organs=["liver"]).array
    assert set(np.unique(everything)) == {0, SPLEEN, LIVER}
    np.testing.assert_array_equal(liver_only, np.where(everything == LIVER, LIVER, 0))
    # the unknown name, its table and the closest organ
    with pytest.raises(ValueError, match=r"(?i)unknown organ.*'livr'.*'synapse13'.*did you mean 'liver'"):
        check_organs(SYNAPSE13, ["livr"])


def test_cps_ensemble_means_logits_or_takes_the_first_network(sphere: Volume, tmp_path: Path) -> None:
    def constant(organ: int, logit: float) -> VNet:
        net = VNet(num_classes=14, width=2)
        with torch.no_grad():
            net.head.weight.zero_()
            net.head.bias.fill_(-10.0)
            net.head.bias[organ] = logit
        return net

    # net0 says liver a little, net1 says spleen a lot: the mean says spleen.
    bundle = _bundle(tmp_path / "cps", spacing=8.0, networks=[constant(LIVER, 1.0), constant(SPLEEN, 5.0)])
    assert set(np.unique(Predictor(bundle, "cpu", body_crop=False).predict_volume(sphere).array)) == {SPLEEN}
    first = Predictor(bundle, "cpu", ensemble="first", body_crop=False)
    assert len(first.networks) == 1 and set(np.unique(first.predict_volume(sphere).array)) == {LIVER}


def test_progress_events_and_cancel(sphere: Volume, coarse_bundle: ModelBundle) -> None:
    stream = io.StringIO()
    Predictor(coarse_bundle, "cpu").predict_volume(
        sphere, progress=Progress(100, "segment", json_lines=True, stream=stream)
    )
    events = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert events[-1]["step"] == 100 and events[-1]["stage"] == "write"
    stages = list(dict.fromkeys(e["stage"] for e in events))
    assert stages == ["preprocess", "infer", "postprocess", "write"], "the Slicer panel's named states"
    assert [e["step"] for e in events] == sorted(e["step"] for e in events)
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(InferenceCancelled):
        Predictor(coarse_bundle, "cpu").predict_volume(sphere, cancel=cancel)


@pytest.mark.slow
def test_predict_file_writes_a_slicer_segmentation(sphere: Volume, coarse_bundle: ModelBundle, tmp_path: Path) -> None:
    write_image(tmp_path / "ct.nrrd", sphere)
    labels = Predictor(coarse_bundle, "cpu").predict_file(tmp_path / "ct.nrrd", tmp_path / "ct.seg.nrrd")
    np.testing.assert_array_equal(read_segmentation_labels(tmp_path / "ct.seg.nrrd", SYNAPSE13).array, labels.array)


def test_organ_volumes_are_in_millilitres(synthetic_labels: Volume) -> None:
    volumes = organ_volumes_ml(synthetic_labels, SYNAPSE13)
    voxel_ml = 0.7 * 1.3 * 2.9 / 1000
    assert volumes["liver"] == pytest.approx(6 * 11 * 15 * voxel_ml)
    assert volumes["adrenal_gland_right"] == pytest.approx(3 * 3 * 5 * voxel_ml)
    assert volumes["spleen"] == 0.0 and len(volumes) == 13


def test_overview_png_shows_three_views(samples, tmp_path: Path) -> None:
    import matplotlib.image

    sample = samples["ct_abdomen"]
    ct = read_image(sample.image)
    path = save_overview(tmp_path / "overview.png", ct, read_label(sample.label, reference=ct), SYNAPSE13)
    pixels = matplotlib.image.imread(path)
    assert pixels.shape[:2] == (600, 1500)
    liver = np.array(SYNAPSE13["liver"].color) / 255
    assert np.any(np.all(np.abs(pixels[..., :3] - liver) < 0.02, axis=-1))  # the legend swatch at least
    with pytest.raises(ValueError, match="ending in .png"):
        save_overview(tmp_path / "overview.jpg", ct, ct.with_array(np.zeros(ct.shape, np.uint8)), SYNAPSE13)
