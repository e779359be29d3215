"""PFAN and DSS: the authors' / the port's weight layouts, conversion round trips, load errors,
predictors, losses and supervised training with exact resume.

Models are random (no weights are downloaded); inputs are 32-64 px, training runs 2-4
iterations on four generated 32 x 40 images, so the module takes well under a minute on CPU.
"""

from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest
import torch

from eps.data.io import read_saliency, write_gray_png, write_rgb
from eps.errors import EpsError
from eps.saliency import dss, pfan, supervised


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def one_line_error(excinfo, *parts):
    message = str(excinfo.value)
    assert "\n" not in message
    for part in parts:
        assert str(part) in message, message


def random_pfan(seed=0) -> pfan.PFAN:
    torch.manual_seed(seed)
    model = pfan.PFAN()
    with torch.no_grad():  # non-trivial BatchNorm parameters and statistics, so they take part
        for m in model.modules():
            if isinstance(m, pfan.KerasBatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    return model.eval()


def random_dss(seed=0) -> dss.DSS:
    torch.manual_seed(seed)
    model = dss.DSS()
    with torch.no_grad():  # larger side weights than the paper's 0.01, so the maps differ
        for side in model.sides:
            for conv in (side.conv1, side.conv2, side.score):
                conv.weight.normal_(0, 0.05)
                conv.bias.uniform_(-0.1, 0.1)
        model.fusion_weights.uniform_(0, 1)
    return model.eval()


def pfan_input(seed=1, size=64):
    return torch.from_numpy(np.random.default_rng(seed).normal(0, 60, (2, 3, size, size)).astype(np.float32))


def edit_h5(path, fn):
    with h5py.File(path, "r+") as f:
        fn(f)


def drop_layer(f, layer):
    del f[layer]
    f.attrs["layer_names"] = np.array([n for n in f.attrs["layer_names"] if n.decode() != layer])


# ----------------------------------------------------------------------------- PFAN: Keras layout

def test_keras_file_has_the_authors_layer_names_and_shapes(tmp_path):
    path = pfan.save_keras_h5(random_pfan(), tmp_path / "pfan.h5")
    with h5py.File(path, "r") as f:
        names = [n.decode() for n in f.attrs["layer_names"]]
        assert len(names) == 47  # 13 VGG + 4 low level + 3 x 5 CPFE + 2 dense + 2 C345 + 8 attention + 2 C12 + sa

        def shape(layer, role):
            assert f"{layer}/{role}:0".encode() in list(f[layer].attrs["weight_names"])
            return f[layer][layer][f"{role}:0"].shape

        assert shape("block1_conv1", "kernel") == (3, 3, 3, 64)
        assert shape("block5_conv3", "bias") == (512,)
        assert shape("C1_conv", "kernel") == (3, 3, 64, 64)
        assert shape("C1_BN_BN", "moving_variance") == (64,)
        assert shape("C3_cfe_cfe0", "kernel") == (1, 1, 256, 32)
        assert shape("C4_cfe_cfe2_dilation", "kernel") == (3, 3, 512, 32)
        assert "C4_cfe_cfe2_dilation/bias:0".encode() not in list(f["C4_cfe_cfe2_dilation"].attrs["weight_names"])
        assert shape("C5_cfe_BN", "gamma") == (128,)
        assert shape("dense_1", "kernel") == (384, 96)
        assert shape("dense_2", "kernel") == (96, 384)
        assert shape("C345_conv", "kernel") == (1, 1, 384, 64)
        assert shape("spatial_attention_1_conv1", "kernel") == (1, 9, 64, 32)
        assert shape("spatial_attention_1_conv2", "kernel") == (9, 1, 32, 1)
        assert shape("spatial_attention_2_conv1", "kernel") == (9, 1, 64, 32)
        assert shape("attention2_2_BN", "beta") == (1,)
        assert shape("C12_conv", "kernel") == (3, 3, 128, 64)
        assert shape("sa", "kernel") == (3, 3, 128, 1)


def test_keras_kernels_are_transposed_to_torch_layout(tmp_path):
    path = pfan.save_keras_h5(random_pfan(), tmp_path / "pfan.h5")

    def plant(f):
        kernel = np.zeros((3, 3, 3, 64), np.float32)
        kernel[0, 2, 1, 5] = 7.0  # row 0, column 2, input channel 1, output channel 5
        f["block1_conv1/block1_conv1/kernel:0"][...] = kernel
        dense = np.zeros((384, 96), np.float32)
        dense[3, 7] = -2.0  # input 3 -> output 7
        f["dense_1/dense_1/kernel:0"][...] = dense

    edit_h5(path, plant)
    model = pfan.load_weights(pfan.PFAN(), path)
    conv = model.features[0].weight
    assert conv[5, 1, 0, 2] == 7.0 and conv.abs().sum() == 7.0
    fc1 = model.channel_attention.fc1.weight
    assert fc1.shape == (96, 384) and fc1[7, 3] == -2.0 and fc1.abs().sum() == 2.0


def test_pfan_h5_round_trip_gives_identical_outputs(tmp_path):
    model = random_pfan(0)
    path = pfan.save_keras_h5(model, tmp_path / "pfan.h5")
    loaded = pfan.load_weights(pfan.PFAN(), path).eval()
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    x = pfan_input()
    with torch.no_grad():
        expected = model(x)
        assert torch.equal(expected, loaded(x))
        assert not torch.equal(expected, random_pfan(1)(x))  # the weights matter


def test_pfan_reads_full_model_files_and_tf_keras_dense_names(tmp_path):
    model = random_pfan(0)
    path = pfan.save_keras_h5(model, tmp_path / "pfan.h5")
    full = tmp_path / "full.h5"  # model.save(): weights under model_weights, config beside them
    with h5py.File(path, "r") as src, h5py.File(full, "w") as dst:
        group = dst.create_group("model_weights")
        for key, value in src.attrs.items():
            group.attrs[key] = value
        for name in src:
            src.copy(name, group)
        dst.attrs["model_config"] = b"{}"

    def tf_keras_names(f):  # tf.keras names the unnamed Dense layers dense, dense_1
        f.move("dense_1", "dense")
        f.move("dense_2", "dense_1")
        for old, new in (("dense", "dense"), ("dense_1", "dense_1")):
            f[new].attrs["weight_names"] = np.array([f"{new}/kernel:0".encode(), f"{new}/bias:0".encode()])
        f["dense"].move("dense_1", "dense")
        f["dense_1"].move("dense_2", "dense_1")
        names = [n.decode() for n in f.attrs["layer_names"]]
        renamed = {"dense_1": "dense", "dense_2": "dense_1"}
        f.attrs["layer_names"] = np.array([renamed.get(n, n).encode() for n in names])

    renamed = tmp_path / "tf.h5"
    shutil.copy(path, renamed)
    edit_h5(renamed, tf_keras_names)
    x = pfan_input()
    with torch.no_grad():
        expected = model(x)
        for file in (full, renamed):
            assert torch.equal(pfan.load_weights(pfan.PFAN(), file).eval()(x), expected), file


def test_pfan_load_errors_name_the_file_and_the_tensor(tmp_path):
    path = pfan.save_keras_h5(random_pfan(), tmp_path / "pfan.h5")

    wrong = tmp_path / "wrong.h5"
    shutil.copy(path, wrong)

    def reshape(f):
        del f["C12_conv/C12_conv/kernel:0"]
        f["C12_conv/C12_conv"].create_dataset("kernel:0", data=np.zeros((3, 3, 64, 64), np.float32))

    edit_h5(wrong, reshape)
    with pytest.raises(EpsError) as err:
        pfan.load_weights(pfan.PFAN(), wrong)
    one_line_error(err, wrong, "C12_conv/kernel:0", "(3, 3, 64, 64)", "(3, 3, 128, 64)")

    missing = tmp_path / "missing.h5"
    shutil.copy(path, missing)
    edit_h5(missing, lambda f: drop_layer(f, "sa"))
    with pytest.raises(EpsError) as err:
        pfan.load_weights(pfan.PFAN(), missing)
    one_line_error(err, missing, "missing tensor sa/kernel:0")

    extra = tmp_path / "extra.h5"
    shutil.copy(path, extra)

    def add_layer(f):
        f.create_group("fc1").create_dataset("fc1/kernel:0", data=np.zeros((2, 2), np.float32))
        f["fc1"].attrs["weight_names"] = np.array([b"fc1/kernel:0"])
        f.attrs["layer_names"] = np.array(list(f.attrs["layer_names"]) + [b"fc1"])

    edit_h5(extra, add_layer)
    with pytest.raises(EpsError) as err:
        pfan.load_weights(pfan.PFAN(), extra)
    one_line_error(err, extra, "unexpected tensor fc1/kernel:0")

    text = tmp_path / "notes.h5"
    text.write_text("not weights\n")
    with pytest.raises(EpsError) as err:
        pfan.load_weights(pfan.PFAN(), text)
    one_line_error(err, text, "Keras .h5")

    plain = tmp_path / "plain.h5"  # HDF5, but not Keras
    with h5py.File(plain, "w") as f:
        f.create_dataset("x", data=np.zeros(3))
    with pytest.raises(EpsError) as err:
        pfan.load_weights(pfan.PFAN(), plain)
    one_line_error(err, plain, "layer_names")

    foreign = tmp_path / "foreign.pt"
    torch.save({"w": torch.zeros(2)}, foreign)
    with pytest.raises(EpsError) as err:
        pfan.load_weights(pfan.PFAN(), foreign)
    one_line_error(err, foreign, "not a PFAN weights file")

    with pytest.raises(EpsError) as err:
        pfan.load_weights(pfan.PFAN(), tmp_path / "absent.h5")
    one_line_error(err, "absent.h5", "not found")


def test_pfan_batch_norm_uses_the_batch_statistics_as_the_authors_layer():
    bn = pfan.KerasBatchNorm(2).eval()
    with torch.no_grad():
        bn.running_mean.fill_(100.0)  # never used to normalise
        x = torch.tensor([[1.0, 3.0], [10.0, 30.0]]).view(1, 2, 1, 2)
        y = bn(x)
    # per channel: (x - mean) / sqrt(var + 1e-3), var the biased variance of the batch (1 and 100)
    expected = torch.tensor([[-1.0, 1.0], [-10.0, 10.0]]) / torch.sqrt(torch.tensor([[1.001], [100.001]]))
    assert torch.allclose(y.view(2, 2), expected, atol=1e-6)
    assert bn.running_mean[0] == 100.0  # not updated outside training


def test_pfan_preprocessing_pads_to_a_square_and_subtracts_the_mean():
    rgb = np.full((2, 4, 3), 200, np.uint8)
    square, offsets = pfan.pad_square(rgb)
    assert square.shape == (4, 4, 3) and offsets == (1, 0)
    assert square[0].max() == 0 and square[3].max() == 0 and (square[1:3] == 200).all()
    x = pfan.preprocess(np.full((8, 8, 3), 100, np.uint8), size=8)
    assert x.shape == (1, 3, 8, 8)
    assert np.allclose(x[0, :, 0, 0].numpy(), [100 - 103.939, 100 - 116.779, 100 - 123.68], atol=1e-4)


def test_pfan_predictor_is_the_sigmoid_of_the_network():
    model = random_pfan(0)
    predict = pfan.predictor(model, device="cpu")
    rgb = np.random.default_rng(0).integers(0, 256, (256, 256, 3)).astype(np.uint8)
    with torch.no_grad():
        prob = torch.sigmoid(model(pfan.preprocess(rgb)))[0, 0].numpy()
    sal = predict(rgb)
    assert sal.dtype == np.uint8 and sal.shape == (256, 256)
    assert np.abs(sal.astype(int) - np.round(prob * 255)).max() <= 1
    assert predict(rgb[:40, :70]).shape == (40, 70)
    with pytest.raises(EpsError, match="pfan needs --weights"):
        pfan.load_predictor(None)


# ----------------------------------------------------------------------------------- DSS port

@pytest.fixture(scope="module")
def dss_model():
    """One random DSS and its port state_dict (62M parameters: built once)."""
    model = random_dss(0)
    return model, dss.to_port_state_dict(model)


def test_port_names_and_shapes_are_those_of_dssnet(dss_model):
    names = dss_model[1]
    # 13 VGG convs, 6 sides x 3 convs, 12 short-connection upsamplers, 6 merges, 5 upsamplers, fusion
    assert len(names) == 2 * (13 + 18 + 12 + 6 + 5) + 1
    expected = {
        "base.0.weight": (64, 3, 3, 3), "base.28.bias": (512,),
        "feat.0.main.0.weight": (128, 64, 3, 3), "feat.3.main.2.weight": (256, 256, 5, 5),
        "feat.5.main.0.weight": (512, 512, 7, 7), "feat.5.main.4.weight": (1, 512, 1, 1),
        "comb.0.upconv.0.weight": (1, 1, 8, 8), "comb.0.upconv.3.weight": (1, 1, 64, 64),
        "comb.3.upconv.1.weight": (1, 1, 8, 8), "comb.0.conv.weight": (1, 5, 1, 1),
        "comb.2.conv.weight": (1, 3, 1, 1), "comb.4.conv.weight": (1, 1, 1, 1),
        "comb.1.deconv.weight": (1, 1, 4, 4), "comb.5.deconv.weight": (1, 1, 64, 64),
        "fuse.weights": (6,),
    }
    for key, shape in expected.items():
        assert tuple(names[key].shape) == shape, key
    assert "comb.0.deconv.weight" not in names and "comb.4.upconv.0.weight" not in names


def test_dss_port_round_trip_gives_identical_outputs(dss_model, tmp_path):
    model, port = dss_model
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
    assert len(expected) == 7 and all(m.shape == (1, 1, 64, 64) for m in expected)
    # a released checkpoint as the port's solver may hold it: under 'state_dict', DataParallel prefix
    torch.save({"state_dict": {"module." + k: v for k, v in port.items()}}, tmp_path / "final.pth")
    loaded = dss.load_weights(dss.DSS(), tmp_path / "final.pth").eval()
    with torch.no_grad():
        got = loaded(x)
    assert all(torch.equal(a, b) for a, b in zip(expected, got))
    with torch.no_grad():
        loaded.sides[3].score.bias.add_(1.0)  # the weights matter
        assert not torch.equal(loaded(x)[6], expected[6])


def test_dss_port_v1_files_fuse_by_the_mean(dss_model):
    port = {k: v for k, v in dss_model[1].items() if k != "fuse.weights"}
    model = dss.DSS().eval()
    model.load_state_dict(dss.port_state("v1.pth", port, model))
    with torch.no_grad():
        maps = model(torch.randn(1, 3, 32, 32))
    assert torch.allclose(maps[6], torch.stack(maps[:6]).mean(0), atol=1e-6)


def test_dss_load_errors_name_the_file_and_the_tensor(dss_model, tmp_path):
    port = dss_model[1]
    model = dss.DSS()
    wrong = dict(port, **{"comb.1.conv.weight": torch.zeros(1, 4, 1, 1)})
    with pytest.raises(EpsError) as err:
        dss.port_state("wrong.pth", wrong, model)
    one_line_error(err, "wrong.pth", "comb.1.conv.weight", "(1, 4, 1, 1)", "(1, 5, 1, 1)")

    missing = {k: v for k, v in port.items() if k != "feat.2.main.4.bias"}
    with pytest.raises(EpsError) as err:
        dss.port_state("missing.pth", missing, model)
    one_line_error(err, "missing.pth", "missing tensor feat.2.main.4.bias")

    with pytest.raises(EpsError) as err:
        dss.port_state("extra.pth", dict(port, **{"extra.weight": torch.zeros(1)}), model)
    one_line_error(err, "extra.pth", "unexpected tensor extra.weight")

    (tmp_path / "text.pth").write_text("hello\n")
    with pytest.raises(EpsError) as err:
        dss.load_weights(model, tmp_path / "text.pth")
    one_line_error(err, "text.pth", "DSS-pytorch .pth")

    torch.save({"format": supervised.FORMAT, "method": "pfan", "state_dict": {}}, tmp_path / "pfan.pt")
    with pytest.raises(EpsError) as err:
        dss.load_weights(model, tmp_path / "pfan.pt")
    one_line_error(err, "pfan.pt", "not dss")

    torch.save({"base.0.weight": torch.zeros(64, 3, 3, 3)}, tmp_path / "part.pth")
    with pytest.raises(EpsError) as err:
        dss.load_weights(model, tmp_path / "part.pth")
    one_line_error(err, "part.pth", "missing tensor base.0.bias")


def test_dss_upsamplers_interpolate_bilinearly():
    ramp = torch.tensor([0.25, 0.75, 0.75, 0.25])  # 1 - |i - 1.5| / 2
    assert torch.allclose(dss.bilinear_kernel(4), ramp[:, None] * ramp[None, :])
    up = dss.upsampler(4)
    with torch.no_grad():
        out = up(torch.ones(1, 1, 4, 4))
        line = up(torch.arange(4.0).view(1, 1, 1, 4).expand(1, 1, 4, 4).contiguous())
    assert out.shape == (1, 1, 16, 16)
    assert torch.allclose(out[0, 0, 2:-2, 2:-2], torch.ones(12, 12))  # constant away from the border
    row = line[0, 0, 8, 2:-2]  # interpolates linearly: steps of 1/4 between the input pixels
    assert torch.allclose(row[1:] - row[:-1], torch.full((11,), 0.25), atol=1e-6)


def test_dss_predictor_is_the_ports_mean_of_four_maps(dss_model):
    model = dss_model[0]
    predict = dss.predictor(model)
    rgb = np.random.default_rng(0).integers(0, 256, (256, 256, 3)).astype(np.uint8)
    x = dss.preprocess(rgb)
    assert np.allclose(x[0, :, 5, 7].numpy(), (rgb[5, 7] / 255.0 - np.array(dss.MEAN)) / np.array(dss.STD), atol=1e-5)
    with torch.no_grad():
        maps = model(x)
    prob = np.mean([torch.sigmoid(maps[i])[0, 0].numpy() for i in (1, 2, 3, 6)], axis=0)
    sal = predict(rgb)
    assert sal.dtype == np.uint8 and np.abs(sal.astype(int) - np.round(prob * 255)).max() <= 1
    assert predict(rgb[:50, :30]).shape == (50, 30)
    with pytest.raises(EpsError, match="dss needs --weights"):
        dss.load_predictor(None)


# ------------------------------------------------------------------------------------ losses

def test_laplace_edges_and_the_pfan_loss():
    dot = torch.zeros(1, 1, 5, 5)
    dot[0, 0, 2, 2] = 1.0
    edges = supervised.laplace_edges(dot)
    assert torch.isclose(edges[0, 0, 2, 2], torch.tanh(torch.tensor(8.0)))
    assert edges.sum() == edges[0, 0, 2, 2]  # the neighbours get -1: cut by the ReLU

    rng = np.random.default_rng(0)
    logits = torch.from_numpy(rng.normal(0, 2, (2, 1, 6, 6)).astype(np.float32))
    target = torch.from_numpy((rng.random((2, 1, 6, 6)) > 0.5).astype(np.float32))
    attention = torch.tensor([[0.2, 0.4], [0.6, 0.8]])
    p = 1 / (1 + np.exp(-logits.numpy().astype(np.float64)))
    t = target.numpy()
    sal = np.mean(-(1.12 * t * np.log(p) + (1 - t) * np.log(1 - p)))
    pe = np.clip(supervised.laplace_edges(torch.from_numpy(p.astype(np.float32))).numpy(), 1e-7, 1 - 1e-7)
    te = supervised.laplace_edges(target).numpy()
    edge = np.mean(-(te * np.log(pe) + (1 - te) * np.log(1 - pe)))
    expected = 0.7 * sal + 0.3 * edge + 0.5
    assert abs(supervised.pfan_loss(logits, target, attention).item() - expected) < 1e-4


def test_dss_loss_sums_over_pixels_and_maps_averages_over_the_batch():
    target = torch.zeros(3, 1, 4, 5)
    target[0, 0, :2] = 1
    maps = [torch.zeros(3, 1, 4, 5) for _ in range(7)]  # p = 0.5 everywhere: ln 2 per pixel
    assert abs(supervised.dss_loss(maps, target).item() - 7 * 20 * np.log(2)) < 1e-3


def test_learning_rate_schedules():
    assert [supervised.lr_factor("pfan", s, 80) for s in (0, 9, 10, 25, 79)] == [1, 1, 0.5, 0.25, 0.5 ** 7]
    assert [supervised.lr_factor("dss", s, 12000) for s in (0, 7499, 7500, 11999)] == [1, 1, 0.1, 0.1]


def test_dss_optimizer_groups_follow_the_caffe_solver(dss_model):
    model = dss_model[0]
    opt = supervised.make_optimizer(model, "dss", supervised.resolve_params("dss", {}))
    by_id = {id(p): (g["lr"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}
    assert by_id[id(model.features[0].weight)] == (1e-8, 5e-4)
    assert by_id[id(model.sides[2].conv1.bias)] == (2e-8, 0.0)
    assert by_id[id(model.sides[2].score.weight)] == pytest.approx((1e-9, 5e-4))
    assert by_id[id(model.shorts[1].combine.bias)] == pytest.approx((2e-9, 0.0))
    assert by_id[id(model.fusion_weights)] == pytest.approx((1e-9, 5e-4))
    assert id(model.shorts[1].upsample.weight) not in by_id  # fixed bilinear upsampling
    assert not model.shorts[0].up[0].weight.requires_grad
    model.requires_grad_(True)  # the module's shared model: as it was


# ---------------------------------------------------------------------------------- training

def make_dataset(root, count=4):
    rng = np.random.default_rng(0)
    for i in range(count):
        image = rng.integers(0, 256, (32, 40, 3)).astype(np.uint8)
        mask = np.zeros((32, 40), np.uint8)
        mask[6 + i:22, 8:28 + i] = 255
        image[mask > 0] = (220, 40, 30)
        write_rgb(root / "images" / f"im{i}.jpg", image)
        write_gray_png(root / "masks" / f"im{i}.png", mask)
    return root / "images", root / "masks"


TINY = {"iterations": 3, "batch_size": 2, "size": 32, "checkpoint_every": 2, "num_workers": 0}


@pytest.mark.parametrize("method", ["pfan", "dss"])
def test_training_writes_a_file_the_predictor_loads(tmp_path, method):
    images, masks = make_dataset(tmp_path)
    params = dict(TINY, iterations=1 if method == "dss" else 3)
    out = supervised.train(method, images, masks, tmp_path / "out" / f"{method}.pt", params, progress=False)
    log = (tmp_path / "out" / f"{method}_train_log.csv").read_text().splitlines()
    assert len(log) == 1 + params["iterations"]
    assert all(np.isfinite(float(row.split(",")[1])) for row in log[1:])
    assert not (tmp_path / "out" / "checkpoints" / f"{method}-last.pt").exists()
    assert not list((tmp_path / "out").rglob("*.tmp"))
    state = torch.load(out, weights_only=True)
    assert state["format"] == supervised.FORMAT and state["method"] == method
    module = pfan if method == "pfan" else dss
    sal = module.load_predictor(out)(np.zeros((20, 30, 3), np.uint8))
    assert sal.shape == (20, 30) and sal.dtype == np.uint8
    if method == "dss":  # the transposed convs stay bilinear
        assert torch.equal(state["state_dict"]["shorts.5.upsample.weight"][0, 0], dss.bilinear_kernel(64))
    if method == "pfan":  # a file of one method is refused by the other
        with pytest.raises(EpsError, match="an eps pfan network, not dss"):
            dss.load_predictor(out)


def test_pfan_resume_ends_with_the_weights_of_an_uninterrupted_run(tmp_path, kill_at_checkpoint):
    images, masks = make_dataset(tmp_path)
    params = dict(TINY, iterations=3, checkpoint_every=1)  # checkpoints after iterations 1 and 2
    ref = supervised.train("pfan", images, masks, tmp_path / "ref" / "pfan.pt", params, progress=False)

    kill = kill_at_checkpoint(2)
    out = tmp_path / "run" / "pfan.pt"
    with pytest.raises(kill.error):
        supervised.train("pfan", images, masks, out, params, progress=False)
    assert not out.exists() and (tmp_path / "run" / "checkpoints" / "pfan-last.pt").exists()
    kill.restore()
    supervised.train("pfan", images, masks, out, params, progress=False)

    a = torch.load(ref, weights_only=True)["state_dict"]
    b = torch.load(out, weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    log = (tmp_path / "run" / "pfan_train_log.csv").read_text().splitlines()
    ref_log = (tmp_path / "ref" / "pfan_train_log.csv").read_text().splitlines()
    assert [row.split(",")[:3] for row in log] == [row.split(",")[:3] for row in ref_log]  # same losses, lr
    assert [row.split(",")[0] for row in log[1:]] == ["1", "2", "3"]


def test_training_input_errors(tmp_path):
    images, masks = make_dataset(tmp_path, count=2)
    (masks / "im1.png").unlink()
    with pytest.raises(EpsError) as err:
        supervised.train("pfan", images, masks, tmp_path / "p.pt", TINY, progress=False)
    one_line_error(err, "im1.jpg", "no mask im1.png")
    assert not (tmp_path / "p.pt").exists()
    with pytest.raises(EpsError, match="multiple of 32"):
        supervised.resolve_params("dss", {"size": 40})
    with pytest.raises(EpsError, match="unknown parameter"):
        supervised.resolve_params("dss", {"epochs": 3})
    with pytest.raises(EpsError, match="not a supervised saliency network"):
        supervised.resolve_params("usps", {})
    assert supervised.resolve_params("pfan", {})["lr"] == 1e-2
    assert supervised.resolve_params("dss", {"lr": 3e-8})["lr"] == 3e-8


def test_pfan_training_preparation_pads_with_the_mean_and_keeps_the_mask():
    image = np.full((16, 32, 3), 100, np.uint8)
    mask = np.zeros((16, 32), np.uint8)
    mask[:, 16:] = 255
    x, y = supervised.prepare("pfan", image, mask, 32)
    assert x.shape == (3, 32, 32) and y.shape == (1, 32, 32)
    assert np.allclose(x[:, 0, 0], 0) and np.allclose(x[:, 16, 0], 100 - np.array(pfan.INPUT_MEAN), atol=1e-3)
    assert y[0, :8].max() == 0 and y[0, 8:24, 16:].min() == 1 and y[0, 8:24, :16].max() == 0
    x, y = supervised.prepare("dss", image, mask, 32, rng=None)
    assert y.mean() == 0.5 and np.allclose(x[:, 0, 0], (100 / 255 - np.array(dss.MEAN)) / np.array(dss.STD), atol=1e-5)
    aug_x, aug_y = supervised.prepare("pfan", image, mask, 32, np.random.default_rng(3))
    assert aug_x.shape == (3, 32, 32) and 0 <= aug_y.min() and aug_y.max() <= 1


# ---------------------------------------------------------------------------- initialisation

def test_torchvision_vgg16_initialises_pfan_with_its_own_normalisation(tmp_path):
    from eps.data.imagenet import MEAN, STD

    torch.manual_seed(0)
    vgg = pfan.vgg16_features()
    torch.save({f"features.{k}": v for k, v in vgg.state_dict().items()}, tmp_path / "vgg16.pth")
    model = pfan.PFAN()
    note = supervised.init_model(model, "pfan", tmp_path / "vgg16.pth")
    assert "torchvision" in note
    assert torch.equal(model.features[28].weight, vgg[28].weight)
    rgb = torch.rand(1, 3, 12, 12) * 255
    torchvision_input = (rgb / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    pfan_input_ = rgb - torch.tensor(pfan.INPUT_MEAN).view(1, 3, 1, 1)
    with torch.no_grad():
        a, b = vgg[0](torchvision_input), model.features[0](pfan_input_)
    assert torch.allclose(a[..., 1:-1, 1:-1], b[..., 1:-1, 1:-1], atol=1e-3)  # exact away from the border


def test_keras_vgg16_no_top_initialises_the_pfan_backbone(tmp_path):
    source = random_pfan(0)
    path = pfan.save_keras_h5(source, tmp_path / "vgg16_no_top.h5")

    def keep_vgg(f):
        for name in [n.decode() for n in f.attrs["layer_names"]]:
            if not name.startswith("block"):
                drop_layer(f, name)

    edit_h5(path, keep_vgg)
    model = pfan.PFAN()
    before = model.score.weight.clone()
    assert "VGG16" in supervised.init_model(model, "pfan", path)
    assert torch.equal(model.features[0].weight, source.features[0].weight)
    assert torch.equal(model.score.weight, before)


def test_dss_initialises_from_a_port_file(dss_model, tmp_path):
    source, port = dss_model
    torch.save(port, tmp_path / "final.pth")
    model = dss.DSS()
    assert "DSS-pytorch" in supervised.init_model(model, "dss", tmp_path / "final.pth")
    assert torch.equal(model.sides[5].conv1.weight, source.sides[5].conv1.weight)


# ---------------------------------------------------------------------------------- real data

def test_real_ecssd_pairs_prepare_and_train(shared_dir, tmp_path):
    """Real JPEG / PNG pairs in DUTS layout: listing, geometry of the targets, one iteration."""
    root = shared_dir / "data" / "ecssd_dev"
    images, masks = supervised.list_pairs(root / "images", root / "ground_truth_mask")
    assert len(images) == 500 and all(m.stem == i.stem for i, m in zip(images, masks))
    from eps.data.io import read_image

    image, mask = read_image(images[0]), read_saliency(masks[0])
    for method in ("pfan", "dss"):
        _, y = supervised.prepare(method, image, mask, 64)
        side = max(mask.shape) if method == "pfan" else None
        fraction = (mask > 127).mean() * (mask.size / side ** 2 if side else 1)
        assert abs(y.mean() - fraction) < 0.03
    for folder, files in (("images", images[:2]), ("masks", masks[:2])):
        (tmp_path / folder).mkdir()
        for f in files:
            shutil.copy(f, tmp_path / folder / f.name)
    out = supervised.train("pfan", tmp_path / "images", tmp_path / "masks", tmp_path / "p.pt",
                           dict(TINY, iterations=1, size=64), progress=False)
    assert pfan.load_predictor(out)(image).shape == image.shape[:2]
