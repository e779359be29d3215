"""Models: official ResNet-38 names, output stride, frozen BN, parameter groups, weights."""

from pathlib import Path

import pytest
import torch

from eps.errors import EpsError
from eps.losses import classification_loss
from eps.models import build_classifier, load_weights

SHARED = Path(__file__).resolve().parents[2] / "shared"
GOLDEN_KEYS = SHARED / "golden" / "resnet38_eps_state_dict_keys.txt"

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def resnet38():
    torch.manual_seed(0)
    return build_classifier("resnet38", 20, background=True)


def small(num_classes=3, background=True, seed=0):
    torch.manual_seed(seed)
    return build_classifier("small", num_classes, background)


def test_resnet38_state_dict_matches_official_names_and_shapes(resnet38):
    if not GOLDEN_KEYS.is_file():
        pytest.skip("../shared not found: golden files (resnet38_eps_state_dict_keys.txt) absent")
    expected = []
    for line in GOLDEN_KEYS.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, shape = line.split("\t")
            expected.append((name, shape))
    got = [(k, "x".join(map(str, v.shape)) or "scalar") for k, v in resnet38.state_dict().items()]
    assert got == expected


def test_resnet38_output_stride_and_frozen_bn(resnet38):
    model = resnet38.train()
    assert model.output_stride == 8
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(not m.training for m in bns)
    assert all(not m.weight.requires_grad and not m.bias.requires_grad for m in bns)
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    logits, cam = model(torch.randn(1, 3, 32, 32))
    assert cam.shape == (1, 21, 4, 4) and logits.shape == (1, 21)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # the early stages stay at their pretrained values; later convs and the head train
    assert not model.conv1a.weight.requires_grad
    assert not any(p.requires_grad for p in model.b2_2.parameters())
    assert model.b3.conv_branch2a.weight.requires_grad and model.fc8.weight.requires_grad


def test_resnet38_parameter_groups(resnet38):
    groups = resnet38.get_parameter_groups()
    assert len(groups[0]) == 35 and len(groups[1]) == 0  # convs of b3..b7, no biases
    assert groups[2] == [resnet38.fc8.weight] and groups[3] == []


@pytest.mark.parametrize("background", [True, False])
def test_small_output_stride_and_shapes(background):
    model = small(num_classes=4, background=background)
    assert model.output_stride == 8 and model.num_classes == 4
    assert model.background is background
    logits, cam = model(torch.randn(2, 3, 96, 64))
    k = 5 if background else 4
    assert cam.shape == (2, k, 12, 8) and logits.shape == (2, k)
    assert torch.allclose(logits, cam.mean(dim=(2, 3)), atol=1e-6)
    assert model.forward_cam(torch.zeros(1, 3, 16, 16)).shape == (1, k, 2, 2)


def test_small_parameter_groups_partition_trainable_parameters():
    model = small()
    groups = model.get_parameter_groups()
    ids = [id(p) for g in groups for p in g]
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert len(ids) == len(set(ids)) and set(ids) == trainable
    norms = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert any(p is norms[0].weight for p in groups[0])
    assert any(p is norms[0].bias for p in groups[1])
    assert groups[2] == [model.fc8.weight]


def test_small_is_deterministic_for_a_seed():
    x = torch.rand(2, 3, 32, 32)
    a, b = small(seed=3), small(seed=3)
    assert torch.equal(a(x)[1], b(x)[1])
    assert not torch.equal(a(x)[1], small(seed=4)(x)[1])


def test_sgd_steps_reduce_classification_loss():
    model = small(num_classes=2).train()
    torch.manual_seed(1)
    x = torch.rand(4, 3, 32, 32) * 0.2
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    for i in range(4):  # class c shows as a bright square in colour channel c
        for c in range(2):
            if labels[i, c]:
                x[i, c, 8:24, 8:24] += 0.8
    groups = model.get_parameter_groups()
    opt = torch.optim.SGD([{"params": g, "lr": lr} for g, lr in zip(groups, (0.05, 0.1, 0.5, 1.0))],
                          momentum=0.9)
    first = classification_loss(model(x)[0], labels).item()
    for _ in range(15):
        loss = classification_loss(model(x)[0], labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert classification_loss(model(x)[0], labels).item() < 0.7 * first


def test_unknown_backbone_names_allowed_values():
    with pytest.raises(EpsError, match="resnet38.*small|small.*resnet38"):
        build_classifier("vgg16", 20)


def test_load_weights_round_trip_plain_and_checkpoint(tmp_path):
    src, dst = small(seed=1), small(seed=2)
    x = torch.rand(1, 3, 32, 32)
    torch.save(src.state_dict(), tmp_path / "plain.pt")
    load_weights(dst.eval(), tmp_path / "plain.pt")
    assert torch.equal(src.eval()(x)[1], dst(x)[1])
    other = small(seed=5)
    torch.save({"model": src.state_dict(), "iteration": 7}, tmp_path / "ckpt.pt")
    load_weights(other, tmp_path / "ckpt.pt")
    assert torch.equal(other.fc8.weight, src.fc8.weight)


def _error(model, path):
    with pytest.raises(EpsError) as info:
        load_weights(model, path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    return message


def test_load_weights_errors(tmp_path):
    model = small()
    state = model.state_dict()
    before = model.fc8.weight.clone()

    missing = dict(state)
    del missing["fc8.weight"]
    torch.save(missing, tmp_path / "missing.pt")
    assert "missing keys: fc8.weight" in _error(model, tmp_path / "missing.pt")

    extra = dict(state, **{f"extra{i}.weight": torch.zeros(1) for i in range(7)})
    torch.save(extra, tmp_path / "extra.pt")
    message = _error(model, tmp_path / "extra.pt")
    assert "unexpected keys: extra0.weight" in message and "(+2 more)" in message

    wrong = dict(state, **{"fc8.weight": torch.zeros(9, 128, 1, 1)})
    torch.save(wrong, tmp_path / "shape.pt")
    assert "shape mismatch" in _error(model, tmp_path / "shape.pt")

    torch.save({"epoch": 3}, tmp_path / "notsd.pt")
    assert "not a state_dict" in _error(model, tmp_path / "notsd.pt")

    (tmp_path / "garbage.pt").write_bytes(b"this is not a torch file")
    assert "not a weights file" in _error(model, tmp_path / "garbage.pt")
    assert "cannot load" in _error(model, tmp_path / "absent.pt")

    assert torch.equal(model.fc8.weight, before)  # a failed load changes nothing
