"""Weights conversion: MXNet .params without MXNet, EPS / PSA / torchvision / DeepLab files.

Most files here are hand-made. The PyTorch ones use expanded (stride-0) tensors, so a
full-size ResNet-38 / ResNet-101 state_dict is a few kB on disk; only the two ResNet-38
round trips below move real 400 MB weights.
"""

from __future__ import annotations

import re
import struct

import numpy as np
import pytest
import torch

from eps.cli import main
from eps.errors import EpsError
from eps.models import build_classifier, load_weights, read_weights
from eps.models.convert import expected_shapes, read_mxnet_params

torch.set_num_threads(1)

# ----------------------------------------------------------------------- test helpers

MX_FLAGS = {np.dtype(np.float32): 0, np.dtype(np.float64): 1, np.dtype(np.float16): 2,
            np.dtype(np.uint8): 3, np.dtype(np.int32): 4, np.dtype(np.int8): 5, np.dtype(np.int64): 6}


def write_params(path, arrays: dict, version: int = 2, stype: int = 0, names=True):
    """A minimal MXNet NDArray list writer (V2, V1 or legacy array headers)."""
    with open(path, "wb") as f:
        f.write(struct.pack("<QQQ", 0x112, 0, len(arrays)))
        for a in arrays.values():
            a = np.ascontiguousarray(a)
            if version == 2:
                f.write(struct.pack("<Iii", 0xF993FAC9, stype, a.ndim) + struct.pack(f"<{a.ndim}q", *a.shape))
            elif version == 1:
                f.write(struct.pack("<Ii", 0xF993FAC8, a.ndim) + struct.pack(f"<{a.ndim}q", *a.shape))
            else:
                f.write(struct.pack(f"<I{a.ndim}I", a.ndim, *a.shape))
            f.write(struct.pack("<iii", 1, 0, MX_FLAGS[a.dtype]))
            f.write(a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes())
        keys = list(arrays) if names else []
        f.write(struct.pack("<Q", len(keys)))
        for k in keys:
            f.write(struct.pack("<Q", len(k.encode())) + k.encode())
    return path


_MX_PARAM = {"weight": ("arg", "gamma"), "bias": ("arg", "beta"),
             "running_mean": ("aux", "moving_mean"), "running_var": ("aux", "moving_var")}


def mx_name(key: str) -> str | None:
    """The official MXNet name of a ResNet-38 PyTorch name (the inverse of the conversion)."""
    if key == "conv1a.weight":
        return "arg:conv1a_weight"
    m = re.fullmatch(r"bn7\.(\w+)", key)
    if m:
        kind, p = _MX_PARAM.get(m.group(1), (None, None))
        return p and f"{kind}:bn7_{p}"
    m = re.fullmatch(r"b(\d)(?:_(\d))?\.(bn|conv)_(branch\w+)\.(\w+)", key)
    if not m:
        return None
    stage, k, layer, branch, param = m.groups()
    block = f"{stage}a" if k is None else f"{stage}b{k}"
    if layer == "conv":
        return f"arg:res{block}_{branch}_weight"
    kind, p = _MX_PARAM.get(param, (None, None))
    return p and f"{kind}:bn{block}_{branch}_{p}"


def fake_state(arch: str, optional=(), extra=None) -> dict:
    """A full state_dict of `arch` (required names + the `optional` ones), tiny on disk."""
    state = {}
    for i, (k, (shape, required)) in enumerate(expected_shapes(arch).items()):
        if required or k in optional:
            if k.endswith("num_batches_tracked"):
                state[k] = torch.tensor(7)
            else:
                shape = tuple(21 if s == -1 else s for s in shape)
                state[k] = torch.full((), float(i)).expand(shape)
    state.update(extra or {})
    return state


def cli(capsys, *args):
    rc = main(["convert-weights", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_fails(capsys, src, dst, *needles) -> str:
    rc, out, err = cli(capsys, src, dst)
    assert rc == 2, (out, err)
    assert err.count("\n") == 1 and err.startswith(f"eps: error: {src}: "), err
    for needle in needles:
        assert needle in err, (needle, err)
    assert not dst.exists()
    assert not dst.parent.exists() or not any(dst.parent.iterdir())  # no temporary left
    return err


@pytest.fixture(scope="module")
def resnet38():
    torch.manual_seed(0)
    return build_classifier("resnet38", 20, background=True).eval()


# ------------------------------------------------------------------ MXNet .params

def test_golden_params_convert_exactly(shared_dir, tmp_path, capsys):
    src = shared_dir / "golden" / "resnet38_subset.params"
    expected = np.load(shared_dir / "golden" / "resnet38_subset_expected.npz")
    got = read_weights(src, allow_missing=True)
    assert got.layout == "mxnet-resnet38"
    assert list(got.state) == list(expected.files)
    for k in expected.files:
        a = got.state[k].numpy()
        assert a.dtype == expected[k].dtype and a.shape == expected[k].shape, k
        assert np.array_equal(a, expected[k]), k
    assert sorted(got.dropped) == ["arg:linear1000_bias", "arg:linear1000_weight"]

    # the CLI: a subset lacks most of the network, which is an error unless allowed
    dst = tmp_path / "out" / "resnet38.pth"
    assert_fails(capsys, src, dst, "missing keys: b3.conv_branch2a.weight")
    rc, out, err = cli(capsys, src, dst, "--allow-missing")
    assert rc == 0 and not err and "linear1000" in out and "dropped 2" in out
    written = torch.load(dst, weights_only=True)
    assert list(written) == list(expected.files)
    assert all(np.array_equal(written[k].numpy(), expected[k]) for k in expected.files)

    # the golden file cut short: the error names the array that lacks bytes
    (tmp_path / "golden_cut.params").write_bytes(src.read_bytes()[:-10_000])
    assert_fails(capsys, tmp_path / "golden_cut.params", tmp_path / "cut" / "w.pth",
                 "truncated", "array #158")


def test_mxnet_versions_and_dtypes(tmp_path):
    arrays = {"arg:a": np.arange(6, dtype=np.float32).reshape(2, 3),
              "arg:b": np.array([1.5, -2], np.float16), "aux:c": np.arange(4, dtype=np.int64),
              "d": np.ones((1, 2, 1, 1), np.float64), "e": np.array([3], np.uint8)}
    for version in (2, 1, 0):
        got = read_mxnet_params(write_params(tmp_path / f"v{version}.params", arrays, version))
        assert list(got) == list(arrays)
        for k, v in arrays.items():
            assert got[k].dtype == v.dtype and np.array_equal(got[k], v), (version, k)


def test_full_resnet38_from_mxnet_round_trip(resnet38, tmp_path, capsys):
    """Official-layout .params (all 191 trunk arrays + linear1000) -> convert -> load."""
    arrays = {}
    for k, v in resnet38.state_dict().items():
        name = mx_name(k)
        if name:
            arrays[name] = (v * 0.5).numpy()  # other (valid) values than the model holds
        elif not k.endswith("num_batches_tracked"):
            assert k == "fc8.weight", k
    arrays["arg:linear1000_weight"] = np.zeros((1000, 4096), np.float32)
    arrays["arg:linear1000_bias"] = np.zeros(1000, np.float32)
    src = write_params(tmp_path / "ilsvrc-cls_rna-a1_cls1000_ep-0001.params", arrays)
    dst = tmp_path / "resnet38_imagenet.pth"
    rc, out, err = cli(capsys, src, dst)
    assert rc == 0, err
    assert "MXNet ResNet-38" in out and "linear1000" in out

    # the ImageNet file has no fc8: a full load must say so, a backbone load works
    with pytest.raises(EpsError, match=r"missing keys: fc8\.weight$"):
        load_weights(resnet38, dst, report=None)
    head = resnet38.fc8.weight.clone()
    load_weights(resnet38, src, backbone_only=True, report=None)  # straight from .params
    state = resnet38.state_dict()
    assert all(np.array_equal(state[k].numpy(), arrays[mx_name(k)]) for k in state if mx_name(k))
    assert torch.equal(resnet38.fc8.weight, head)
    assert all(int(v) == 0 for k, v in state.items() if k.endswith("num_batches_tracked"))


# ----------------------------------------------------------- EPS / PSA checkpoints

def test_fake_official_eps_checkpoint_gives_the_same_cams(resnet38, tmp_path, capsys):
    """A DataParallel-saved EPS checkpoint (`module.` prefix) reproduces the network."""
    x = torch.rand(1, 3, 24, 24)
    with torch.no_grad():
        official = resnet38.forward_cam(x)  # our model stands for resnet38_eps.Net(21)
    assert torch.isfinite(official).all() and official.abs().sum() > 0
    ckpt = tmp_path / "checkpoint_cls.pth"
    torch.save({f"module.{k}": v for k, v in resnet38.state_dict().items()}, ckpt)
    with torch.no_grad():  # spoil the weights, then load them back from the checkpoint
        for p in resnet38.parameters():
            p.zero_()
    lines = []
    load_weights(resnet38, ckpt, report=lines.append)
    assert any("module." in line for line in lines)
    with torch.no_grad():
        assert torch.equal(resnet38(x)[1], official)


def test_psa_checkpoints_convert_and_drop_unknown_heads(tmp_path, capsys):
    # PSA's classifier: 20-way fc8, no num_batches_tracked, saved from DataParallel
    cls = fake_state("resnet38", extra={"fc8.weight": torch.zeros(20, 4096, 1, 1)})
    torch.save({f"module.{k}": v for k, v in cls.items()}, tmp_path / "res38_cls.pth")
    dst = tmp_path / "cls" / "w.pth"
    rc, out, err = cli(capsys, tmp_path / "res38_cls.pth", dst)
    assert rc == 0 and "module." in out, err
    written = torch.load(dst, weights_only=True)
    assert list(written) == list(cls) and written["fc8.weight"].shape == (20, 4096, 1, 1)
    assert all(torch.equal(written[k], v) for k, v in cls.items())

    # PSA's AffNet: other heads, dropped with a report
    heads = {"f8_3.weight": torch.zeros(64, 512, 1, 1), "f8_4.weight": torch.zeros(128, 1024, 1, 1),
             "f8_5.weight": torch.zeros(256, 4096, 1, 1), "f9.weight": torch.zeros(448, 448, 1, 1)}
    torch.save(fake_state("resnet38", extra=heads), tmp_path / "res38_aff.pth")
    dst = tmp_path / "aff" / "w.pth"
    rc, out, err = cli(capsys, tmp_path / "res38_aff.pth", dst)
    assert rc == 0, err
    assert "dropped 4 tensors" in out and "f8_3.weight" in out and "f9.weight" in out
    written = torch.load(dst, weights_only=True)
    assert not set(heads) & set(written) and "b7.conv_branch2b2.weight" in written

    # the 20-way head does not fit a 21-way EPS model, but the backbone does
    model = build_classifier("resnet38", 20, background=True)
    with pytest.raises(EpsError, match="shape mismatch.*fc8.weight"):
        load_weights(model, tmp_path / "res38_cls.pth", report=None)
    load_weights(model, tmp_path / "res38_cls.pth", backbone_only=True, report=None)
    assert torch.equal(model.b4_5.conv_branch2b1.weight.detach(), cls["b4_5.conv_branch2b1.weight"])


# ----------------------------------------------------------- torchvision and DeepLab

@pytest.mark.parametrize("arch,optional", [
    ("resnet101", ("fc.weight", "fc.bias", "bn1.num_batches_tracked")),
    ("vgg16", tuple(f"classifier.{i}.{p}" for i in (0, 3, 6) for p in ("weight", "bias"))),
])
def test_torchvision_state_dicts_pass_through(arch, optional, tmp_path, capsys):
    state = fake_state(arch, optional)
    torch.save(state, tmp_path / f"{arch}.pth")
    dst = tmp_path / "out" / f"{arch}.pth"
    rc, out, err = cli(capsys, tmp_path / f"{arch}.pth", dst)
    assert rc == 0 and f"torchvision {'ResNet-101' if arch == 'resnet101' else 'VGG16'}" in out, err
    written = torch.load(dst, weights_only=True)
    assert list(written) == list(state) and all(torch.equal(written[k], v) for k, v in state.items())

    key = "layer3.22.conv2.weight" if arch == "resnet101" else "features.28.weight"
    del state[key]
    torch.save(state, tmp_path / "partial.pth")
    assert_fails(capsys, tmp_path / "partial.pth", tmp_path / "bad" / "w.pth", f"missing keys: {key}")


@pytest.mark.parametrize("arch", ["resnet101", "vgg16"])
def test_target_names_and_shapes_are_torchvisions(arch):
    torchvision = pytest.importorskip("torchvision", reason="torchvision not installed")
    with torch.device("meta"):
        model = getattr(torchvision.models, arch)()
    theirs = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    ours = expected_shapes(arch)
    assert list(ours) == list(theirs)
    for k, (shape, _) in ours.items():
        assert len(shape) == len(theirs[k]) and all(s in (-1, t) for s, t in zip(shape, theirs[k])), k


def deeplab_name(key: str) -> str:
    """kazuto1011/deeplab-pytorch (MSC) name of a torchvision ResNet-101 name."""
    m = re.fullmatch(r"(conv1|bn1)\.(\w+)", key)
    if m:
        return f"base.layer1.conv1.{'conv' if m.group(1) == 'conv1' else 'bn'}.{m.group(2)}"
    layer, block, rest = re.fullmatch(r"layer(\d)\.(\d+)\.(.+)", key).groups()
    unit = {"conv1": "reduce.conv", "bn1": "reduce.bn", "conv2": "conv3x3.conv", "bn2": "conv3x3.bn",
            "conv3": "increase.conv", "bn3": "increase.bn", "downsample.0": "shortcut.conv",
            "downsample.1": "shortcut.bn"}
    module, param = rest.rsplit(".", 1)
    return f"base.layer{int(layer) + 1}.block{int(block) + 1}.{unit[module]}.{param}"


def test_deeplab_caffe_resnet101_maps_to_torchvision_names(tmp_path, capsys):
    target = fake_state("resnet101", ("layer2.0.bn1.num_batches_tracked",))
    source = {deeplab_name(k): v for k, v in target.items()}
    assert "base.layer1.conv1.bn.running_mean" in source
    assert source["base.layer5.block1.shortcut.bn.running_var"] is target["layer4.0.downsample.1.running_var"]
    heads = {f"base.aspp.c{i}.{p}": torch.zeros((21, 2048, 3, 3) if p == "weight" else (21,))
             for i in range(4) for p in ("weight", "bias")}
    torch.save(dict(source, **heads), tmp_path / "deeplabv2_resnet101_msc_init.pth")
    dst = tmp_path / "out" / "resnet101.pth"
    rc, out, err = cli(capsys, tmp_path / "deeplabv2_resnet101_msc_init.pth", dst)
    assert rc == 0, err
    assert "DeepLab" in out and "dropped 8 tensors" in out and "base.aspp.c0.weight" in out
    written = torch.load(dst, weights_only=True)
    assert set(written) == set(target) and all(torch.equal(written[k], v) for k, v in target.items())

    # older ports: `proj` for the shortcut, no MSC prefix, DeepLab v1's 1x1 `fc` head
    old = {k.replace("shortcut", "proj").replace("base.", ""): v for k, v in source.items()}
    old["fc.weight"], old["fc.bias"] = torch.zeros(21, 2048, 1, 1), torch.zeros(21)
    torch.save(old, tmp_path / "deeplabv1_resnet101-coco.pth")
    rc, out, err = cli(capsys, tmp_path / "deeplabv1_resnet101-coco.pth", dst)
    assert rc == 0 and "dropped 2 tensors" in out, err
    assert set(torch.load(dst, weights_only=True)) == set(target)

    bad = dict(source, **{"base.layer3.block2.conv5x5.conv.weight": torch.zeros(1)})
    torch.save(bad, tmp_path / "bad.pth")
    assert_fails(capsys, tmp_path / "bad.pth", tmp_path / "bad" / "w.pth",
                 "unexpected keys", "conv5x5")


# ------------------------------------------------------------------- broken files

def test_broken_mxnet_files(tmp_path, capsys):
    small = {"arg:conv1a_weight": np.ones((64, 3, 3, 3), np.float32), "aux:bn7_moving_var": np.ones(4096, np.float32)}
    dst = tmp_path / "out" / "w.pth"

    good = write_params(tmp_path / "good.params", small).read_bytes()
    (tmp_path / "magic.params").write_bytes(b"\x13" + good[1:])
    assert_fails(capsys, tmp_path / "magic.params", dst, "bad magic number", "0x112")

    (tmp_path / "cut.params").write_bytes(good[:400])  # inside the first array's data
    assert_fails(capsys, tmp_path / "cut.params", dst, "truncated", "array #0")

    (tmp_path / "tail.params").write_bytes(good + b"\0\0")
    assert_fails(capsys, tmp_path / "tail.params", dst, "2 unexpected bytes")
    bad_array = bytearray(good)
    bad_array[24:28] = struct.pack("<I", 0xDEADBEEF)
    (tmp_path / "array_magic.params").write_bytes(bytes(bad_array))
    assert_fails(capsys, tmp_path / "array_magic.params", dst, "bad magic number 0xdeadbeef", "array #0")
    write_params(tmp_path / "sparse.params", small, stype=1)
    assert_fails(capsys, tmp_path / "sparse.params", dst, "row_sparse")
    write_params(tmp_path / "unnamed.params", small, names=False)
    assert_fails(capsys, tmp_path / "unnamed.params", dst, "no names")
    write_params(tmp_path / "odd.params", dict(small, **{"arg:bn2a_branch2c_gamma": np.ones(64, np.float32)}))
    assert_fails(capsys, tmp_path / "odd.params", dst, "unexpected keys: b2.bn_branch2c.weight")


def test_broken_torch_files(tmp_path, capsys):
    dst = tmp_path / "out" / "w.pth"
    torch.save([torch.zeros(3)], tmp_path / "list.pth")
    assert_fails(capsys, tmp_path / "list.pth", dst, "not a state_dict", "got list")
    (tmp_path / "garbage.pth").write_bytes(b"not weights at all")
    assert_fails(capsys, tmp_path / "garbage.pth", dst, "not a weights file: neither an MXNet NDArray list nor a "
                 "PyTorch file (zip archive or pickle); it starts with 'not weights at a'")
    assert_fails(capsys, tmp_path / "absent.pth", dst, "file not found")

    state = fake_state("resnet38")
    missing = {k: v for k, v in state.items() if k != "b3.conv_branch2a.weight"}
    torch.save(missing, tmp_path / "missing.pth")
    assert_fails(capsys, tmp_path / "missing.pth", dst, "missing keys: b3.conv_branch2a.weight")
    torch.save(dict(state, **{"b3.bn_branch2c.weight": torch.zeros(256)}), tmp_path / "extra.pth")
    assert_fails(capsys, tmp_path / "extra.pth", dst, "unexpected keys: b3.bn_branch2c.weight")
    torch.save(dict(state, **{"b4.conv_branch1.weight": torch.zeros(512, 256, 3, 3)}), tmp_path / "shape.pth")
    assert_fails(capsys, tmp_path / "shape.pth", dst, "shape mismatch", "b4.conv_branch1.weight (512, 256, 3, 3)")

    # eps's own files are named as such, not as an unrecognised layout
    from eps.models import build_classifier as build

    torch.save({"state_dict": build("small", 3).state_dict(), "meta": {"backbone": "small"}}, tmp_path / "c.pt")
    assert main(["convert-weights", str(tmp_path / "c.pt"), str(tmp_path / "c.pth")]) == 0
    assert "an eps small classifier file" in capsys.readouterr().out

    # load_weights names the file's layout when it does not fit the model
    torch.save(fake_state("resnet101"), tmp_path / "r101.pth")
    with pytest.raises(EpsError, match=r"^\S+r101.pth: weights do not fit the model \(file holds torchvision ResNet-101\)"):
        load_weights(build_classifier("small", 3), tmp_path / "r101.pth", report=None)
