"""Classical saliency: drawn scenes, the barrier distance by hand, output contract, input
errors, and real ECSSD photos against the centre prior."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from eps.errors import EpsError
from eps.saliency.classical import (
    PRIORS,
    barrier_distance,
    centre_prior,
    load_predictor,
    priors,
    saliency,
)


def disc_scene(h=96, w=128, centre=(48, 64), radius=18, textured=False, seed=0):
    """A red disc on a grey background (flat, or a blurred random texture)."""
    rng = np.random.default_rng(seed)
    if textured:
        noise = rng.integers(60, 160, (h, w, 3)).astype(np.uint8)
        img = cv2.GaussianBlur(noise, (0, 0), 1.0)
    else:
        img = np.full((h, w, 3), 120, np.uint8)
    mask = np.zeros((h, w), np.uint8)
    cv2.circle(mask, (centre[1], centre[0]), radius, 1, -1)
    img[mask > 0] = (220, 40, 40)
    return img, mask > 0


def border_band(h, w, width=6):
    band = np.zeros((h, w), bool)
    band[:width] = band[-width:] = True
    band[:, :width] = band[:, -width:] = True
    return band


@pytest.mark.parametrize("textured", [False, True])
@pytest.mark.parametrize("centre", [(48, 64), (30, 88)])
def test_disc_scores_higher_than_the_border(textured, centre):
    img, disc = disc_scene(centre=centre, textured=textured)
    sal = saliency(img).astype(float)
    inside = sal[cv2.erode(disc.astype(np.uint8), np.ones((5, 5))) > 0].mean()
    border = sal[border_band(*disc.shape)].mean()
    rest = sal[~disc & ~border_band(*disc.shape)].mean()
    assert inside > 200 and border < 30 and rest < 60, (inside, border, rest)


def test_each_prior_but_the_centre_finds_an_off_centre_disc():
    img, disc = disc_scene(centre=(30, 88))
    maps = priors(img)
    band = border_band(*disc.shape)
    for name in ("boundary", "border_colour", "contrast"):
        assert maps[name][disc].mean() > maps[name][band].mean() + 0.5, name


def test_priors_keys_shapes_and_ranges():
    img, _ = disc_scene(h=53, w=71, centre=(20, 30), radius=9, textured=True)
    maps = priors(img)
    assert set(maps) == set(PRIORS)
    for name, m in maps.items():
        assert m.shape == (53, 71) and m.dtype == np.float32, name
        assert 0 <= m.min() and m.max() <= 1, name
        assert m.max() > m.min(), name


def test_centre_prior_peaks_at_the_centre_and_is_symmetric():
    c = centre_prior(9, 13)
    assert c[4, 6] == pytest.approx(1)
    assert np.allclose(c, c[::-1]) and np.allclose(c, c[:, ::-1])
    assert c[0, 0] < c[2, 3] < c[4, 6]


def test_barrier_distance_by_hand():
    # border 0, an inner ring of 8 with a gap of 2 at (1, 2), the centre 3: the cheapest
    # path to the centre goes through the gap (max 3 - min 0), to the ring over the border
    image = np.zeros((5, 5), np.float32)
    image[1:4, 1:4] = 8
    image[1, 2] = 2
    image[2, 2] = 3
    dist = barrier_distance(image)[..., 0]
    expected = np.zeros((5, 5))
    expected[1:4, 1:4] = 8
    expected[1, 2] = 2
    expected[2, 2] = 3
    assert np.array_equal(dist, expected)


def test_barrier_distance_follows_a_winding_path_given_enough_rounds():
    # a spiral corridor of 0s in walls of 9 that touch the border; at its end an island of 9:
    # every 0 is joined to the border opening by 0s and every wall by 9s (distance 0), the
    # island only across the corridor (9 - 0). Each sweep round follows about four turns.
    image = np.full((9, 9), 9, np.float32)
    image[0:8, 1] = 0
    image[7, 1:8] = 0
    image[1:8, 7] = 0
    image[1, 3:8] = 0
    image[1:6, 3] = 0
    image[5, 3:6] = 0
    image[3:6, 5] = 0
    image[3, 4] = 0
    expected = np.zeros((9, 9))
    expected[4, 4] = 9
    assert np.array_equal(barrier_distance(image, rounds=4)[..., 0], expected)
    assert barrier_distance(image, rounds=1)[3, 4, 0] == 9  # one round stops after a few turns


@pytest.mark.parametrize("shape", [(37, 53), (200, 150), (301, 402)])
def test_output_shape_dtype_range(shape):
    img, _ = disc_scene(h=shape[0], w=shape[1], centre=(shape[0] // 2, shape[1] // 2),
                        radius=min(shape) // 5, textured=True)
    sal = saliency(img)
    assert sal.shape == shape and sal.dtype == np.uint8
    assert sal.min() == 0 and sal.max() == 255  # stretched to the full range


def test_deterministic_and_the_predictor_is_saliency():
    img, _ = disc_scene(textured=True, seed=3)
    first = saliency(img)
    assert np.array_equal(first, saliency(img.copy()))
    assert np.array_equal(first, load_predictor()(img))
    assert np.array_equal(first, saliency(np.asfortranarray(img)))  # memory layout does not matter


def test_flat_image_gives_a_flat_map():
    sal = saliency(np.full((40, 60, 3), 77, np.uint8))
    assert sal.shape == (40, 60) and np.all(sal == sal[0, 0])


def test_parameters_change_the_map_and_unknown_ones_are_refused():
    img, _ = disc_scene(textured=True)
    assert not np.array_equal(saliency(img), saliency(img, gain=0))
    with pytest.raises(EpsError, match="unknown parameter"):
        saliency(img, sharpness=3)


@pytest.mark.parametrize("bad", [
    np.zeros((20, 30), np.uint8),  # grey
    np.zeros((20, 30, 4), np.uint8),  # RGBA
    np.zeros((20, 30, 3), np.float32),  # float
    np.zeros((1, 30, 3), np.uint8),  # too small
    [[0, 0, 0]],  # not an array
])
def test_bad_input_is_one_line_error(bad):
    with pytest.raises(EpsError) as err:
        saliency(bad)
    assert "\n" not in str(err.value)
    with pytest.raises(EpsError):
        priors(bad)


def test_weights_are_refused(tmp_path):
    weights = tmp_path / "model.pth"
    with pytest.raises(EpsError, match="model.pth: classical needs no weights"):
        load_predictor(weights)


def test_ecssd_beats_the_centre_prior_and_an_empty_map(shared_dir):
    from eps.data.io import read_image, read_saliency
    from eps.saliency.metrics import f_adaptive, mae

    root = shared_dir / "data" / "ecssd_dev"
    if not root.is_dir():
        pytest.skip(f"{root} absent")
    ids = [f"{i:04d}" for i in range(7, 500, 50)]  # 10 images spread over both splits
    ours, centre, empty, f_ours, f_centre = [], [], [], [], []
    for image_id in ids:
        rgb = read_image(root / "images" / f"{image_id}.jpg")
        gt = read_saliency(root / "ground_truth_mask" / f"{image_id}.png") > 0
        pred = saliency(rgb) / 255.0
        prior = centre_prior(*gt.shape)
        ours.append(mae(pred, gt))
        centre.append(mae(prior, gt))
        empty.append(mae(np.zeros(gt.shape), gt))
        f_ours.append(f_adaptive(pred, gt))
        f_centre.append(f_adaptive(prior, gt))
    assert np.mean(ours) < np.mean(centre) - 0.05, (np.mean(ours), np.mean(centre))
    assert np.mean(ours) < np.mean(empty), (np.mean(ours), np.mean(empty))
    assert np.mean(f_ours) > np.mean(f_centre) + 0.05, (np.mean(f_ours), np.mean(f_centre))
