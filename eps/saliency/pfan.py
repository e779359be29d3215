"""`pfan`: Pyramid Feature Attention Network (Zhao & Wu, CVPR 2019), in PyTorch.

The network of the authors' Keras code, layer for layer, so their released weights (a
Keras ``.h5``) load and give their maps:

- VGG16 (13 convs, torchvision indices in ``features``); dropout 0.3 after every pool and
  after block 5 in training, as the authors train it.
- Low level: conv1_2 and conv2_2 each through a 3x3 conv (64) + BN + ReLU.
- Context-aware pyramid feature extraction (CPFE) on conv3_3, conv4_3, conv5_3: a 1x1 conv
  and three 3x3 convs dilated 3, 5, 7 (32 channels each, no bias), concatenated, BN + ReLU;
  conv4 / conv5 upsampled to conv3's size, concatenated (384 channels).
- Channel-wise attention on the 384 channels (global average pool, dense 96 + ReLU, dense
  384 + sigmoid), then a 1x1 conv (64) + BN + ReLU, upsampled x4 to image size.
- Spatial attention from those high-level features (two branches, 1x9 then 9x1 and 9x1
  then 1x9 convs, each conv followed by BN + ReLU, summed, sigmoid) weights the low-level
  features (conv2 upsampled x2, concatenated with conv1, 3x3 conv 64 + BN + ReLU).
- Output: a 3x3 conv (1) over [low, high]: saliency logits at image size.

Upsampling is bilinear with aligned corners (the authors' layer). Their BatchNorm always
normalises with the statistics of the current batch, also at prediction time (their
``BatchNorm`` layer forces ``training=True``); ``KerasBatchNorm`` does the same, so a map is
computed from the image alone (batch of one), exactly as their prediction code does.

Weights: the authors' Keras file (``save_weights`` layout, or a full ``model.save`` file
with the weights under ``model_weights``), read with h5py through the name table
``KERAS_LAYERS``; or an eps file written by ``eps train-saliency``.
"""

from __future__ import annotations

import re
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from eps.data.io import atomic_path
from eps.errors import EpsError, file_error
from eps.saliency import check_rgb, to_uint8

INPUT_SIZE = 256  # the authors' target_size
# Subtracted from R, G, B in this order: the authors' data code reverses OpenCV's BGR to RGB
# and then subtracts the Keras (BGR) VGG mean per channel index, and so does their inference.
INPUT_MEAN = (103.939, 116.779, 123.68)
DROPOUT = 0.3
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"

# torchvision indices of the VGG16 convs, with their Keras names
VGG_CONVS = (
    ("block1_conv1", 0), ("block1_conv2", 2),
    ("block2_conv1", 5), ("block2_conv2", 7),
    ("block3_conv1", 10), ("block3_conv2", 12), ("block3_conv3", 14),
    ("block4_conv1", 17), ("block4_conv2", 19), ("block4_conv3", 21),
    ("block5_conv1", 24), ("block5_conv2", 26), ("block5_conv3", 28),
)


VGG16_CHANNELS = (64, 64, "pool", 128, 128, "pool", 256, 256, 256, "pool", 512, 512, 512, "pool", 512, 512, 512, "pool")


def vgg16_features() -> nn.Sequential:
    """VGG16's convolutional part with torchvision's layer indices (no classifier to build)."""
    layers, cin = [], 3
    for width in VGG16_CHANNELS:
        if width == "pool":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(cin, width, 3, padding=1), nn.ReLU(inplace=True)]
            cin = width
    return nn.Sequential(*layers)


def _cfe_layers(block: str, module: str) -> list:
    return [(f"{block}_cfe_cfe0", f"{module}.branch0", "conv"),
            (f"{block}_cfe_cfe1_dilation", f"{module}.branch1", "conv"),
            (f"{block}_cfe_cfe2_dilation", f"{module}.branch2", "conv"),
            (f"{block}_cfe_cfe3_dilation", f"{module}.branch3", "conv"),
            (f"{block}_cfe_BN", f"{module}.bn", "bn")]


# Keras layer name (the authors' model.py / attention.py) -> module of PFAN, and its kind.
# The two Dense layers of the channel attention are unnamed in the authors' code: Keras 2
# calls them dense_1 / dense_2 (tf.keras: dense / dense_1; see `_dense_aliases`).
KERAS_LAYERS = tuple(
    [(name, f"features.{i}", "conv") for name, i in VGG_CONVS]
    + [("C1_conv", "low1.conv", "conv"), ("C1_BN_BN", "low1.bn", "bn"),
       ("C2_conv", "low2.conv", "conv"), ("C2_BN_BN", "low2.bn", "bn")]
    + _cfe_layers("C3", "cfe3") + _cfe_layers("C4", "cfe4") + _cfe_layers("C5", "cfe5")
    + [("dense_1", "channel_attention.fc1", "dense"), ("dense_2", "channel_attention.fc2", "dense"),
       ("C345_conv", "high.conv", "conv"), ("C345_BN", "high.bn", "bn"),
       ("spatial_attention_1_conv1", "spatial_attention.conv1a", "conv"),
       ("attention1_1_BN", "spatial_attention.bn1a", "bn"),
       ("spatial_attention_1_conv2", "spatial_attention.conv1b", "conv"),
       ("attention1_2_BN", "spatial_attention.bn1b", "bn"),
       ("spatial_attention_2_conv1", "spatial_attention.conv2a", "conv"),
       ("attention2_1_BN", "spatial_attention.bn2a", "bn"),
       ("spatial_attention_2_conv2", "spatial_attention.conv2b", "conv"),
       ("attention2_2_BN", "spatial_attention.bn2b", "bn"),
       ("C12_conv", "low.conv", "conv"), ("C12_BN", "low.bn", "bn"),
       ("sa", "score", "conv")]
)
LAYER_KIND = {name: kind for name, _, kind in KERAS_LAYERS}
VGG_LAYER_NAMES = tuple(name for name, _ in VGG_CONVS)

# Keras weight role -> torch parameter name, per kind of layer
ROLES = {
    "conv": (("kernel", "weight"), ("bias", "bias")),
    "dense": (("kernel", "weight"), ("bias", "bias")),
    "bn": (("gamma", "weight"), ("beta", "bias"), ("moving_mean", "running_mean"),
           ("moving_variance", "running_var")),
}


class KerasBatchNorm(nn.BatchNorm2d):
    """BatchNorm that always normalises with the batch's statistics, as the authors' layer.

    The running averages are updated in training only (they never change an output); eps
    and momentum are Keras's defaults (1e-3, 0.99).
    """

    def __init__(self, channels: int):
        super().__init__(channels, eps=1e-3, momentum=0.01)

    def forward(self, x):
        track = self.training
        return F.batch_norm(x, self.running_mean if track else None, self.running_var if track else None,
                            self.weight, self.bias, True, self.momentum, self.eps)


class ConvBNReLU(nn.Module):
    def __init__(self, cin: int, cout: int, kernel=3, padding=1, bias=True):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, padding=padding, bias=bias)
        self.bn = KerasBatchNorm(cout)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class CFE(nn.Module):
    """Context-aware feature extraction: 1x1 and 3x3 dilated 3/5/7 convs, concatenated."""

    def __init__(self, cin: int, width: int = 32):
        super().__init__()
        self.branch0 = nn.Conv2d(cin, width, 1, bias=False)
        self.branch1 = nn.Conv2d(cin, width, 3, padding=3, dilation=3, bias=False)
        self.branch2 = nn.Conv2d(cin, width, 3, padding=5, dilation=5, bias=False)
        self.branch3 = nn.Conv2d(cin, width, 3, padding=7, dilation=7, bias=False)
        self.bn = KerasBatchNorm(4 * width)

    def forward(self, x):
        x = torch.cat([self.branch0(x), self.branch1(x), self.branch2(x), self.branch3(x)], 1)
        return F.relu(self.bn(x))


class ChannelAttention(nn.Module):
    """Squeeze (global average) -> dense C/4 + ReLU -> dense C + sigmoid -> per-channel weights."""

    def __init__(self, channels: int):
        super().__init__()
        self.fc1 = nn.Linear(channels, channels // 4)
        self.fc2 = nn.Linear(channels // 4, channels)

    def forward(self, x):
        weights = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3))))))
        return x * weights[:, :, None, None], weights


class SpatialAttention(nn.Module):
    """Two separable 9-wide branches (1x9 -> 9x1, 9x1 -> 1x9), each conv + BN + ReLU, summed, sigmoid."""

    def __init__(self, channels: int, k: int = 9):
        super().__init__()
        half, p = channels // 2, k // 2
        self.conv1a = nn.Conv2d(channels, half, (1, k), padding=(0, p))
        self.bn1a = KerasBatchNorm(half)
        self.conv1b = nn.Conv2d(half, 1, (k, 1), padding=(p, 0))
        self.bn1b = KerasBatchNorm(1)
        self.conv2a = nn.Conv2d(channels, half, (k, 1), padding=(p, 0))
        self.bn2a = KerasBatchNorm(half)
        self.conv2b = nn.Conv2d(half, 1, (1, k), padding=(0, p))
        self.bn2b = KerasBatchNorm(1)

    def forward(self, x):
        a = F.relu(self.bn1b(self.conv1b(F.relu(self.bn1a(self.conv1a(x))))))
        b = F.relu(self.bn2b(self.conv2b(F.relu(self.bn2a(self.conv2a(x))))))
        return torch.sigmoid(a + b)


def _up(x, like):
    return F.interpolate(x, size=like.shape[2:], mode="bilinear", align_corners=True)


class PFAN(nn.Module):
    """PFAN with CPFE, channel-wise and spatial attention; ``forward`` gives logits at input size.

    Input: RGB minus ``INPUT_MEAN`` (0..255 scale), N x 3 x H x W with H, W multiples of 16.
    ``forward(x, with_attention=True)`` also returns the channel-attention weights (their
    mean is the authors' activity regulariser, added to the training loss).
    """

    def __init__(self):
        super().__init__()
        self.features = vgg16_features()
        self.drop = nn.Dropout(DROPOUT)
        self.low1 = ConvBNReLU(64, 64)
        self.low2 = ConvBNReLU(128, 64)
        self.cfe3 = CFE(256)
        self.cfe4 = CFE(512)
        self.cfe5 = CFE(512)
        self.channel_attention = ChannelAttention(384)
        self.high = ConvBNReLU(384, 64, kernel=1, padding=0)
        self.spatial_attention = SpatialAttention(64)
        self.low = ConvBNReLU(128, 64)
        self.score = nn.Conv2d(128, 1, 3, padding=1)
        for m in self.modules():  # Keras's defaults: Glorot-uniform kernels, zero biases
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x, with_attention: bool = False):
        f = self.features
        c1 = f[0:4](x)
        c2 = f[5:9](self.drop(f[4](c1)))
        c3 = f[10:16](self.drop(f[9](c2)))
        c4 = f[17:23](self.drop(f[16](c3)))
        c5 = self.drop(f[24:30](self.drop(f[23](c4))))
        h3 = self.cfe3(c3)
        high = torch.cat([h3, _up(self.cfe4(c4), h3), _up(self.cfe5(c5), h3)], 1)
        high, attention = self.channel_attention(high)
        high = _up(self.high(high), c1)
        low = torch.cat([self.low1(c1), _up(self.low2(c2), c1)], 1)
        low = self.low(low) * self.spatial_attention(high)
        logits = self.score(torch.cat([low, high], 1))
        return (logits, attention) if with_attention else logits


# ------------------------------------------------------------------------ Keras .h5 files

def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _weights_root(f: h5py.File):
    """The group holding the layers: the file root (save_weights) or model_weights (model.save)."""
    return f["model_weights"] if "model_weights" in f else f


def read_keras_h5(path) -> dict:
    """{layer: {role ('kernel', 'gamma', ...): array}} of a Keras weights file (weightless layers left out)."""
    path = Path(path)
    if not path.is_file():
        raise file_error(path, "weights file not found")
    with open(path, "rb") as fh:
        if fh.read(8) != HDF5_SIGNATURE:
            raise file_error(path, "not a Keras .h5 file (not HDF5)")
    layers: dict = {}
    try:
        with h5py.File(path, "r") as f:
            root = _weights_root(f)
            if "layer_names" not in root.attrs:
                raise file_error(path, "not a Keras .h5 weights file (no 'layer_names' attribute)")
            for layer in (_text(n) for n in root.attrs["layer_names"]):
                if layer not in root:
                    raise file_error(path, f"layer {layer!r} is listed in layer_names but has no group")
                group = root[layer]
                tensors = {}
                for name in (_text(n) for n in group.attrs.get("weight_names", [])):
                    role = name.rsplit("/", 1)[-1].split(":")[0]
                    if name not in group:
                        raise file_error(path, f"tensor {layer}/{name} is listed in weight_names but missing")
                    tensors[role] = np.asarray(group[name], dtype=np.float32)
                if tensors:
                    layers[layer] = tensors
    except OSError as exc:
        raise file_error(path, f"not a readable Keras .h5 file ({' '.join(str(exc).split())})") from None
    return layers


def _dense_aliases(names) -> dict:
    """Map the file's two Dense layer names onto dense_1 / dense_2 (tf.keras names them dense / dense_1)."""
    if "dense_1" in names and "dense_2" in names:
        return {}
    dense = [n for n in names if re.fullmatch(r"dense(_\d+)?", n)]
    return dict(zip(dense, ("dense_1", "dense_2"))) if len(dense) == 2 else {}


def _to_torch(kind: str, role: str, array: np.ndarray) -> torch.Tensor:
    if role == "kernel":
        array = array.transpose(3, 2, 0, 1) if kind == "conv" else array.T  # HWIO -> OIHW; (in, out) -> (out, in)
    return torch.from_numpy(np.ascontiguousarray(array))


def _to_keras(kind: str, role: str, tensor: torch.Tensor) -> np.ndarray:
    array = tensor.detach().cpu().float().numpy()
    if role == "kernel":
        array = array.transpose(2, 3, 1, 0) if kind == "conv" else array.T
    return np.ascontiguousarray(array)


def _keras_entries(model: PFAN):
    """(Keras layer, role, torch state name, kind) for every tensor of the table."""
    own = model.state_dict()
    for layer, module, kind in KERAS_LAYERS:
        for role, param in ROLES[kind]:
            name = f"{module}.{param}"
            if name in own:
                yield layer, role, name, kind


def keras_state(path, model: PFAN, layers=None, only=None) -> dict:
    """The torch state of a Keras file's layers, checked against `model`'s names and shapes.

    `only`: take just these Keras layers (the file's other layers are ignored); None: the
    whole table, and a weighted layer of the file that is not in it is an error.
    """
    layers = read_keras_h5(path) if layers is None else layers
    aliases = _dense_aliases(layers)
    layers = {aliases.get(k, k): v for k, v in layers.items()}
    wanted = set(LAYER_KIND) if only is None else set(only)
    unexpected = sorted(set(layers) - set(LAYER_KIND))
    if unexpected and only is None:
        role = next(iter(layers[unexpected[0]]))
        raise file_error(path, f"unexpected tensor {unexpected[0]}/{role}:0 (no such layer in PFAN)")
    own = model.state_dict()
    state = {}
    for layer, role, name, kind in _keras_entries(model):
        if layer not in wanted:
            continue
        array = layers.get(layer, {}).get(role)
        if array is None:
            raise file_error(path, f"missing tensor {layer}/{role}:0")
        expected = _to_keras(kind, role, own[name]).shape
        if array.shape != expected:
            raise file_error(path, f"tensor {layer}/{role}:0 has shape {tuple(array.shape)}, expected {tuple(expected)}")
        state[name] = _to_torch(kind, role, array)
    for layer in sorted(set(layers) & wanted):
        extra = sorted(set(layers[layer]) - {role for role, _ in ROLES[LAYER_KIND[layer]]})
        if extra:
            raise file_error(path, f"unexpected tensor {layer}/{extra[0]}:0")
    return state


def save_keras_h5(model: PFAN, path) -> Path:
    """Write `model`'s weights in the authors' Keras ``save_weights`` layout (atomic)."""
    entries = list(_keras_entries(model))
    own = model.state_dict()
    order = list(dict.fromkeys(layer for layer, _, _, _ in entries))
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.attrs["layer_names"] = np.array([n.encode() for n in order])
            f.attrs["backend"] = b"tensorflow"
            f.attrs["keras_version"] = b"2.2.4"
            for layer in order:
                group = f.create_group(layer)
                names = []
                for lay, role, name, kind in entries:
                    if lay == layer:
                        names.append(f"{layer}/{role}:0")
                        group.create_dataset(names[-1], data=_to_keras(kind, role, own[name]))
                group.attrs["weight_names"] = np.array([n.encode() for n in names])
    return Path(path)


def is_hdf5(path) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(8) == HDF5_SIGNATURE
    except OSError:
        return False


def load_weights(model: PFAN, path) -> PFAN:
    """Load the authors' Keras .h5 or an eps .pt (``eps train-saliency``) into `model`."""
    path = Path(path)
    if not path.is_file():
        raise file_error(path, "weights file not found")
    if is_hdf5(path):
        state = keras_state(path, model)
    else:
        from eps.saliency.network_file import check_fit, read_model_file

        state, ours = read_model_file(path, "pfan")
        if not ours:
            raise file_error(path, "not a PFAN weights file (expected the authors' Keras .h5, or a .pt "
                             "written by eps train-saliency)")
        state = check_fit(path, state, model, "PFAN")
    own = model.state_dict()
    state = {**{k: v for k, v in own.items() if k.endswith("num_batches_tracked")}, **state}
    model.load_state_dict(state, strict=True)
    return model


# ------------------------------------------------------------------------------- predictor

def pad_square(rgb: np.ndarray, value=0) -> tuple[np.ndarray, tuple[int, int]]:
    """Centre `rgb` in a square of side max(H, W) filled with `value`; returns it and the offsets."""
    h, w = rgb.shape[:2]
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    out = np.full((side, side) + rgb.shape[2:], value, rgb.dtype)
    out[top:top + h, left:left + w] = rgb
    return out, (top, left)


def preprocess(rgb: np.ndarray, size: int = INPUT_SIZE) -> torch.Tensor:
    """The authors' inference input: zero-padded to a square, resized (bilinear), minus the mean."""
    square, _ = pad_square(rgb)
    resized = np.asarray(Image.fromarray(square).resize((size, size), Image.BILINEAR), np.float32)
    x = resized - np.asarray(INPUT_MEAN, np.float32)
    return torch.from_numpy(x.transpose(2, 0, 1).copy())[None]


def predictor(model: PFAN, device="cpu"):
    """`rgb uint8 H x W x 3 -> uint8 H x W` as the authors' inference: square, 256 x 256, sigmoid, back."""
    device = torch.device(device)
    model = model.to(device).eval()

    @torch.no_grad()
    def predict(rgb: np.ndarray) -> np.ndarray:
        rgb = check_rgb(np.asarray(rgb), "pfan")
        h, w = rgb.shape[:2]
        side = max(h, w)
        prob = torch.sigmoid(model(preprocess(rgb).to(device)))
        prob = F.interpolate(prob, size=(side, side), mode="bilinear", align_corners=False)[0, 0]
        top, left = (side - h) // 2, (side - w) // 2
        prob = prob[top:top + h, left:left + w].cpu().numpy()
        return to_uint8(prob)

    return predict


def load_predictor(weights, device="cpu"):
    """The predictor of a weights file: the authors' Keras .h5 or an eps .pt (``eps train-saliency``)."""
    if weights is None:
        raise EpsError("pfan needs --weights FILE (the authors' Keras .h5, or a .pt written by eps train-saliency)")
    return predictor(load_weights(PFAN(), weights), device)
