"""Shared fixtures: the real data beside the checkout (`../shared`) and tiny hand-made datasets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """`../shared` beside the checkout (real public data); skips when absent, as in a fresh clone."""
    if not SHARED.is_dir():
        pytest.skip(f"../shared not found: {SHARED} (real-data tests need it beside the checkout)")
    return SHARED


@pytest.fixture
def tiny_voc(tmp_path) -> Path:
    """A 4-image VOC layout with masks, saliency, a label file and two split lists."""
    from eps.data.io import write_gray_png, write_index_png, write_rgb

    root = tmp_path / "voc"
    rng = np.random.default_rng(0)
    labels = {}
    for i, present in enumerate([[1], [2, 15], [20], []]):
        id_ = f"2007_{i:06d}"
        write_rgb(root / "JPEGImages" / f"{id_}.jpg", rng.integers(0, 255, (12, 16, 3)))
        mask = np.zeros((12, 16), np.uint8)
        for k, c in enumerate(present):
            mask[k * 3:k * 3 + 3, :8] = c
        mask[-1, :] = 255
        write_index_png(root / "SegmentationClass" / f"{id_}.png", mask)
        write_gray_png(root / "SALImages" / f"{id_}.png", (mask > 0) * 255)
        vec = np.zeros(20, np.float32)
        vec[[c - 1 for c in present]] = 1
        labels[id_] = vec
    np.save(root / "cls_labels.npy", labels, allow_pickle=True)
    lists = root / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    (lists / "train.txt").write_text("2007_000000\n2007_000001\n2007_000002\n")
    (lists / "val.txt").write_text("2007_000002\n2007_000003\n")
    return root


class Interrupted(Exception):
    """A training process killed at a checkpoint (see `kill_at_checkpoint`)."""


class _CheckpointKill:
    """Patches `eps.training.save_checkpoint` (the training loop of every network) so that its
    `nth` call raises Interrupted (after writing the checkpoint with `save_first`, before it
    otherwise); `calls` lists the iterations of every call; `restore()` puts the real writer
    back for the resumed run."""

    error = Interrupted

    def __init__(self, monkeypatch, nth: int, save_first: bool):
        import eps.training as module

        self.calls = []
        self._undo = lambda: monkeypatch.setattr(module, "save_checkpoint", real)
        real = module.save_checkpoint

        def save_or_die(path, model, optimizer, iteration, *args, **kwargs):
            self.calls.append(iteration)
            if save_first or len(self.calls) != nth:
                real(path, model, optimizer, iteration, *args, **kwargs)
            if len(self.calls) == nth:
                raise Interrupted(f"killed at the checkpoint of iteration {iteration}")

        monkeypatch.setattr(module, "save_checkpoint", save_or_die)

    def restore(self) -> None:
        self._undo()


@pytest.fixture
def kill_at_checkpoint(monkeypatch):
    """`kill = kill_at_checkpoint(nth, save_first=False)`: simulate a process killed at the
    `nth` checkpoint of a training run (`pytest.raises(kill.error)`, then `kill.restore()`)."""
    return lambda nth, save_first=False: _CheckpointKill(monkeypatch, nth, save_first)


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> dict:
    """Synthetic world (12 train / 4 val, 40 px), its index, its masks and one saliency shard, for
    the whole session: read only (a test that needs another index builds it from `data`); the
    session ends in an error if any of its files changed."""
    from eps.data.build import build_index
    from eps.data.synthetic import generate
    from eps.saliency import extract_shard

    root = tmp_path_factory.mktemp("tiny_world")
    generate(root / "data", num_train=12, num_val=4, size=40, seed=3)
    index = root / "index.csv"
    build_index({"name": "t", "type": "synthetic", "root": str(root / "data")}, index)
    sal = extract_shard(index, "precomputed", "1-of-1", root / "sal.h5", progress=False)
    before = _contents(root)
    yield {"data": root / "data", "index": index, "sal": sal, "masks": root / "data" / "SegmentationClass"}
    changed = sorted(set(before.items()) ^ set(_contents(root).items()))
    assert not changed, f"a test changed the shared tiny_world: {sorted({name for name, _ in changed})[:5]}"


def _contents(root: Path) -> dict[str, str]:
    import hashlib

    return {str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}
