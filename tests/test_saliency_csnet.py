"""`csnet`: the network built from a layer configuration, the authors' checkpoint (when
../shared is there), the refusals of bad files, and eval-saliency's --ids and void."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from eps.cli import main
from eps.errors import EpsError
from eps.saliency import csnet, get_predictor

SHARED = Path(__file__).resolve().parents[2] / "shared"
PHOTOS = SHARED / "data" / "voc12_photos"
WEIGHTS = SHARED / "weights" / "csnet" / "csnet-L-x2.pth.tar"
SAMPLE = 20


def _small(tmp_path, name="small.pth.tar", seed=0):
    """A random small CSNet saved in the authors' format (checkpoint + .bin)."""
    torch.manual_seed(seed)
    model = csnet.CSNet(csnet.make_config())
    for m in model.modules():  # non-trivial BN statistics, so that folding is tested
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    for m in model.modules():
        if isinstance(m, (csnet.ScaledConv,)):
            m.weight.data.mul_(0.01)  # the x100 reparametrisation, kept in a sane range
    return model.eval(), csnet.save(model, tmp_path / name)


def _need_shared():
    if not WEIGHTS.is_file() or not (PHOTOS / "SALImages").is_dir():
        pytest.skip(f"the CSNet checkpoint and voc12_photos are not in {SHARED} (a fresh clone has no ../shared)")


# ------------------------------------------------------------------ without shared files

def test_small_network_round_trips_through_the_authors_format(tmp_path):
    model, path = _small(tmp_path)
    assert path.is_file() and csnet.config_path(path) == tmp_path / "small.bin"
    loaded = csnet.load_model(path)
    assert loaded.config == model.config
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out, again = model(x), loaded(x)
    assert out.shape == (2, 1, 64, 64)
    assert torch.equal(out, again)
    # BN folding and channels_last (the predictor's fast path) give the same logits
    import copy

    folded = copy.deepcopy(loaded).fold()
    with torch.no_grad():
        fast = folded(x.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(out, fast, atol=1e-4 * float(out.abs().max()) + 1e-5)
    assert not torch.allclose(out, loaded(torch.flip(x, (3,))))


def test_small_network_predictor_writes_uint8_maps_at_the_image_size(tmp_path):
    _, path = _small(tmp_path)
    predict = get_predictor("csnet", path, "cpu")
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((37, 53), (80, 60), (5, 300))]
    maps = predict.batch(images)
    for rgb, sal in zip(images, maps):
        assert sal.dtype == np.uint8 and sal.shape == rgb.shape[:2]
        assert np.array_equal(predict(rgb), sal)  # batched = one by one


def test_resize_matches_the_skimage_rule_by_hand():
    """scikit-image's order-1 'reflect' resize: half-pixel centres, mirrored at the edges."""
    img = np.array([[0.0, 1.0]])
    out = csnet.resize(img, (1, 4))
    # output centres at input x = -0.25, 0.25, 0.75, 1.25 -> mirrored 0.25, 0.25, 0.75, 0.75
    assert np.allclose(out, [[0.25, 0.25, 0.75, 0.75]])
    down = csnet.resize(np.arange(4.0)[None], (1, 2))
    assert np.allclose(down, [[0.5, 2.5]])


def test_missing_weights_or_bin(tmp_path):
    with pytest.raises(EpsError, match="csnet needs --weights"):
        get_predictor("csnet", None)
    with pytest.raises(EpsError, match=f"^{tmp_path / 'none.pth.tar'}: CSNet checkpoint not found"):
        csnet.load_model(tmp_path / "none.pth.tar")
    _, path = _small(tmp_path)
    (tmp_path / "small.bin").unlink()
    with pytest.raises(EpsError, match=f"^{tmp_path / 'small.bin'}: CSNet layer configuration not found"):
        csnet.load_model(path)


def test_bin_that_does_not_match_the_checkpoint(tmp_path):
    _, path = _small(tmp_path)
    other = csnet.make_config(width=6, branches=(1, 1))
    (tmp_path / "small.bin").write_bytes(pickle.dumps(csnet.to_raw_config(other)))
    with pytest.raises(EpsError) as err:
        csnet.load_model(path)
    text = str(err.value)
    assert text.startswith(f"{tmp_path / 'small.bin'}: does not match the checkpoint small.pth.tar")
    assert "\n" not in text


def test_bin_shapes_differ_but_keys_agree(tmp_path):
    _, path = _small(tmp_path)
    raw = csnet.to_raw_config(csnet.make_config())
    raw[0][1] = raw[0][1] + np.array([1.0, 0.0])  # one more channel in the first block
    raw[1][0] = raw[0][1]
    (tmp_path / "small.bin").write_bytes(pickle.dumps(raw))
    with pytest.raises(EpsError, match=r"small\.bin: does not match the checkpoint small\.pth\.tar: "
                                       r"tensor stage0\.0\.conv1x1\.conv\.weight is \(3, 3, 3, 3\)"):
        csnet.load_model(path)


def test_checkpoint_of_another_layout_and_non_checkpoints(tmp_path):
    _, path = _small(tmp_path)
    other = tmp_path / "other.pth.tar"
    torch.save({"state_dict": {"features.0.weight": torch.zeros(2, 3, 3, 3)}}, other)
    (tmp_path / "other.bin").write_bytes((tmp_path / "small.bin").read_bytes())
    with pytest.raises(EpsError, match=f"^{other}: not a CSNet checkpoint: another layout"):
        csnet.load_model(other)
    nested = tmp_path / "nested.pth.tar"
    torch.save({"epoch": 1, "weights": [1, 2]}, nested)
    with pytest.raises(EpsError, match=f"^{nested}: not a CSNet checkpoint"):
        csnet.load_model(nested)
    junk = tmp_path / "junk.pth.tar"
    junk.write_text("not a checkpoint\n")
    with pytest.raises(EpsError, match=f"^{junk}: not a loadable PyTorch checkpoint") as err:
        csnet.load_model(junk)
    assert "\n" not in str(err.value)


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch " + str(self.target),))


def test_bin_with_forbidden_pickle_content_is_refused_without_running(tmp_path):
    _, path = _small(tmp_path)
    target = tmp_path / "ran"
    boom = _Boom()
    boom.target = target
    (tmp_path / "small.bin").write_bytes(pickle.dumps([boom]))
    with pytest.raises(EpsError) as err:
        csnet.load_model(path)
    text = str(err.value)
    assert text.startswith(f"{tmp_path / 'small.bin'}: refusing to load ") and "system" in text
    assert "\n" not in text
    assert not target.exists()


@pytest.mark.parametrize("raw, problem", [
    ("text", "not a CSNet layer configuration"),
    ([[3, np.array([2.0, 2.0])]] * 5 + [[3, 4, 6, 4]], "entries"),
    (None, "expected non-negative whole channel counts"),
])
def test_bin_that_is_no_layer_configuration(tmp_path, raw, problem):
    _, path = _small(tmp_path)
    if raw is None:  # a fractional channel count
        raw = csnet.to_raw_config(csnet.make_config())
        raw[2][1] = raw[2][1] + 0.5
    (tmp_path / "small.bin").write_bytes(pickle.dumps(raw))
    with pytest.raises(EpsError, match=f"^{tmp_path / 'small.bin'}: .*{problem}"):
        csnet.load_model(path)
    (tmp_path / "small.bin").write_bytes(b"\x00garbage")
    with pytest.raises(EpsError, match="not a CSNet layer configuration"):
        csnet.load_model(path)


def test_cli_saliency_csnet_writes_a_folder_atomically(tmp_path, capsys):
    _, path = _small(tmp_path)
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(1)
    for k in range(3):
        Image.fromarray(rng.integers(0, 256, (30 + k, 40, 3), dtype=np.uint8)).save(images / f"im{k}.png")
    out = tmp_path / "maps"
    assert main(["saliency", "--method", "csnet", "--weights", str(path), "--images", str(images),
                 "--out", str(out), "--device", "cpu"]) == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["im0.png", "im1.png", "im2.png"]
    assert np.asarray(Image.open(out / "im2.png")).shape == (32, 40)
    (tmp_path / "small.bin").unlink()
    capsys.readouterr()
    fresh = tmp_path / "maps2"
    assert main(["saliency", "--method", "csnet", "--weights", str(path), "--images", str(images),
                 "--out", str(fresh), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "small.bin" in err[0]
    assert not fresh.exists()


# ------------------------------------------------------------------ the authors' checkpoint

def test_authors_checkpoint_reproduces_their_maps():
    _need_shared()
    from eps.data.io import read_image, read_saliency

    ids = sorted(p.stem for p in (PHOTOS / "JPEGImages").glob("*.jpg"))[::48][:SAMPLE]
    model = csnet.load_model(WEIGHTS)
    assert sum(p.numel() for p in model.parameters()) == 140_894
    predict = csnet.predictor(model, "cpu")
    maps = predict.batch([read_image(PHOTOS / "JPEGImages" / f"{i}.jpg") for i in ids])
    diffs = []
    for image_id, sal in zip(ids, maps):
        ref = read_saliency(PHOTOS / "SALImages" / f"{image_id}.png")
        assert sal.shape == ref.shape
        diffs.append(np.abs(sal.astype(np.int16) - ref.astype(np.int16)).ravel())
    diff = np.concatenate(diffs)
    assert diff.mean() <= 0.5
    assert (diff <= 2).mean() >= 0.99


# ------------------------------------------------------------- eval-saliency --ids, void

def _label_png(path, labels):
    img = Image.fromarray(labels.astype(np.uint8), mode="P")
    img.putpalette([0, 0, 0, 128, 0, 0] + [0, 0, 0] * 253 + [224, 224, 192])
    img.save(path)


def _voc_pair(tmp_path):
    """Label masks with a void band (255) and maps that are right except on the void."""
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    gt.mkdir()
    pred.mkdir()
    for k in range(3):
        labels = np.zeros((20, 20), np.uint8)
        labels[5:15, 5:15] = 8 + k
        labels[4, 4:16] = 255
        _label_png(gt / f"im{k}.png", labels)
        sal = np.where((labels > 0) & (labels != 255), 255, 0).astype(np.uint8)
        Image.fromarray(sal, mode="L").save(pred / f"im{k}.png")
    return gt, pred


def test_eval_saliency_ignores_the_voc_void(tmp_path):
    gt, pred = _voc_pair(tmp_path)
    out = tmp_path / "s.json"
    assert main(["eval-saliency", "--pred", str(pred), "--gt", str(gt), "--out", str(out)]) == 0
    scores = json.loads(out.read_text())
    # void counted as salient would give MAE 12/400 per image
    assert scores["mae"] == 0 and scores["f_adaptive"] == pytest.approx(1)
    assert scores["s_measure"] == pytest.approx(1, abs=1e-6)


def test_eval_saliency_of_shards_ignores_the_void(tmp_path):
    from eps.data.io import atomic_h5
    from eps.saliency.metrics import evaluate_shards

    gt, pred = _voc_pair(tmp_path)
    shard = tmp_path / "sal.h5"
    with atomic_h5(shard, "eps.saliency", "tiny") as f:
        for k in range(3):
            f.create_dataset(f"im{k}", data=np.asarray(Image.open(pred / f"im{k}.png")))
    result = evaluate_shards([shard], gt)
    assert result["images"] == 3 and result["mae"] == 0


def test_eval_saliency_ids_scores_a_subset(tmp_path, capsys):
    gt, pred = _voc_pair(tmp_path)
    bad = np.zeros((20, 20), np.uint8)
    Image.fromarray(bad, mode="L").save(pred / "im2.png")  # im2 now all wrong
    ids = tmp_path / "ids.txt"
    ids.write_text("im0\n\nim1  # a comment\n")
    out = tmp_path / "s.json"
    assert main(["eval-saliency", "--pred", str(pred), "--gt", str(gt), "--ids", str(ids), "--out", str(out)]) == 0
    scores = json.loads(out.read_text())
    assert scores["images"] == 2 and scores["mae"] == 0
    assert main(["eval-saliency", "--pred", str(pred), "--gt", str(gt), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["mae"] > 0
    ids.write_text("im0\nim9\n")
    capsys.readouterr()
    assert main(["eval-saliency", "--pred", str(pred), "--gt", str(gt), "--ids", str(ids), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "im9" in err[0]
    ids.write_text("\n")
    assert main(["eval-saliency", "--pred", str(pred), "--gt", str(gt), "--ids", str(ids), "--out", str(out)]) == 2
    assert "no image ids" in capsys.readouterr().err
