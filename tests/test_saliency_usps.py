"""usps: self-training on drawn scenes finds the object, checkpoint round trip, resume after
an interruption, and the one-line errors.

Everything runs on six 40 px images with a two-stage network at 32 px and a few epochs, so
the module takes seconds on one CPU core.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

import eps.saliency.usps as usps
from eps.data.io import write_rgb
from eps.errors import EpsError
from eps.saliency.classical import PRIORS

TINY = {"size": 32, "widths": [8, 16], "rounds": 2, "epochs": 6, "batch_size": 3, "lr": 5e-3, "crf": False}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def scene(seed: int, size: int = 40):
    """A red disc somewhere near the middle of a blurred grey-green texture, and its mask."""
    rng = np.random.default_rng(seed)
    noise = rng.integers(60, 140, (size, size, 3)).astype(np.uint8)
    noise[..., 1] = noise[..., 1] // 2 + 60
    image = cv2.GaussianBlur(noise, (0, 0), 1.0)
    centre = rng.integers(size // 2 - 5, size // 2 + 6, 2)
    mask = np.zeros((size, size), np.uint8)
    cv2.circle(mask, (int(centre[1]), int(centre[0])), int(rng.integers(7, 11)), 1, -1)
    image[mask > 0] = (210, 50, 40)
    return image, mask > 0


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("scenes")
    paths = []
    for seed in range(6):
        path = folder / f"im{seed}.png"
        write_rgb(path, scene(seed)[0])
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def trained(images, tmp_path_factory):
    out = tmp_path_factory.mktemp("model") / "usps.pt"
    return usps.train(images, out, TINY, progress=False)


def border(h: int, w: int, width: int = 4) -> np.ndarray:
    band = np.zeros((h, w), bool)
    band[:width] = band[-width:] = True
    band[:, :width] = band[:, -width:] = True
    return band


def test_training_makes_the_object_salient_on_an_unseen_image(trained):
    predict = usps.load_predictor(trained)
    image, disc = scene(seed=99, size=48)
    sal = predict(image)
    assert sal.shape == disc.shape and sal.dtype == np.uint8
    inside = sal[cv2.erode(disc.astype(np.uint8), np.ones((3, 3))) > 0].mean()
    outside = sal[border(*disc.shape)].mean()
    assert inside > outside + 80, (inside, outside)


def test_checkpoint_holds_config_params_and_history(trained):
    state = torch.load(trained, weights_only=True)
    assert state["format"] == usps.FORMAT
    assert state["config"] == {"widths": [8, 16], "size": 32, "crf": False, "priors": list(PRIORS)}
    assert state["params"] == {**usps.TRAIN_DEFAULTS, **TINY}
    assert len(state["history"]) == TINY["rounds"] and state["images"] == 6
    assert not trained.with_name(trained.name + ".round").exists()  # the round checkpoint is gone


def test_checkpoint_round_trip_gives_the_network_outputs(trained):
    """The predictor equals the saved network run by hand (mirror-averaged, resized back)."""
    image, _ = scene(seed=7, size=40)
    state = torch.load(trained, weights_only=True)
    net = usps.SaliencyNet(state["config"]["widths"], in_channels=3 + len(PRIORS))
    net.load_state_dict(state["state_dict"])
    net.eval()
    stack, maps = usps.network_input(image, 32, use_priors=True)
    np.testing.assert_array_equal(stack[..., :3], cv2.resize(image, (32, 32), interpolation=cv2.INTER_AREA))
    assert list(maps) == list(PRIORS) and stack.shape == (32, 32, 3 + len(PRIORS))
    x = torch.from_numpy(stack).permute(2, 0, 1)[None].float() / 255
    x = torch.cat([(x[:, :3] - usps.MEAN) / usps.STD, (x[:, 3:] - 0.5) * 4], 1)
    with torch.no_grad():
        prob = (torch.sigmoid(net(x)) + torch.sigmoid(net(x.flip(3))).flip(3))[0, 0].numpy() / 2
    expected = np.round(cv2.resize(prob, (40, 40), interpolation=cv2.INTER_LINEAR).clip(0, 1) * 255)
    got = usps.load_predictor(trained)(image)
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1
    np.testing.assert_array_equal(got, usps.load_predictor(trained)(image))


def test_resume_after_an_interruption_continues_from_the_saved_round(images, tmp_path, monkeypatch):
    whole = usps.train(images, tmp_path / "whole.pt", TINY, progress=False)

    real_round = usps._train_round
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(args[-2])  # the round's description
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed during round 2
        return real_round(*args, **kwargs)

    out = tmp_path / "resumed.pt"
    monkeypatch.setattr(usps, "_train_round", interrupted)
    with pytest.raises(KeyboardInterrupt):
        usps.train(images, out, TINY, progress=False)
    partial = out.with_name(out.name + ".round")
    assert not out.exists() and torch.load(partial, weights_only=True)["round"] == 1

    def counted(*args, **kwargs):
        calls.append(args[-2])
        return real_round(*args, **kwargs)

    calls.clear()
    monkeypatch.setattr(usps, "_train_round", counted)
    usps.train(images, out, TINY, progress=False)
    assert calls == ["usps round 2/2"]  # round 1 was not trained again
    assert not partial.exists()
    resumed, reference = torch.load(out, weights_only=True), torch.load(whole, weights_only=True)
    assert resumed["history"] == reference["history"]
    for key, value in reference["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][key], value, rtol=0, atol=0)


def test_a_round_checkpoint_of_other_parameters_is_ignored(images, tmp_path, monkeypatch):
    out = tmp_path / "m.pt"
    usps._save(out.with_name(out.name + ".round"), {"run": "another run", "round": 1})
    calls = []
    real_round = usps._train_round
    monkeypatch.setattr(usps, "_train_round", lambda *a, **k: calls.append(a[-2]) or real_round(*a, **k))
    usps.train(images, out, {**TINY, "rounds": 1}, progress=False)
    assert calls == ["usps round 1/1"] and out.is_file()


@pytest.mark.parametrize("fusion", ["classical", "mean"])
@pytest.mark.parametrize("crf", [False, True])
def test_pseudo_label_fuses_the_priors_on_the_object(fusion, crf):
    image, disc = scene(seed=3, size=40)
    _, maps = usps.network_input(image, 40, use_priors=False)
    label, weight = usps.pseudo_label(image, maps, 40, {**usps.TRAIN_DEFAULTS, "fusion": fusion, "crf": crf})
    assert label.shape == weight.shape == (40, 40) and label.dtype == np.float32
    inner = cv2.erode(disc.astype(np.uint8), np.ones((3, 3))) > 0
    assert label[inner].mean() > label[border(40, 40)].mean() + 0.4
    assert weight.min() == 1  # agreement 1: no pixel left out


def test_agreement_leaves_out_the_pixels_where_priors_disagree():
    image, _ = scene(seed=3, size=40)
    maps = {"a": np.zeros((40, 40), np.float32), "b": np.zeros((40, 40), np.float32)}
    maps["b"][:10] = 0.8  # disagree on the top rows
    maps["b"][10:20] = 0.1  # nearly agree below
    _, weight = usps.pseudo_label(image, maps, 40, {**usps.TRAIN_DEFAULTS, "fusion": "mean", "crf": False,
                                                    "agreement": 0.25})
    assert (weight[:10] == 0).all() and (weight[10:] == 1).all()


def test_hard_targets_threshold_at_twice_the_mean_and_ignore_the_band():
    labels = np.zeros((1, 4, 5), np.float32)
    labels[0, 0] = [1.0, 0.8, 0.6, 0.4, 0.2]  # with row 1: mean 3.4 / 20 = 0.17
    labels[0, 1, :2] = 0.2  # threshold 0.34, background below 0.17
    weights = np.ones_like(labels)
    weights[0, 3, 4] = 0  # left out before: stays out
    params = {**usps.TRAIN_DEFAULTS, "targets": "hard", "high": 0.9, "low": 0.5}
    target, weight = usps._targets(labels, weights, params)
    expected_target = np.zeros((4, 5), np.float32)
    expected_target[0, :4] = 1
    expected_weight = np.ones((4, 5), np.float32)
    expected_weight[0, 4] = expected_weight[1, :2] = 0  # 0.2: in the band 0.17..0.34
    expected_weight[3, 4] = 0
    np.testing.assert_array_equal(target[0], expected_target)
    np.testing.assert_array_equal(weight[0], expected_weight)
    soft = usps._targets(labels, weights, {**params, "targets": "soft"})
    assert soft[0] is labels and soft[1] is weights


def test_augmentation_moves_labels_and_prior_channels_with_the_image():
    """The same warp for every channel: a prior channel equal to the label stays equal to it."""
    gen = torch.Generator().manual_seed(0)
    label = torch.zeros(4, 1, 16, 16)
    label[:, :, 2:9, 3:7] = 1
    rgb = torch.rand(4, 3, 16, 16, generator=gen)
    batch, labels, weights = usps._augment(torch.cat([rgb, label], 1), label.clone(), torch.ones_like(label), gen)
    torch.testing.assert_close(batch[:, 3:], labels)
    assert not torch.equal(labels, label)  # something moved
    assert batch[:, :3].min() >= 0 and batch[:, :3].max() <= 1


def test_missing_weights_and_foreign_files(tmp_path):
    with pytest.raises(EpsError, match=r"^usps needs --weights FILE \(made by `eps train-saliency --method usps`\)$"):
        usps.load_predictor(None)
    missing = tmp_path / "missing.pt"
    with pytest.raises(EpsError, match="missing.pt: file not found"):
        usps.load_predictor(missing)
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint\n")
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {}, "meta": {}}, other)
    for path in (text, other):
        with pytest.raises(EpsError, match=f"^{path}: not a usps checkpoint") as err:
            usps.load_predictor(path)
        assert "\n" not in str(err.value)


def test_weights_that_do_not_fit_the_network(trained, tmp_path):
    state = torch.load(trained, weights_only=True)
    state["config"]["widths"] = [16, 32]
    bad = tmp_path / "bad.pt"
    torch.save(state, bad)
    with pytest.raises(EpsError, match=f"^{bad}: usps weights do not fit"):
        usps.load_predictor(bad)


def test_unreadable_image_names_the_file_and_writes_nothing(images, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    out = tmp_path / "model.pt"
    with pytest.raises(EpsError, match=f"^{broken}: cannot decode image"):
        usps.train([*images[:2], str(broken)], out, TINY, progress=False)
    assert list(tmp_path.iterdir()) == [broken]


@pytest.mark.parametrize("params, message", [
    ({"rounds": 0}, "usps.rounds"),
    ({"size": 33}, "usps.size"),  # not a multiple of the stride, 2
    ({"widths": [8, 12]}, "usps.widths"),
    ({"targets": "fuzzy"}, "usps.targets"),
    ({"lr": "fast"}, "usps.lr"),
    ({"label_momentum": 1.5}, "usps.label_momentum"),
    ({"colour": 1}, "unknown parameter"),
])
def test_bad_parameters(images, tmp_path, params, message):
    with pytest.raises(EpsError, match=message):
        usps.train(images, tmp_path / "m.pt", {**TINY, **params}, progress=False)
    assert not list(tmp_path.iterdir())


def test_no_images(tmp_path):
    with pytest.raises(EpsError, match="no training images"):
        usps.train([], tmp_path / "m.pt", TINY, progress=False)


def test_round_one_labels_of_real_photos_beat_the_centre_prior(shared_dir):
    """On 10 ECSSD photos the CRF-sharpened fused label is far closer to the masks than the centre prior."""
    from eps.data.io import read_image, read_saliency
    from eps.saliency.classical import centre_prior
    from eps.saliency.metrics import mae

    root = shared_dir / "data" / "ecssd_dev"
    ours, centre = [], []
    for i in range(1, 11):
        rgb = read_image(root / "images" / f"{i:04d}.jpg")
        mask = cv2.resize(read_saliency(root / "ground_truth_mask" / f"{i:04d}.png"), (112, 112)) > 127
        _, maps = usps.network_input(rgb, 112, use_priors=False)
        label, _ = usps.pseudo_label(rgb, maps, 112, usps.TRAIN_DEFAULTS)
        ours.append(mae(label, mask))
        centre.append(mae(centre_prior(112, 112), mask))
    assert np.mean(ours) < np.mean(centre) - 0.1, (np.mean(ours), np.mean(centre))
