"""A command replaces only what it wrote itself: folders of the user's are refused in one line.

`eps export-masks --out DIR` and `eps synth --out DIR` write whole folders. An existing DIR is
replaced only when it carries the command's own marker (eps.data.io.OWNER_FILE) and nothing
else was put in it; a user's folder, or one with an added file, is left as it is.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from eps.data.io import OWNER_FILE, atomic_h5

from .helpers import assert_user_error, eps


@pytest.fixture
def mask_shard(tmp_path):
    path = tmp_path / "masks.h5"
    with atomic_h5(path, "eps.masks", "t") as f:
        for i in range(3):
            f.create_dataset(f"img{i}", data=np.full((4, 5), i, np.uint8))
    return path


def export(shard, out):
    return eps("export-masks", "--masks", shard, "--dataset", "t", "--out", out)


def test_export_masks_refuses_a_folder_it_did_not_write(mask_shard, tmp_path):
    out = tmp_path / "d"
    out.mkdir()
    (out / "notes.txt").write_text("x")
    assert_user_error(export(mask_shard, out), out, "not written by eps export-masks")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folder


def test_export_masks_refuses_its_own_folder_once_a_file_was_added(mask_shard, tmp_path):
    out = tmp_path / "d"
    assert export(mask_shard, out).returncode == 0
    assert sorted(p.name for p in out.iterdir()) == [OWNER_FILE, "img0.png", "img1.png", "img2.png"]
    (out / "notes.txt").write_text("x")
    assert_user_error(export(mask_shard, out), out, "'notes.txt'")
    assert (out / "notes.txt").read_text() == "x" and (out / "img0.png").is_file()


def test_export_masks_replaces_its_own_folder(mask_shard, tmp_path):
    out = tmp_path / "d"
    assert export(mask_shard, out).returncode == 0
    (out / "stale.png").write_bytes((out / "img0.png").read_bytes())  # a mask of an earlier run
    assert export(mask_shard, out).returncode == 0
    assert sorted(p.name for p in out.iterdir()) == [OWNER_FILE, "img0.png", "img1.png", "img2.png"]


def test_export_masks_refuses_an_existing_file_and_leaves_no_temporary_folder(mask_shard, tmp_path):
    out = tmp_path / "file"
    out.write_text("mine")
    assert_user_error(export(mask_shard, out), out, "not a folder eps wrote")
    assert out.read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "masks.h5"]


def test_export_masks_into_an_empty_folder(mask_shard, tmp_path):
    out = tmp_path / "d"
    out.mkdir()
    assert export(mask_shard, out).returncode == 0
    assert (out / "img2.png").is_file()


SYNTH = json.dumps({"num_train": 2, "num_val": 1, "size": 32, "seed": 1})


def test_synth_refuses_a_folder_of_the_users(tmp_path):
    out = tmp_path / "world"
    out.mkdir()
    (out / "photos.jpg").write_bytes(b"mine")
    assert_user_error(eps("synth", "--out", out, "--params", SYNTH), out, "not written by eps synth")
    assert sorted(p.name for p in out.iterdir()) == ["photos.jpg"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["world"]


def test_synth_replaces_its_own_world_but_not_added_files(tmp_path):
    out = tmp_path / "world"
    assert eps("synth", "--out", out, "--params", SYNTH).returncode == 0
    assert (out / OWNER_FILE).is_file() and (out / "meta.json").is_file()
    again = eps("synth", "--out", out, "--params", json.dumps({**json.loads(SYNTH), "seed": 2}))
    assert again.returncode == 0, again.stderr
    assert json.loads((out / "meta.json").read_text())["params"]["seed"] == 2
    (out / "notes.txt").write_text("x")
    assert_user_error(eps("synth", "--out", out, "--params", SYNTH), out, "'notes.txt'")
    assert (out / "notes.txt").is_file()


@pytest.mark.parametrize("argv, flag", [
    (["saliency", "--method", "classical", "--images", "{d}", "--out", "{d}"], "--images"),
    (["pseudo-masks", "--cams", "{d}/x.h5", "--out", "{d}/x.h5", "--dataset", "t"], "--cams"),
    (["crf", "--cams", "{d}/x.h5", "--index", "{d}/i.csv", "--out", "{d}/x.h5", "--dataset", "t"], "--cams"),
    (["infer-cams", "--index", "{d}/i.csv", "--classifier", "{d}/c.pt", "--split", "train", "--out", "{d}/c.pt"],
     "--classifier"),
])
def test_an_output_that_is_an_input_is_refused_before_any_work(tmp_path, argv, flag):
    for name in ("x.h5", "c.pt", "i.csv"):
        (tmp_path / name).write_bytes(b"the user's file")
    (tmp_path / "a.png").write_bytes(b"an image")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    proc = eps(*[a.format(d=tmp_path) for a in argv])
    assert_user_error(proc, "is also an input", flag)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def _images(folder, names):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in names:
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(folder / name)


def test_saliency_of_a_folder_leaves_no_maps_when_an_image_is_bad(tmp_path):
    _images(tmp_path / "imgs", ["a.png", "b.png", "c.png"])
    (tmp_path / "imgs" / "c.png").write_bytes(b"not an image")
    out = tmp_path / "sal"
    assert_user_error(eps("saliency", "--method", "classical", "--images", tmp_path / "imgs", "--out", out),
                      tmp_path / "imgs" / "c.png", "cannot decode image", only_line=False)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["imgs"]


def test_saliency_of_a_folder_refuses_two_images_with_one_stem_and_names_a_tiny_image(tmp_path):
    _images(tmp_path / "imgs", ["a.jpg", "a.png"])
    assert_user_error(eps("saliency", "--method", "classical", "--images", tmp_path / "imgs", "--out",
                          tmp_path / "sal"), "a.png", "has the stem of a.jpg")
    from PIL import Image

    (tmp_path / "tiny").mkdir()
    Image.new("RGB", (1, 1)).save(tmp_path / "tiny" / "dot.png")
    assert_user_error(eps("saliency", "--method", "classical", "--images", tmp_path / "tiny", "--out",
                          tmp_path / "sal"), tmp_path / "tiny" / "dot.png", "too small", only_line=False)
    assert not (tmp_path / "sal").exists()


def test_saliency_of_a_folder_replaces_only_its_own_maps(tmp_path):
    _images(tmp_path / "imgs", ["a.png", "b.png"])
    out = tmp_path / "sal"
    out.mkdir()
    (out / "mine.txt").write_text("x")
    assert_user_error(eps("saliency", "--method", "classical", "--images", tmp_path / "imgs", "--out", out),
                      out, "not written by eps saliency")
    (out / "mine.txt").unlink()
    assert eps("saliency", "--method", "classical", "--images", tmp_path / "imgs", "--out", out).returncode == 0
    assert eps("saliency", "--method", "classical", "--images", tmp_path / "imgs", "--out", out).returncode == 0
    assert sorted(p.name for p in out.iterdir()) == [OWNER_FILE, "a.png", "b.png"]


def test_synth_replaces_a_world_of_an_earlier_eps_version(tmp_path):
    """Worlds written before the marker existed carry eps's meta.json: still eps synth's own."""
    out = tmp_path / "world"
    assert eps("synth", "--out", out, "--params", SYNTH).returncode == 0
    (out / OWNER_FILE).unlink()
    proc = eps("synth", "--out", out, "--params", SYNTH)
    assert proc.returncode == 0, proc.stderr
    assert (out / OWNER_FILE).is_file()


def test_synth_removes_the_temporary_folder_of_a_killed_run(tmp_path):
    import os
    import time

    stale = tmp_path / ".world.tmp-abc123"
    (stale / "JPEGImages").mkdir(parents=True)
    old = time.time() - 7200
    os.utime(stale, (old, old))
    fresh = tmp_path / ".world.tmp-running"  # a concurrent run's: kept
    fresh.mkdir()
    assert eps("synth", "--out", tmp_path / "world", "--params", SYNTH).returncode == 0
    assert not stale.exists() and fresh.exists()
