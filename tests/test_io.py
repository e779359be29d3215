"""Readers fail with one line naming the file; writers leave nothing behind on failure."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import ImageFile

from eps.data import io
from eps.errors import EpsError


def test_round_trips(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 255, (9, 7, 3)).astype(np.uint8)
    io.write_rgb(tmp_path / "a.png", rgb)
    assert np.array_equal(io.read_image(tmp_path / "a.png"), rgb)
    mask = np.array([[0, 1, 20], [255, 3, 0]], np.uint8)
    io.write_index_png(tmp_path / "m.png", mask)
    assert np.array_equal(io.read_index_png(tmp_path / "m.png"), mask)
    io.write_gray_png(tmp_path / "s.png", mask)
    assert np.array_equal(io.read_saliency(tmp_path / "s.png"), mask)
    assert not list(tmp_path.glob("*.tmp"))


def _one_line_naming(exc, path):
    msg = str(exc.value)
    assert msg.startswith(f"{path}: ") and "\n" not in msg


def test_missing_file(tmp_path):
    with pytest.raises(EpsError) as exc:
        io.read_image(tmp_path / "nope.jpg")
    _one_line_naming(exc, tmp_path / "nope.jpg")


@pytest.mark.parametrize("frac", [0.3, 0.9, 0.998])
def test_truncated_jpeg(tmp_path, frac, monkeypatch):
    img = np.random.default_rng(1).integers(0, 255, (64, 80, 3)).astype(np.uint8)
    io.write_rgb(tmp_path / "full.jpg", img)
    data = (tmp_path / "full.jpg").read_bytes()
    bad = tmp_path / "cut.jpg"
    bad.write_bytes(data[: int(len(data) * frac)])
    # Another library may have switched PIL to padding truncated files silently.
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(EpsError, match="truncated") as exc:
        io.read_image(bad)
    _one_line_naming(exc, bad)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored


def test_corrupt_png(tmp_path):
    mask = (np.arange(64 * 64).reshape(64, 64) % 21).astype(np.uint8)
    io.write_index_png(tmp_path / "m.png", mask)
    data = bytearray((tmp_path / "m.png").read_bytes())
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(data[: len(data) // 2])
    flipped = tmp_path / "flip.png"
    at = data.find(b"IDAT") + 30
    data[at] ^= 0x01  # one bit: the chunk CRC no longer matches
    flipped.write_bytes(data)
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"not a png at all")
    for path in (truncated, flipped, garbage):
        with pytest.raises(EpsError) as exc:
            io.read_index_png(path)
        _one_line_naming(exc, path)


def test_rgb_mask_rejected(tmp_path):
    io.write_rgb(tmp_path / "c.png", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(EpsError, match="mode RGB"):
        io.read_index_png(tmp_path / "c.png")


def test_atomic_path_cleans_up(tmp_path):
    with pytest.raises(RuntimeError):
        with io.atomic_path(tmp_path / "x.txt") as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_h5_shard_checks(tmp_path):
    path = tmp_path / "s.h5"
    with io.atomic_h5(path, "eps.masks", "toy") as f:
        f["a"] = np.zeros((2, 2), np.uint8)
    with io.open_h5(path, "eps.masks", "toy") as f:
        assert list(f) == ["a"]
    with pytest.raises(EpsError, match="format"):
        io.open_h5(path, "eps.cams")
    with pytest.raises(EpsError, match="dataset"):
        io.open_h5(path, "eps.masks", "other")


def test_image_size_reads_the_header_only_and_matches_the_decoded_image(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for name, mode in (("a.jpg", "RGB"), ("b.png", "L")):
        pixels = rng.integers(0, 256, (37, 53, 3) if mode == "RGB" else (37, 53)).astype(np.uint8)
        Image.fromarray(pixels).save(tmp_path / name)
        assert io.image_size(tmp_path / name) == io.read_image(tmp_path / name).shape[:2] == (37, 53)
    (tmp_path / "c.jpg").write_text("not an image")
    with pytest.raises(EpsError, match=r"c\.jpg: cannot read the image header"):
        io.image_size(tmp_path / "c.jpg")
    with pytest.raises(EpsError, match=r"d\.jpg: file not found"):
        io.image_size(tmp_path / "d.jpg")
