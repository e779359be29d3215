"""The saliency stage's front door: method dispatch, HDF5 shards, folders of PNGs, the CLI."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from eps.cli import SALIENCY_METHODS, main
from eps.data.io import read_saliency, write_rgb
from eps.errors import EpsError
from eps.saliency import METHODS, extract_shard, get_predictor, predict_folder


def disc_image(size=48, seed=0):
    """A bright disc on a dull, mildly textured background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    img = np.full((size, size, 3), 90, np.float32) + rng.normal(0, 6, (size, size, 3))
    disc = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 5) ** 2
    img[disc] = (230, 40, 30)
    return np.clip(img, 0, 255).astype(np.uint8), disc


@pytest.fixture
def image_folder(tmp_path):
    folder = tmp_path / "images"
    for i in range(3):
        write_rgb(folder / f"im{i}.png", disc_image(seed=i)[0])
    return folder


def test_cli_lists_the_same_methods():
    assert tuple(SALIENCY_METHODS) == METHODS


def test_unknown_method_and_precomputed_have_no_predictor():
    with pytest.raises(EpsError, match="unknown method 'nope'"):
        get_predictor("nope")
    with pytest.raises(EpsError, match="precomputed"):
        get_predictor("precomputed")


@pytest.mark.parametrize("method", ["usps", "pfan", "dss"])
def test_network_methods_need_weights(method):
    with pytest.raises(EpsError, match="--weights"):
        get_predictor(method, None)


def test_predict_folder_writes_one_png_per_image(image_folder, tmp_path):
    out = tmp_path / "maps"
    assert predict_folder("classical", image_folder, out, device="cpu", progress=False) == 3
    for i in range(3):
        sal = read_saliency(out / f"im{i}.png")
        _, disc = disc_image(seed=i)
        assert sal.shape == disc.shape
        assert sal[disc].mean() > sal[~disc].mean() + 50
    assert not list(out.glob("*.tmp*"))


def test_predict_folder_errors(tmp_path):
    with pytest.raises(EpsError, match="no images"):
        predict_folder("classical", tmp_path, tmp_path / "out")
    with pytest.raises(EpsError, match="not a folder"):
        predict_folder("classical", tmp_path / "missing", tmp_path / "out")


def test_extract_shard_with_a_predictor(tiny_voc, tmp_path):
    from eps.data.build import build_index

    index = tmp_path / "index.csv"
    build_index({"type": "voc", "name": "tiny", "root": str(tiny_voc), "saliency_dir": "SALImages",
                 "splits": {"train": "train.txt"}}, index)
    out = tmp_path / "shard.h5"
    extract_shard(index, "classical", "1-of-1", out, device="cpu", progress=False)
    with h5py.File(out) as f:
        assert f.attrs["method"] == "classical"
        ids = sorted(f)
        assert ids and all(f[i].dtype == np.uint8 and f[i].shape == (12, 16) for i in ids)


def test_cli_folder_mode_and_eval(image_folder, tmp_path, capsys):
    out = tmp_path / "maps"
    assert main(["saliency", "--method", "classical", "--images", str(image_folder), "--out", str(out),
                 "--device", "cpu"]) == 0
    gt = tmp_path / "gt"
    from eps.data.io import write_gray_png

    for i in range(3):
        write_gray_png(gt / f"im{i}.png", disc_image(seed=i)[1].astype(np.uint8) * 255)
    result = tmp_path / "sal.json"
    assert main(["eval-saliency", "--pred", str(out), "--gt", str(gt), "--out", str(result)]) == 0
    scores = json.loads(result.read_text())
    assert scores["images"] == 3
    assert scores["mae"] < 0.3 and scores["f_adaptive"] > 0.5


def test_cli_needs_exactly_one_source(tmp_path, capsys):
    assert main(["saliency", "--method", "classical", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "exactly one of --index" in err[0]


def test_cli_train_saliency_rejects_untrainable_and_missing_masks(image_folder, tmp_path, capsys):
    assert main(["train-saliency", "--method", "pfan", "--images", str(image_folder),
                 "--out", str(tmp_path / "m.pt"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--masks" in err[0]
    assert not (tmp_path / "m.pt").exists()


def test_eval_saliency_of_shards_against_the_dataset_masks(tiny_voc, tmp_path, capsys):
    """The tiny dataset's saliency PNGs are its masks (void included): a perfect score."""
    from eps.data.build import build_index

    index = tmp_path / "index.csv"
    build_index({"type": "voc", "name": "tiny", "root": str(tiny_voc), "saliency_dir": "SALImages",
                 "splits": {"train": "train.txt"}}, index)
    shard = extract_shard(index, "precomputed", "1-of-1", tmp_path / "sal.h5", progress=False)
    gt = tiny_voc / "SegmentationClass"
    out = tmp_path / "scores.json"
    assert main(["eval-saliency", "--shards", str(shard), "--gt", str(gt), "--out", str(out)]) == 0
    scores = json.loads(out.read_text())
    with h5py.File(shard) as f:
        count = len(f)
    assert scores["images"] == count and scores["skipped"] == 0
    assert scores["mae"] == 0 and scores["f_adaptive"] == pytest.approx(1)
    # an image without a mask (a test split) is skipped and counted
    missing = sorted(gt.glob("*.png"))[0]
    missing.unlink()
    assert main(["eval-saliency", "--shards", str(shard), "--gt", str(gt), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["skipped"] == 1
    capsys.readouterr()
    assert main(["eval-saliency", "--shards", str(shard), "--gt", str(tmp_path / "none"), "--out", str(out)]) == 2
    assert main(["eval-saliency", "--shards", str(shard), "--pred", str(tmp_path), "--gt", str(gt),
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "folder not found" in err[0] and "exactly one of --pred" in err[1]


@pytest.mark.parametrize("bad", [np.zeros((8, 8), np.uint8), np.zeros((8, 8, 3), np.float32),
                                 np.zeros((8, 8, 4), np.uint8), [[1, 2, 3]]])
def test_predictors_refuse_what_is_not_an_rgb_uint8_image(bad):
    from eps.saliency import check_rgb
    from eps.saliency.dss import DSS, predictor

    with pytest.raises(EpsError, match="^pfan saliency: expected an H x W x 3 uint8 RGB image"):
        check_rgb(bad, "pfan")
    with pytest.raises(EpsError, match="^dss saliency: expected"):
        predictor(DSS())(bad)
    with pytest.raises(EpsError, match="^classical saliency: expected"):
        get_predictor("classical")(bad)
