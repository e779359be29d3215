"""EfficientNet-Lite0: the published network with its ImageNet weights, dilated for CAMs and DeepLab."""

from pathlib import Path

import numpy as np
import pytest
import torch

from eps.errors import EpsError
from eps.models import build_classifier, build_segmenter
from eps.models.efficientnet import EfficientNetLite0, Lite0Backbone, imagenet_weights_path, load_lite0

PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "data" / "voc12_photos"
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def imagenet_lite0():
    return load_lite0(EfficientNetLite0(output_stride=32), with_fc=True).eval()


def test_logits_equal_the_published_architecture(imagenet_lite0):
    published = pytest.importorskip("efficientnet_lite_pytorch", reason="test extra efficientnet-lite-pytorch absent")
    ref = published.EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(imagenet_weights_path()))
    ref.eval()
    torch.manual_seed(0)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected, got = ref(x), imagenet_lite0.classify(x)
    assert expected.shape == got.shape == (2, 1000)
    assert torch.allclose(got, expected, atol=1e-4, rtol=0)


DOGS = range(151, 269)   # ImageNet-1k classes 151-268: dog breeds
CATS = range(281, 286)   # 281-285: domestic cats


def _imagenet_crop(path) -> torch.Tensor:
    """The usual ImageNet evaluation input: short side 256 (bilinear), centre 224, mean / std."""
    from PIL import Image

    image = Image.open(path).convert("RGB")
    w, h = image.size
    s = 256 / min(w, h)
    image = image.resize((max(256, round(w * s)), max(256, round(h * s))), Image.BILINEAR)
    w, h = image.size
    left, top = (w - 224) // 2, (h - 224) // 2
    x = np.asarray(image.crop((left, top, left + 224, top + 224)), np.float32) / 255.0
    x = (x - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
    return torch.from_numpy(x.transpose(2, 0, 1).astype(np.float32))


@pytest.mark.slow  # 437 photos through the network: about a minute
def test_imagenet_top5_finds_the_cats_and_dogs_of_real_voc_photos(imagenet_lite0):
    if not PHOTOS.is_dir():
        pytest.skip("../shared/data/voc12_photos not found (real VOC photos)")
    labels = np.load(PHOTOS / "cls_labels.npy", allow_pickle=True).item()
    cat, dog = 7, 11  # 0-based VOC class indices
    ids = [i for i in (PHOTOS / "ImageSets/Segmentation/train.txt").read_text().split()
           if labels[i].sum() == 1 and (labels[i][cat] or labels[i][dog])]
    assert len(ids) == 437
    hits = top1 = 0
    for start in range(0, len(ids), 32):
        batch = ids[start:start + 32]
        x = torch.stack([_imagenet_crop(PHOTOS / "JPEGImages" / f"{i}.jpg") for i in batch])
        with torch.no_grad():
            top5 = imagenet_lite0.classify(x).topk(5, dim=1).indices
        for image_id, classes in zip(batch, top5.tolist()):
            wanted = DOGS if labels[image_id][dog] else CATS
            hits += any(c in wanted for c in classes)
            top1 += classes[0] in wanted
    assert hits / len(ids) >= 0.85, (hits, top1, len(ids))
    assert top1 / len(ids) >= 0.6, (hits, top1, len(ids))


@pytest.mark.parametrize("stride", [8, 16])
def test_dilated_backbone_keeps_the_weights_and_gives_dense_maps(stride, imagenet_lite0):
    backbone = load_lite0(Lite0Backbone(output_stride=stride))
    assert not any(k.startswith("_fc.") for k in backbone.state_dict())
    reference = imagenet_lite0.state_dict()
    for k, v in backbone.state_dict().items():
        assert torch.equal(v, reference[k]), k
    backbone.train()
    with torch.no_grad():
        features = backbone(torch.randn(2, 3, 64, 96))
    assert features.shape == (2, 1280, 64 // stride, 96 // stride)
    # frozen: BatchNorm statistics did not move in train mode; BN, stem and stride-4 stages not trained
    for k, v in backbone.state_dict().items():
        assert torch.equal(v, reference[k]), k
    trainable = {n for n, p in backbone.named_parameters() if p.requires_grad}
    assert "_blocks.3._expand_conv.weight" in trainable and "_conv_head.weight" in trainable
    assert not any(n.startswith(("_conv_stem", "_blocks.0.", "_blocks.2.")) for n in trainable)
    assert not any("_bn" in n for n in trainable)


def test_classifier_on_lite0_has_the_usual_heads_and_groups():
    model = build_classifier("efficientnet_lite0", 8, background=True)
    assert model.output_stride == 16 and model.fc8.out_channels == 9
    logits, cam = model(torch.randn(1, 3, 64, 64))
    assert logits.shape == (1, 9) and cam.shape == (1, 9, 4, 4)
    groups = model.get_parameter_groups()
    assert [len(g) for g in groups[2:]] == [1, 0]  # the head: fc8 weight, no bias
    assert len(groups[0]) > 10 and not groups[1]  # Lite0 convs have no bias; BN is frozen
    cam_model = build_classifier("efficientnet_lite0", 8, background=False)
    assert cam_model.fc8.out_channels == 8


def test_lite0_weights_of_another_network_are_refused(tmp_path):
    wrong = tmp_path / "w.pth"
    torch.save({"conv.weight": torch.zeros(3, 3, 1, 1)}, wrong)
    with pytest.raises(EpsError, match="w.pth: not EfficientNet-Lite0 weights: missing keys"):
        load_lite0(Lite0Backbone(), wrong)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(EpsError, match="junk.pth: not a PyTorch weights file"):
        load_lite0(Lite0Backbone(), junk)


@pytest.mark.parametrize("name", ["deeplab_v1_efficientnet_lite0", "deeplab_v2_efficientnet_lite0"])
def test_segmenters_on_lite0(name):
    model = build_segmenter(name, 9)
    load_lite0(model.backbone)
    model.eval()
    with torch.no_grad():
        logits = model(torch.randn(1, 3, 96, 64))
    assert logits.shape == (1, 9, 6, 4)
    groups = model.get_parameter_groups()
    assert groups[2] and groups[3]  # the head's weights and biases (10x / 20x lr)


def test_a_segmenter_starts_from_an_eps_lite0_classifier_file(tmp_path):
    classifier = build_classifier("efficientnet_lite0", 8, background=True)
    with torch.no_grad():
        classifier._conv_head.weight.add_(1.0)  # not the ImageNet values: the file's own must arrive
    path = tmp_path / "classifier.pt"
    torch.save({"state_dict": classifier.state_dict(), "meta": {"backbone": "efficientnet_lite0"}}, path)
    segmenter = build_segmenter("deeplab_v2_efficientnet_lite0", 9)
    load_lite0(segmenter.backbone, path)
    assert torch.equal(segmenter.backbone._conv_head.weight, classifier._conv_head.weight)
    # the same state_dict without the meta of an eps Lite0 classifier: its fc8 is a foreign key
    torch.save({"state_dict": classifier.state_dict(), "meta": {"backbone": "small"}}, path)
    with pytest.raises(EpsError, match="unexpected keys: fc8.weight"):
        load_lite0(Lite0Backbone(output_stride=16), path)


@pytest.mark.parametrize("background", [True, False])
def test_a_segmenter_from_a_classifier_starts_with_its_cams(tmp_path, background):
    from eps.segment import head_from_classifier

    torch.manual_seed(0)
    classifier = build_classifier("efficientnet_lite0", 8, background=background).eval()
    path = tmp_path / "classifier.pt"
    torch.save({"state_dict": classifier.state_dict(), "meta": {"backbone": "efficientnet_lite0"}}, path)
    segmenter = build_segmenter("deeplab_v2_efficientnet_lite0", 9)
    load_lite0(segmenter.backbone, path)
    assert "CAM head" in head_from_classifier(segmenter, path)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        cam, logits = classifier.forward_cam(x), segmenter.eval()(x)
    if background:  # background last in the classifier, class 0 in the segmenter
        torch.testing.assert_close(logits[:, 0], cam[:, -1], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(logits[:, 1:], cam[:, :-1], rtol=1e-4, atol=1e-4)
    else:
        assert torch.count_nonzero(logits[:, 0]) == 0
        torch.testing.assert_close(logits[:, 1:], cam, rtol=1e-4, atol=1e-4)
    v1 = build_segmenter("deeplab_v1_efficientnet_lite0", 9)
    assert "random start" in head_from_classifier(v1, path)


def _random_bn_statistics(model: torch.nn.Module) -> None:
    """BN layers whose folding would show: statistics and affine parameters far from 0 / 1."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.1)
            m.weight.data.copy_(torch.randn(n, generator=g))
            m.bias.data.copy_(torch.randn(n, generator=g))


def test_folded_batchnorm_gives_the_same_classifier_and_segmenter_maps(tmp_path):
    from eps.models.classifier import load_classifier
    from eps.models.deeplab import load_segmenter

    torch.manual_seed(0)
    classifier = build_classifier("efficientnet_lite0", 8, background=True)
    _random_bn_statistics(classifier)
    segmenter = build_segmenter("deeplab_v2_efficientnet_lite0", 9)
    _random_bn_statistics(segmenter)
    torch.save({"state_dict": classifier.state_dict(),
                "meta": {"backbone": "efficientnet_lite0", "num_classes": 8, "background": True}},
               tmp_path / "classifier.pt")
    torch.save({"state_dict": segmenter.state_dict(),
                "meta": {"model": "deeplab_v2_efficientnet_lite0", "num_classes": 9}}, tmp_path / "model.pt")
    x = torch.randn(2, 3, 75, 101)  # odd sizes: the stride-2 convolutions pad unevenly
    with torch.no_grad():
        expected_cam, expected_logits = classifier.eval().forward_cam(x), segmenter.eval()(x)
        folded_classifier, _ = load_classifier(tmp_path / "classifier.pt")
        folded_segmenter, _ = load_segmenter(tmp_path / "model.pt")
        cam, logits = folded_classifier.forward_cam(x), folded_segmenter(x)
    for model in (folded_classifier, folded_segmenter):
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded_classifier._backbone._net.modules())
    scale = expected_cam.abs().max()
    torch.testing.assert_close(cam, expected_cam, rtol=1e-4, atol=1e-4 * float(scale))
    torch.testing.assert_close(logits, expected_logits, rtol=1e-4, atol=1e-4 * float(expected_logits.abs().max()))
    with torch.no_grad():  # folding again changes nothing
        from eps.models.efficientnet import fold_batchnorm
        assert torch.equal(fold_batchnorm(folded_classifier).forward_cam(x), cam)


@pytest.mark.parametrize("size", [(32, 32), (33, 47)])
@pytest.mark.parametrize("stride,dilation", [(1, 1), (2, 1), (1, 2)])
def test_same_padding_equals_explicit_tensorflow_padding(size, stride, dilation):
    import math

    import torch.nn.functional as F

    from eps.models.efficientnet import SameConv2d

    torch.manual_seed(0)
    conv = SameConv2d(4, 6, 5, stride, dilation=dilation)
    x = torch.randn(1, 4, *size)
    pads = []
    for n in size:  # TensorFlow's SAME: output ceil(n / stride), the odd pixel of padding at the end
        total = max((math.ceil(n / stride) - 1) * stride + 4 * dilation + 1 - n, 0)
        pads.append((total // 2, total - total // 2))
    padded = F.pad(x, (*pads[1], *pads[0]))
    expected = F.conv2d(padded, conv.weight, None, stride, 0, dilation)
    got = conv(x)
    assert got.shape[-2:] == tuple(math.ceil(n / stride) for n in size)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_bf16_relu6_in_inference_clamps_the_bits_and_equals_relu6(monkeypatch):
    from eps.models import efficientnet

    values = torch.tensor([-1e30, -7.0, -6.0, -1.0, -1e-40, -0.0, 0.0, 1e-40, 0.5, 5.96875, 6.0, 6.03125, 7.0, 1e30,
                           float("inf"), float("-inf")])
    x = torch.cat([values, torch.randn(4000) * 4]).to(torch.bfloat16)
    expected = torch.nn.functional.relu6(x.clone())

    def refused(*args, **kwargs):
        raise AssertionError("inference on bfloat16 must not call F.relu6")

    monkeypatch.setattr(efficientnet.F, "relu6", refused)
    with torch.inference_mode():
        got = efficientnet.relu6_(x.clone())
        nan = efficientnet.relu6_(torch.tensor([float("nan"), -float("nan")], dtype=torch.bfloat16))
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, expected) and not torch.signbit(got).any()  # -0 comes out as +0
    assert set(nan.tolist()) <= {0.0, 6.0}  # the one difference from ReLU6, documented


def test_relu6_with_grad_enabled_is_relu6_and_keeps_its_gradient():
    from eps.models.efficientnet import relu6_

    x = torch.tensor([-1.0, 0.5, 3.0, 7.0, float("nan")], requires_grad=True)
    y = relu6_(x.to(torch.bfloat16) * 1)
    assert torch.isnan(y[-1])  # F.relu6 itself: NaN stays NaN in training
    y[:-1].float().sum().backward()
    assert x.grad.tolist()[:4] == [0.0, 1.0, 1.0, 0.0]


def test_depthwise_convolutions_train_in_float32_under_cpu_autocast():
    """bfloat16 training: the 1x1 convolutions run in bfloat16, the depthwise ones in float32
    (oneDNN's bfloat16 depthwise backward is the slower one); inference keeps both in bfloat16."""
    from eps.models.efficientnet import SameConv2d

    torch.manual_seed(0)
    depthwise, pointwise = SameConv2d(8, 8, 5, groups=8, dilation=2), SameConv2d(8, 16, 1)
    frozen = SameConv2d(8, 8, 3, groups=8).requires_grad_(False)
    x = torch.randn(2, 8, 9, 11, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = depthwise(x)
        z = pointwise(y)
        still = frozen(x)  # not trained: no backward to spare, bfloat16 like inference
        with torch.no_grad():
            inferred = depthwise(x)
    assert (y.dtype, z.dtype, still.dtype, inferred.dtype) == (torch.float32, torch.bfloat16, torch.bfloat16,
                                                               torch.bfloat16)
    torch.testing.assert_close(y, depthwise(x), rtol=0, atol=0)  # float32 as without autocast
    y.sum().backward()
    assert x.grad is not None and depthwise.weight.grad.dtype == torch.float32
