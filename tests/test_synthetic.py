"""The synthetic co-occurrence world: determinism, layout, co-occurrence, saliency, atomicity."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from eps.data import synthetic
from eps.data.synthetic import CLASSES, CONTEXTS, SynthConfig, generate
from eps.errors import EpsError

SMALL = dict(num_train=6, num_val=2, size=48)


def _files(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """One medium-sized dataset shared by the statistical tests (about a second to build)."""
    root = tmp_path_factory.mktemp("synth") / "world"
    meta = generate(root, num_train=160, num_val=40, size=64, seed=3)
    return root, meta


def _load(root, image_id):
    seg = np.asarray(Image.open(root / "SegmentationClass" / f"{image_id}.png"))
    ctx = np.asarray(Image.open(root / "ContextClass" / f"{image_id}.png"))
    sal = np.asarray(Image.open(root / "SALImages" / f"{image_id}.png"))
    return seg, ctx, sal


def _ids(root, split):
    return (root / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()


def test_same_seed_gives_identical_files_and_other_seed_differs(tmp_path):
    generate(tmp_path / "a", seed=0, **SMALL)
    generate(tmp_path / "b", seed=0, **SMALL)
    generate(tmp_path / "c", seed=1, **SMALL)
    a, b, c = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert a == b
    assert a.keys() == c.keys()
    images = [k for k in a if k.startswith("JPEGImages/")]
    assert all(a[k] != c[k] for k in images)


def test_image_does_not_depend_on_split_size(tmp_path):
    generate(tmp_path / "a", num_train=2, num_val=1, size=48)
    generate(tmp_path / "b", **SMALL)
    for sub in ("JPEGImages/syn_train_00001.jpg", "SALImages/syn_val_00000.png"):
        assert (tmp_path / "a" / sub).read_bytes() == (tmp_path / "b" / sub).read_bytes()


def test_layout_and_formats(world):
    root, meta = world
    C = len(meta["classes"])
    assert meta["format"] == "eps.synthetic" and meta["version"] == 1
    assert meta["classes"] == list(CLASSES) and meta["contexts"] == list(CONTEXTS)
    # the missed class (the last one by default) comes without its context region
    assert meta["missed_class"] == CLASSES[-1]
    assert meta["pairs"] == [[k, c] for k, c in zip(CONTEXTS[:-1], CLASSES[:-1])]
    assert meta["missed_class"] == "plane"
    assert meta["params"]["seed"] == 3 and meta["params"]["size"] == 64
    assert json.loads((root / "meta.json").read_text()) == meta
    labels = np.load(root / "cls_labels.npy", allow_pickle=True).item()
    train, val = _ids(root, "train"), _ids(root, "val")
    assert len(train) == 160 and len(val) == 40
    assert train[42] == "syn_train_00042" and val[7] == "syn_val_00007"
    assert set(labels) == set(train) | set(val)
    any_context = 0
    for image_id in train[:40] + val[:10]:
        img = Image.open(root / "JPEGImages" / f"{image_id}.jpg")
        assert img.format == "JPEG" and img.mode == "RGB" and img.size == (64, 64)
        assert Image.open(root / "SegmentationClass" / f"{image_id}.png").mode == "P"
        assert Image.open(root / "SALImages" / f"{image_id}.png").mode == "L"
        seg, ctx, sal = _load(root, image_id)
        assert seg.shape == ctx.shape == sal.shape == (64, 64)
        assert set(np.unique(seg)) <= set(range(C + 1)) | {255}
        assert set(np.unique(ctx)) <= set(range(C + 1))
        assert not np.any((ctx > 0) & (seg > 0))  # context only where no object is
        present = sorted(int(v) - 1 for v in np.unique(seg) if 0 < v < 255)
        onehot = labels[image_id]
        assert onehot.dtype == np.float32 and onehot.shape == (C,)
        assert present == [int(c) for c in np.flatnonzero(onehot)]
        assert present, "every image carries at least one label"
        for c in present:
            assert (seg == c + 1).sum() >= meta["params"]["min_visible"]
        any_context += bool(ctx.any())
    assert any_context > 25


def test_cooccurrence_rate_is_realised(world):
    root, meta = world
    C = len(meta["classes"])
    labels = np.load(root / "cls_labels.npy", allow_pickle=True).item()
    with_cls = np.zeros(C)
    with_both = np.zeros(C)
    without_cls = np.zeros(C)
    ctx_alone = np.zeros(C)
    for image_id in _ids(root, "train"):
        _, ctx, _ = _load(root, image_id)
        has = labels[image_id].astype(bool)
        has_ctx = np.array([(ctx == k + 1).any() for k in range(C)])
        with_cls += has
        with_both += has & has_ctx
        without_cls += ~has
        ctx_alone += ~has & has_ctx
    paired = [CLASSES.index(c) for _, c in meta["pairs"]]
    missed = CLASSES.index(meta["missed_class"])
    pooled = with_both[paired].sum() / with_cls[paired].sum()
    assert abs(pooled - 0.9) < 0.07, pooled
    assert np.all(with_both[paired] / with_cls[paired] > 0.7), with_both / with_cls
    assert with_both[missed] == 0  # the missed class never brings its context
    assert ctx_alone.sum() / without_cls.sum() < 0.12
    stats = meta["stats"]["train"]["cooccurrence"]
    assert [stats[n] for n in CLASSES] == pytest.approx(list(with_both / with_cls), abs=1e-4)


def test_cooccurrence_parameter_controls_rate(tmp_path):
    meta = generate(tmp_path / "d", num_train=60, num_val=0, size=48, cooccurrence=0.0,
                    context_without=0.0)
    rates = [r for r in meta["stats"]["train"]["cooccurrence"].values() if r is not None]
    assert rates and max(rates) == 0.0


def test_saliency_statistics(world):
    root, meta = world
    missed = meta["classes"].index(meta["missed_class"]) + 1
    obj, missed_px, context = [], [], []
    for image_id in _ids(root, "train")[:100]:
        seg, ctx, sal = _load(root, image_id)
        sal = sal.astype(np.float64) / 255
        obj.append(sal[(seg > 0) & (seg < 255) & (seg != missed)])
        missed_px.append(sal[seg == missed])
        context.append(sal[ctx > 0])
    obj, missed_px, context = (np.concatenate(v) for v in (obj, missed_px, context))
    assert obj.size and missed_px.size and context.size
    assert obj.mean() > 0.6
    assert context.mean() < 0.2
    assert obj.mean() > context.mean() + 0.45
    assert missed_px.mean() < 0.3  # missed 70 % of the time: about 0.7 x 0.06 + 0.3 x 0.87


def test_no_missed_class(tmp_path):
    meta = generate(tmp_path / "d", num_train=30, num_val=0, size=48, missed_class=None)
    assert meta["missed_class"] is None
    vals = []
    for image_id in _ids(tmp_path / "d", "train"):
        seg, _, sal = _load(tmp_path / "d", image_id)
        vals.append(sal[seg == len(CLASSES)] / 255)
    assert np.concatenate(vals).mean() > 0.5


def test_failure_leaves_nothing_behind(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = synthetic.write_gray_png

    def flaky(path, array):
        calls["n"] += 1
        if calls["n"] == 4:
            raise OSError("disk full")
        real(path, array)

    monkeypatch.setattr(synthetic, "write_gray_png", flaky)
    parent = tmp_path / "results"
    with pytest.raises(OSError, match="disk full"):
        generate(parent / "data", **SMALL)
    assert calls["n"] == 4
    assert not (parent / "data").exists()
    assert list(parent.iterdir()) == []


def test_existing_out_dir_and_overwrite(tmp_path):
    out = tmp_path / "d"
    out.mkdir()
    (out / "stale.txt").write_text("x")
    with pytest.raises(EpsError, match="already exists"):
        generate(out, **SMALL)
    # overwrite replaces only a world eps wrote: a folder of the user's stays as it is
    with pytest.raises(EpsError, match="not written by eps synth"):
        generate(out, overwrite=True, **SMALL)
    assert (out / "stale.txt").read_text() == "x"
    (out / "stale.txt").unlink()
    generate(out, overwrite=True, **SMALL)
    generate(out, overwrite=True, **SMALL)  # its own world: replaced
    assert (out / "meta.json").is_file() and (out / ".eps-output").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


@pytest.mark.parametrize("params, key", [
    (dict(cooccurrence=1.5), "cooccurrence"),
    (dict(size=8), "size"),
    (dict(num_classes=9), "num_classes"),
    (dict(missed_class="zebra"), "missed_class"),
    (dict(colour="red"), "colour"),
])
def test_bad_parameters_name_the_key(tmp_path, params, key):
    with pytest.raises(EpsError, match=f"^{key}: "):
        generate(tmp_path / "d", **params)
    assert not (tmp_path / "d").exists()


def test_config_object_and_fewer_classes(tmp_path):
    meta = generate(tmp_path / "d", SynthConfig(num_train=8, num_val=0, size=48, num_classes=3),
                    missed_class=0)
    assert meta["classes"] == ["train", "boat", "bird"] and meta["missed_class"] == "train"
    labels = np.load(tmp_path / "d" / "cls_labels.npy", allow_pickle=True).item()
    assert all(v.shape == (3,) for v in labels.values())


def test_missed_class_context_and_miss_rate(tmp_path):
    with_ctx = generate(tmp_path / "a", num_train=40, num_val=0, size=48, missed_has_context=True)
    assert [CONTEXTS[-1], CLASSES[-1]] in with_ctx["pairs"]
    means = {}
    for rate in (0.0, 1.0):
        root = tmp_path / f"r{rate}"
        generate(root, num_train=40, num_val=0, size=48, sal_miss_rate=rate)
        vals = [(_load(root, i)[2] / 255)[_load(root, i)[0] == len(CLASSES)] for i in _ids(root, "train")]
        means[rate] = np.concatenate(vals).mean()
    assert means[1.0] < 0.2 < 0.5 < means[0.0]


def test_missed_class_missed_only_beside_another_class(tmp_path):
    """sal_miss_rate_alone: the dominant-object detector misses the class only when it has company."""
    root = tmp_path / "d"
    generate(root, num_train=60, num_val=0, size=48, sal_miss_rate=1.0, sal_miss_rate_alone=0.0)
    labels = np.load(root / "cls_labels.npy", allow_pickle=True).item()
    alone, beside = [], []
    for image_id in _ids(root, "train"):
        seg, _, sal = _load(root, image_id)
        missed = seg == len(CLASSES)
        if missed.sum() >= 16:
            (alone if labels[image_id].sum() == 1 else beside).append((sal[missed] / 255).mean())
    assert len(alone) >= 3 and len(beside) >= 3
    assert np.mean(beside) < 0.2 < 0.5 < np.mean(alone)
    with pytest.raises(EpsError, match="sal_miss_rate_alone"):
        generate(tmp_path / "bad", num_train=2, num_val=0, size=48, sal_miss_rate_alone=1.5)


@pytest.mark.parametrize("to_border", [True, False])
def test_ground_like_context_runs_out_of_the_frame(tmp_path, to_border):
    """rail, water, grass and branch span the width with stuff_to_border, and never do without it."""
    root = tmp_path / "d"
    generate(root, num_train=40, num_val=0, size=48, stuff_to_border=to_border, context_without=0.0)
    ground = [CONTEXTS.index(k) + 1 for k in ("rail", "water", "grass", "branch")]
    spans = []
    for image_id in _ids(root, "train"):
        _, ctx, _ = _load(root, image_id)
        for k in ground:
            if (ctx == k).any():  # this context reaching both side edges
                spans.append(bool((ctx[:, 0] == k).any() and (ctx[:, -1] == k).any()))
    assert len(spans) >= 5
    if to_border:
        assert np.mean(spans) > 0.9  # objects drawn over the context may cover an edge now and then
    else:
        assert np.mean(spans) < 0.5  # only objects near both edges reach them
