"""Bad input: one line naming the file and the problem, exit status 2, no traceback, no partial output.

One test per row of the failure table in docs/reliability.md. Every case runs the real `eps`
command (`python -m eps`) in a subprocess, on a 6 + 2 image synthetic world of 32 px.
"""

from __future__ import annotations

import json
import re
import struct
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest
import tiny_workflow
import torch
import yaml
from PIL import Image

from .helpers import ROOT, TRAIN_PARAMS, assert_user_error, eps, leftovers, subprocess_env, synthetic_block

ID = "syn_train_00001"
CLASSES = ["train", "boat", "bird", "cow", "plane"]


def index_outputs(out_dir: Path) -> list[Path]:
    """What the index stage writes (there must be none of it after a refusal)."""
    return [p for p in (out_dir / "index.csv", out_dir / "classes.json", out_dir / "ids") if p.exists()]


def run_index(block: dict, out_dir: Path):
    return eps("index", "--dataset", json.dumps(block), "--out", out_dir / "index.csv")


def params(**overrides) -> str:
    return json.dumps({**TRAIN_PARAMS, **overrides})


def png_bytes(array: np.ndarray, color_type: int, depth: int) -> bytes:
    """A PNG of any colour type and bit depth (Pillow cannot write 16-bit gray + alpha)."""
    array = np.asarray(array)
    h, w = array.shape[:2]
    dtype = ">u2" if depth == 16 else "u1"
    raw = b"".join(b"\x00" + array[y].astype(dtype).tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
            + chunk(b"IEND", b""))


def flip_a_bit(path: Path) -> None:
    """One bit of the compressed data: the chunk checksum no longer matches."""
    data = bytearray(path.read_bytes())
    data[data.find(b"IDAT") + 12] ^= 0x01
    path.write_bytes(bytes(data))


def truncate(path: Path, fraction: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


# ---------------------------------------------------------------------------- corrupt images


@pytest.mark.parametrize("method", ["precomputed", "classical"])
def test_corrupt_image_in_the_saliency_stage(indexed, method):
    image = indexed["data"] / "JPEGImages" / f"{ID}.jpg"
    image.write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    out = indexed["root"] / "sal" / "shard-1-of-1.h5"
    proc = eps("saliency", "--method", method, "--index", indexed["index"], "--out", out)
    assert_user_error(proc, image, "cannot decode image", only_line=False)
    assert not out.exists() and not leftovers(indexed["root"])


@pytest.mark.parametrize("method", ["precomputed", "classical"])
def test_image_missing_after_indexing(indexed, method):
    image = indexed["data"] / "JPEGImages" / f"{ID}.jpg"
    image.unlink()
    out = indexed["root"] / "sal.h5"
    assert_user_error(eps("saliency", "--method", method, "--index", indexed["index"], "--out", out),
                      image, "file not found", only_line=False)
    assert not out.exists() and not leftovers(indexed["root"])


def test_truncated_saliency_png(indexed):
    sal = indexed["data"] / "SALImages" / f"{ID}.png"
    truncate(sal, 0.5)
    out = indexed["root"] / "sal.h5"
    assert_user_error(eps("saliency", "--method", "precomputed", "--index", indexed["index"], "--out", out),
                      sal, "cannot decode image", only_line=False)
    assert not out.exists() and not leftovers(indexed["root"])


def test_corrupt_mask_png_when_labels_come_from_masks(world, tmp_path):
    mask = world / "SegmentationClass" / f"{ID}.png"
    flip_a_bit(mask)
    block = {"type": "voc", "name": "t", "root": str(world), "splits": {"train": "train.txt"},
             "mask_dir": "SegmentationClass", "classes": CLASSES}  # no labels_file: labels from masks
    assert_user_error(run_index(block, tmp_path / "idx"), mask, "cannot decode image")
    assert not index_outputs(tmp_path / "idx")


@pytest.mark.parametrize("num_workers", [0, 1])
def test_truncated_jpeg_stops_training(indexed, num_workers):
    image = indexed["data"] / "JPEGImages" / f"{ID}.jpg"
    truncate(image, 0.6)  # the header survives: only decoding finds out
    out = indexed["root"] / "cam" / "classifier.pt"
    proc = eps("train-classifier", "--index", indexed["index"], "--out", out,
               "--params", params(iterations=3, num_workers=num_workers, checkpoint_every=100))
    line = assert_user_error(proc, image, "cannot decode image", only_line=False)
    assert "truncated" in line and "DataLoader" not in line  # a worker's error arrives unwrapped
    for name in ("classifier.pt", "classifier.json", "train_log.csv", "checkpoints/last.pt"):
        assert not (out.parent / name).exists(), name
    assert not leftovers(indexed["root"])


def test_a_corrupt_checkpoint_is_set_aside_and_training_restarts(indexed):
    out = indexed["root"] / "cam" / "classifier.pt"
    ckpt = out.parent / "checkpoints" / "last.pt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"PK\x03\x04 half a checkpoint")
    proc = eps("train-classifier", "--index", indexed["index"], "--out", out, "--params", params())
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "last.pt: unreadable checkpoint" in proc.stderr and "set aside as last.pt.corrupt" in proc.stderr
    assert out.is_file() and (ckpt.parent / "last.pt.corrupt").read_bytes().startswith(b"PK")


@pytest.fixture
def eval_dirs(world, tmp_path) -> dict:
    """Ground truth and a perfect prediction (copies of the world's masks) for the train split."""
    ids = (world / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    pred = tmp_path / "pred"
    pred.mkdir()
    for i in ids:
        (pred / f"{i}.png").write_bytes((world / "SegmentationClass" / f"{i}.png").read_bytes())
    ids_file = tmp_path / "train.txt"
    ids_file.write_text("\n".join(ids) + "\n")
    return {"gt": world / "SegmentationClass", "pred": pred, "ids": ids_file, "out": tmp_path / "metrics"}


def evaluate(d):
    return eps("evaluate-masks", "--pred", d["pred"], "--gt", d["gt"], "--ids", d["ids"],
               "--num-classes", len(CLASSES) + 1, "--out", d["out"])


def test_evaluate_masks_truncated_prediction(eval_dirs):
    bad = eval_dirs["pred"] / f"{ID}.png"
    truncate(bad, 0.5)
    assert_user_error(evaluate(eval_dirs), bad, "cannot decode image")
    assert not eval_dirs["out"].exists() or not any(eval_dirs["out"].iterdir())


def test_evaluate_masks_prediction_of_another_size(eval_dirs):
    bad = eval_dirs["pred"] / f"{ID}.png"
    Image.open(bad).resize((40, 24), Image.NEAREST).save(bad)
    assert_user_error(evaluate(eval_dirs), bad, "prediction size 40x24 differs from the ground truth 32x32")
    assert not eval_dirs["out"].exists() or not any(eval_dirs["out"].iterdir())
    ok = evaluate(dict(eval_dirs, pred=eval_dirs["gt"]))  # the same command on good input works
    assert ok.returncode == 0, ok.stderr
    assert json.loads((eval_dirs["out"] / "metrics.json").read_text())["miou"] == 1.0


def test_evaluate_masks_prediction_values_that_are_no_class(eval_dirs):
    bad = eval_dirs["pred"] / f"{ID}.png"
    grey = np.full((32, 32), 128, np.uint8)  # a raw grey map given as a prediction
    Image.fromarray(grey, mode="L").save(bad)
    assert_user_error(evaluate(eval_dirs), bad, "prediction value 128 is not a class (0..5) or void (255)")
    assert not eval_dirs["out"].exists() or not any(eval_dirs["out"].iterdir())


@pytest.mark.parametrize("content, problem", [
    (b"", "lists no ids"),
    (f"{ID}\n{ID}\n".encode(), f"id '{ID}' is listed twice"),
    (b"\xff\xfe\x00bad", "not a UTF-8 text file"),
])
def test_evaluate_masks_bad_ids_file(eval_dirs, content, problem):
    eval_dirs["ids"].write_bytes(content)
    assert_user_error(evaluate(eval_dirs), eval_dirs["ids"], problem)
    assert not eval_dirs["out"].exists()


@pytest.mark.parametrize("extra, problem", [
    (["--boundary-tolerance", "nan"], "--boundary-tolerance: expected a non-negative number"),
    (["--boundary-tolerance", "-1"], "--boundary-tolerance: expected a non-negative number"),
])
def test_evaluate_masks_bad_numbers(eval_dirs, extra, problem):
    proc = eps("evaluate-masks", "--pred", eval_dirs["pred"], "--gt", eval_dirs["gt"], "--ids", eval_dirs["ids"],
               "--num-classes", len(CLASSES) + 1, "--out", eval_dirs["out"], *extra)
    assert_user_error(proc, problem)
    assert not eval_dirs["out"].exists()


def test_evaluate_masks_absurd_class_count(eval_dirs):
    proc = eps("evaluate-masks", "--pred", eval_dirs["pred"], "--gt", eval_dirs["gt"], "--ids", eval_dirs["ids"],
               "--num-classes", 2000000, "--out", eval_dirs["out"])
    assert_user_error(proc, "--num-classes: expected 1..255")
    assert not eval_dirs["out"].exists()


# ---------------------------------------------------------------------------- missing files, ids


def test_listed_id_without_an_image(world, tmp_path):
    listing = world / "ImageSets" / "Segmentation" / "train.txt"
    listing.write_text(listing.read_text() + "syn_train_00042\n")
    line = assert_user_error(run_index(synthetic_block(world), tmp_path / "idx"), listing, "'syn_train_00042'")
    assert "syn_train_00042.jpg not found" in line
    assert not index_outputs(tmp_path / "idx")


@pytest.mark.parametrize("when", ["before indexing", "after indexing"])
def test_saliency_map_missing(world, tmp_path, when):
    from eps.data.build import build_index

    sal = world / "SALImages" / f"{ID}.png"
    index = tmp_path / "idx" / "index.csv"
    if when == "before indexing":
        sal.unlink()
        build_index(synthetic_block(world), index)
        expected = (world / "JPEGImages" / f"{ID}.jpg", f"no saliency map indexed for image '{ID}'")
    else:
        build_index(synthetic_block(world), index)
        sal.unlink()
        expected = (sal, "file not found")
    out = tmp_path / "sal.h5"
    assert_user_error(eps("saliency", "--method", "precomputed", "--index", index, "--out", out), *expected, only_line=False)
    assert not out.exists() and not leftovers(tmp_path)


def test_saliency_map_of_another_size_is_resized_with_a_warning_or_refused_in_strict_mode(indexed):
    sal = indexed["data"] / "SALImages" / f"{ID}.png"
    Image.open(sal).resize((40, 24), Image.BILINEAR).save(sal)
    out = indexed["root"] / "sal.h5"
    proc = eps("saliency", "--method", "precomputed", "--index", indexed["index"], "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert f"{sal}: saliency map is 40x24, image is 32x32; resized" in proc.stderr
    with h5py.File(out) as f:
        assert f[ID].shape == (32, 32) and f[ID].dtype == np.uint8
    out.unlink()
    strict = eps("saliency", "--method", "precomputed", "--index", indexed["index"], "--strict", "--out", out)
    assert_user_error(strict, sal, "saliency map is 40x24, image is 32x32", only_line=False)
    assert not out.exists() and not leftovers(indexed["root"])


def test_a_16_bit_grey_image_is_rescaled_not_clipped(tmp_path):
    """A 16-bit grey photo reads as its 8-bit values (PIL's convert would give all 255)."""
    grey = np.arange(0, 64 * 48, dtype=np.uint16).reshape(48, 64) % 256
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "g16.png").write_bytes(png_bytes(grey * 257, 0, 16))
    from eps.data.io import read_image

    image = read_image(tmp_path / "imgs" / "g16.png")
    assert image.shape == (48, 64, 3) and image.dtype == np.uint8
    assert np.array_equal(image[:, :, 0], grey.astype(np.uint8)) and np.array_equal(image[:, :, 2], image[:, :, 0])
    proc = eps("saliency", "--method", "classical", "--images", tmp_path / "imgs", "--out", tmp_path / "sal")
    assert proc.returncode == 0, proc.stderr
    assert 0 < np.asarray(Image.open(tmp_path / "sal" / "g16.png")).mean() < 255


def test_saliency_maps_with_alpha_or_16_bit_depth_load_correctly(indexed):
    """RGBA, gray + alpha (8 and 16 bit) and 16-bit gray maps give the 8-bit values they hold."""
    sal_dir = indexed["data"] / "SALImages"
    ids = (indexed["root"] / "idx" / "ids" / "train.txt").read_text().split()
    rng = np.random.default_rng(0)
    expected = {}
    for k, image_id in enumerate(ids):
        path = sal_dir / f"{image_id}.png"
        a = np.asarray(Image.open(path).convert("L"))
        a16 = a.astype(np.uint16) * 257
        alpha = rng.integers(0, 256, a.shape).astype(np.uint8)  # any alpha: ignored
        kind = k % 5
        if kind == 0:  # RGBA 8 bit
            path.write_bytes(png_bytes(np.stack([a, a, a, alpha], -1), 6, 8))
        elif kind == 1:  # gray + alpha 8 bit
            path.write_bytes(png_bytes(np.stack([a, alpha], -1), 4, 8))
        elif kind == 2:  # gray 16 bit
            path.write_bytes(png_bytes(a16, 0, 16))
        elif kind == 3:  # gray + alpha 16 bit
            path.write_bytes(png_bytes(np.stack([a16, alpha.astype(np.uint16) * 257], -1), 4, 16))
        else:  # a dark 16-bit map: values below 256 are dark, not full range
            dark = (a.astype(np.uint16) // 2)
            path.write_bytes(png_bytes(dark, 0, 16))
            a = np.zeros_like(a)  # round(dark / 65535 * 255) == 0
        expected[image_id] = a
    out = indexed["root"] / "sal.h5"
    proc = eps("saliency", "--method", "precomputed", "--index", indexed["index"], "--strict", "--out", out)
    assert proc.returncode == 0, proc.stderr
    with h5py.File(out) as f:
        for image_id, a in expected.items():
            assert f[image_id].dtype == np.uint8
            assert np.array_equal(f[image_id][()], a), image_id


def test_image_without_labels(world, tmp_path):
    table = np.load(world / "cls_labels.npy", allow_pickle=True).item()
    del table[ID]
    np.save(world / "cls_labels.npy", table, allow_pickle=True)
    (world / "SegmentationClass" / f"{ID}.png").unlink()
    listing = world / "ImageSets" / "Segmentation" / "train.txt"
    line = assert_user_error(run_index(synthetic_block(world), tmp_path / "idx"), listing, f"'{ID}': no labels")
    assert "cls_labels.npy" in line
    assert not index_outputs(tmp_path / "idx")


def test_label_vector_of_the_wrong_length(world, tmp_path):
    labels = world / "cls_labels.npy"
    table = np.load(labels, allow_pickle=True).item()
    table[ID] = np.zeros(6, np.float32)
    np.save(labels, table, allow_pickle=True)
    assert_user_error(run_index(synthetic_block(world), tmp_path / "idx"), labels,
                      f"id '{ID}': label vector has length 6, expected 5")
    assert not index_outputs(tmp_path / "idx")


@pytest.mark.parametrize("vector, problem", [
    (np.array([np.nan, 1, 0, 0, 0], np.float32), "label vector holds NaN or infinite values"),
    (np.array(["1", "0", "0", "0", "0"]), "label vector holds str"),
])
def test_label_vector_that_is_not_numbers(world, tmp_path, vector, problem):
    labels = world / "cls_labels.npy"
    table = np.load(labels, allow_pickle=True).item()
    table[ID] = vector
    np.save(labels, table, allow_pickle=True)
    assert_user_error(run_index(synthetic_block(world), tmp_path / "idx"), labels, f"id '{ID}': {problem}")
    assert not index_outputs(tmp_path / "idx")


@pytest.fixture
def folder_dataset(world, tmp_path) -> Path:
    root = tmp_path / "folder"
    (root / "images").mkdir(parents=True)
    for i in range(3):
        name = f"syn_train_{i:05d}.jpg"
        (root / "images" / name).write_bytes((world / "JPEGImages" / name).read_bytes())
    return root


def test_unknown_class_name_in_a_csv(folder_dataset, tmp_path):
    csv = folder_dataset / "labels.csv"
    csv.write_text("id,labels\nsyn_train_00000,train\nsyn_train_00001,boat;tram\n")
    block = {"type": "folder", "name": "f", "root": str(folder_dataset), "labels_csv": "labels.csv",
             "classes": ["train", "boat"]}
    assert_user_error(run_index(block, tmp_path / "idx"), csv, "line 3: unknown class 'tram'")
    assert not index_outputs(tmp_path / "idx")


@pytest.mark.parametrize("entry, problem", [
    ("../syn_train_00000", "contains a path separator"),
    ("syn/train_00000", "contains a path separator"),
    ("..", "contains '..'"),
    ("syn..train", "contains '..'"),
    (".", "starts with '.'"),
    (".hidden", "starts with '.'"),
])
def test_id_with_a_path_separator_or_dots_in_a_list(world, tmp_path, entry, problem):
    listing = world / "ImageSets" / "Segmentation" / "train.txt"
    listing.write_text(f"syn_train_00000\n{entry}\n")
    line = assert_user_error(run_index(synthetic_block(world), tmp_path / "idx"), listing, "line 2:", problem)
    assert repr(entry) in line
    assert not index_outputs(tmp_path / "idx")


def test_image_name_with_dots_in_a_csv(folder_dataset, tmp_path):
    csv = folder_dataset / "labels.csv"
    csv.write_text("image,labels\nsyn_train_00000.jpg,train\n../images/syn_train_00001.jpg,boat\n")
    block = {"type": "folder", "name": "f", "root": str(folder_dataset), "labels_csv": "labels.csv"}
    assert_user_error(run_index(block, tmp_path / "idx"), csv, "line 3:", "contains '..'")
    assert not index_outputs(tmp_path / "idx")


def test_id_with_dots_in_a_hand_edited_index(indexed):
    index = indexed["index"]
    text = index.read_text().replace(f"{ID},", "../../evil,", 1)
    index.write_text(text)
    out = indexed["root"] / "sal.h5"
    assert_user_error(eps("saliency", "--index", index, "--out", out), index, "line 3:", "path separator",
                      only_line=False)
    assert not out.exists() and not leftovers(indexed["root"])
    assert not (indexed["root"].parent / "evil.png").exists()


# ---------------------------------------------------------------------------- configuration


def _config_with(change) -> dict:
    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    change(cfg)
    return cfg


@pytest.mark.parametrize("name, change, key", [
    ("wrong type", lambda c: c["classifier"].update(iterations="many"), "iterations"),
    ("wrong type in a list", lambda c: c["infer"].update(scales=["big"]), "scales"),
    ("unknown key", lambda c: c["classifier"].update(learning_rate=0.1), "learning_rate"),
    ("unknown top-level key", lambda c: c.update(shardz=2), "shardz"),
    ("unknown key in a variant", lambda c: c["variants"]["eps"].update(lamda=0.5), "lamda"),
    ("wrong type in a variant", lambda c: c["variants"]["eps"].update(tau="high"), "tau"),
    ("a string for a number", lambda c: c["classifier"].update(lr="0.01"), "classifier.lr"),
    ("train split not a split", lambda c: c.update(train_split="train_aug"), "train_split"),
    ("evaluation split not a split", lambda c: c["evaluation"].update(splits=["test"]), "evaluation.splits"),
    ("variant name with a slash", lambda c: c["variants"].update({"a/b": {"loss": "cam"}}), "variants"),
    ("variant name ..", lambda c: c["variants"].update({"..": {"loss": "cam"}}), "variants"),
    ("dataset name ..", lambda c: c["dataset"].update(name=".."), "dataset.name"),
])
def test_bad_config_is_refused_by_a_dry_run(tmp_path, name, change, key):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(_config_with(change)))
    proc = tiny_workflow.snakemake(
        ["-n", "--cores", "1", "-s", ROOT / "Snakefile", "--directory", tmp_path / "run", "--configfile",
         config], timeout=120, env=subprocess_env())
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-2000:]
    assert "Traceback" not in out, out[-2000:]
    lines = [line for line in out.splitlines() if line.startswith("config: ")]
    assert len(lines) == 1 and key in lines[0], out[-2000:]  # one line naming the key
    assert not (tmp_path / "run" / "results").exists()


def test_an_overlay_drops_variants_by_null(tmp_path):
    overlay = tmp_path / "drop.yaml"
    overlay.write_text("variants: {naive: null, predefined: null}\n")
    proc = tiny_workflow.snakemake(
        ["-n", "--cores", "1", "-s", ROOT / "Snakefile", "--directory", tmp_path / "run", "--configfile",
         ROOT / "config.yaml", overlay], timeout=120, env=subprocess_env())
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-2000:]
    counts = dict(re.findall(r"^(train_classifier|train_segmenter)\s+(\d+)$", out, re.M))
    assert counts == {"train_classifier": "2", "train_segmenter": "2"}, out[-2000:]


# ---------------------------------------------------------------------------- HDF5 shards


def _cams_shard(path: Path, fmt="eps.cams", dataset="t", version=None) -> Path:
    from eps.data.io import atomic_h5

    with atomic_h5(path, fmt, dataset) as f:
        if version is not None:
            f.attrs["version"] = version
        ds = f.create_dataset(ID, data=np.full((2, 4, 4), 0.5, np.float16))
        ds.attrs["classes"] = np.array([1], np.int16)
        ds.attrs["background"] = True
    return path


def _plain_h5(path: Path) -> Path:
    path.parent.mkdir(parents=True)
    with h5py.File(path, "w") as f:
        f[ID] = np.zeros((2, 4, 4), np.float16)
    return path


def _half_written(path: Path) -> Path:
    _cams_shard(path)
    truncate(path, 0.5)
    return path


@pytest.mark.parametrize("make, problem", [
    (lambda p: _cams_shard(p, dataset="voc"), "shard belongs to dataset 'voc', not 't'"),
    (lambda p: _cams_shard(p, version=2), "shard format version 2 is not supported (expected 1)"),
    (lambda p: _cams_shard(p, fmt="eps.masks"), "expected an HDF5 shard of format 'eps.cams', found 'eps.masks'"),
    (_plain_h5, "expected an HDF5 shard of format 'eps.cams', found None"),
    (_half_written, "not a readable HDF5 file"),
], ids=["other dataset", "other version", "other format", "no attributes", "half written"])
def test_foreign_or_broken_hdf5_shard(tmp_path, make, problem):
    shard = make(tmp_path / "cams" / "shard-1-of-1.h5")
    out = tmp_path / "masks" / "shard-1-of-1.h5"
    proc = eps("pseudo-masks", "--cams", shard, "--dataset", "t", "--out", out)
    assert_user_error(proc, shard, problem)
    assert not out.exists() and not leftovers(tmp_path)


# ---------------------------------------------------------------------------- weights


def test_weights_file_that_is_not_a_state_dict(indexed):
    weights = indexed["root"] / "weights.pth"
    torch.save([torch.zeros(3), torch.ones(3)], weights)
    out = indexed["root"] / "cam" / "classifier.pt"
    proc = eps("train-classifier", "--index", indexed["index"], "--out", out,
               "--params", params(weights=str(weights)))
    assert_user_error(proc, weights, "not a state_dict", only_line=False)
    assert not out.parent.exists()  # refused before anything was written


@pytest.mark.parametrize("content, problem", [
    (lambda: {"conv.weight": torch.zeros(3, 3)}, "not an eps classifier file"),
    (lambda: {"state_dict": {"conv.weight": torch.zeros(3)}, "meta": "small"}, "not an eps classifier file"),
    (lambda: {"state_dict": {"conv.weight": torch.zeros(3)},
              "meta": {"backbone": "small", "num_classes": 5, "background": True}},
     "weights do not fit the small classifier"),
], ids=["plain state_dict", "bad meta", "other architecture"])
def test_classifier_file_that_is_not_an_eps_classifier(indexed, content, problem):
    classifier = indexed["root"] / "classifier.pt"
    torch.save(content(), classifier)
    out = indexed["root"] / "cams" / "shard-1-of-1.h5"
    proc = eps("infer-cams", "--index", indexed["index"], "--classifier", classifier, "--split", "val",
               "--out", out, "--params", '{"device": "cpu"}')
    assert_user_error(proc, classifier, problem)
    assert not out.exists() and not leftovers(indexed["root"])


# ---------------------------------------------------------------------------- NaN loss


def test_nan_loss_stops_training_naming_the_iteration_and_keeps_the_last_good_checkpoint(indexed):
    out = indexed["root"] / "cam" / "classifier.pt"
    proc = eps("train-classifier", "--index", indexed["index"], "--out", out,
               "--params", params(lr=1e20, iterations=8, checkpoint_every=1))  # diverges in a step or two
    line = assert_user_error(proc, out.parent, "loss became nan at iteration", only_line=False)
    ckpt = out.parent / "checkpoints" / "last.pt"
    assert f"the last good checkpoint is kept in {ckpt}" in line
    failed_at = int(line.split("at iteration ")[1].split(";")[0])
    assert 2 <= failed_at <= 8
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["iteration"] == failed_at - 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    log = (out.parent / "checkpoints" / "train_log.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in log[1:]] == [str(i) for i in range(1, failed_at)]
    for name in ("classifier.pt", "classifier.json", "train_log.csv"):
        assert not (out.parent / name).exists(), name
    assert not leftovers(indexed["root"])


def test_nan_loss_at_the_first_iteration_says_no_checkpoint_exists(indexed, tmp_path, monkeypatch):
    """In-process (the CLI cannot make the very first loss NaN): the message does not promise one."""
    import eps.train as train_mod
    from eps.config import TRAIN_DEFAULTS
    from eps.errors import EpsError

    monkeypatch.setenv("EPS_THREADS", "1")
    real = train_mod.classification_loss
    monkeypatch.setattr(train_mod, "classification_loss", lambda *a: real(*a) * float("nan"))
    with pytest.raises(EpsError, match=r"loss became nan at iteration 1; no checkpoint was written yet"):
        train_mod.train_classifier(indexed["index"], tmp_path / "m" / "classifier.pt",
                                   {**TRAIN_DEFAULTS, **TRAIN_PARAMS})
    assert not (tmp_path / "m" / "classifier.pt").exists()


@pytest.mark.parametrize("command, params, problem", [
    ("train-classifier", {"iterations": -5}, "classifier.iterations: -5 is less than the minimum of 1"),
    ("train-classifier", {"tau": 5}, "classifier.tau: 5 is greater than the maximum of 1"),
    ("train-classifier", {"lr": "0.01"}, "classifier.lr: '0.01' is not of type 'number'"),
    ("train-classifier", {"resize_long": [32]}, "classifier.resize_long: [32] is too short"),
    ("train-classifier", {"crop": 0}, "classifier.crop: 0 is less than the minimum of 8"),
    ("train-classifier", {"checkpoint_every": 0}, "classifier.checkpoint_every: 0 is less than the minimum"),
    ("train-classifier", {"batch_size": 0}, "classifier.batch_size: 0 is less than the minimum of 1"),
    ("infer-cams", {"scales": []}, "infer.scales: [] should be non-empty"),
    ("pseudo-masks", {"bg_threshold": 2}, "pseudo_masks.bg_threshold: 2 is greater than the maximum of 1"),
])
def test_stage_parameters_are_checked_as_the_config_is(indexed, command, params, problem):
    """The commands check --params with the config schema: what the workflow refuses, they refuse."""
    args = {"train-classifier": ["--index", indexed["index"]],
            "infer-cams": ["--index", indexed["index"], "--classifier", indexed["root"] / "c.pt", "--split", "train"],
            "pseudo-masks": ["--cams", indexed["root"] / "c.h5", "--dataset", "t"]}[command]
    out = indexed["root"] / "out" / "result"
    proc = eps(command, *args, "--params", json.dumps(params), "--out", out)
    assert_user_error(proc, "--params", problem)
    assert not (indexed["root"] / "out").exists()


@pytest.mark.parametrize("damage, problem", [
    (lambda ds: ds.attrs.__delitem__("classes"), "attribute 'classes' missing"),
    (lambda ds: ds.attrs.__setitem__("classes", np.array([0, 1, 2], np.int16)), "attributes do not match its data"),
    (lambda ds: ds.attrs.__setitem__("shapes", np.array([[3, 3]], np.int32)), "attributes do not match its data"),
])
def test_a_cam_entry_with_a_missing_or_inconsistent_attribute(tmp_path, damage, problem):
    from eps.data.io import atomic_h5
    from eps.shards import write_cams

    cams = tmp_path / "cams.h5"
    with atomic_h5(cams, "eps.cams", "t") as f:
        write_cams(f, "a", [np.random.default_rng(0).random((2, 4, 5), np.float32)], np.array([0, 3]), False, (8, 10))
    with h5py.File(cams, "r+") as f:
        damage(f["a"])
    out = tmp_path / "masks.h5"
    assert_user_error(eps("pseudo-masks", "--cams", cams, "--dataset", "t", "--out", out), cams, "'a'", problem)
    assert not out.exists() and not leftovers(tmp_path)


def test_a_damaged_hdf5_chunk(tmp_path):
    from eps.data.io import atomic_h5
    from eps.shards import write_cams

    cams = tmp_path / "cams.h5"
    with atomic_h5(cams, "eps.cams", "t") as f:
        write_cams(f, "a", [np.random.default_rng(0).random((2, 40, 50), np.float32)], np.array([0, 3]), False,
                   (80, 100))
    with h5py.File(cams) as f:
        offset = f["a"].id.get_offset() if f["a"].chunks is None else f["a"].id.get_chunk_info(0).byte_offset
    data = bytearray(cams.read_bytes())
    for i in range(offset + 8, offset + 200):
        data[i] ^= 0xFF
    cams.write_bytes(bytes(data))
    out = tmp_path / "masks.h5"
    assert_user_error(eps("pseudo-masks", "--cams", cams, "--dataset", "t", "--out", out), cams,
                      "data cannot be read, the file is damaged")
    assert not out.exists() and not leftovers(tmp_path)


@pytest.mark.parametrize("command", ["synth", "index", "evaluate-masks"])
def test_an_output_under_an_existing_file_is_one_line(world, tmp_path, command):
    blocker = tmp_path / "afile"
    blocker.write_text("mine")
    out = blocker / "sub" / "out"
    argv = {"synth": ["synth", "--out", out, "--params", json.dumps({"num_train": 2, "num_val": 1, "size": 32})],
            "index": ["index", "--dataset", json.dumps(synthetic_block(world)), "--out", out / "index.csv"],
            "evaluate-masks": ["evaluate-masks", "--pred", world / "SegmentationClass", "--gt",
                               world / "SegmentationClass", "--ids", world / "ImageSets/Segmentation/train.txt",
                               "--num-classes", 6, "--out", out]}[command]
    line = assert_user_error(eps(*argv), blocker)
    assert "Traceback" not in line and blocker.read_text() == "mine"


def test_summary_refuses_a_metric_that_is_not_a_number(tmp_path):
    bad = tmp_path / "metrics.json"
    bad.write_text(json.dumps({"miou": "high"}))
    assert_user_error(eps("summary", "--entry", f"eps:pseudo_masks:{bad}", "--out", tmp_path / "summary.csv"),
                      bad, "miou is 'high', not a number")
    assert not (tmp_path / "summary.csv").exists()
