"""`dss`: Deeply Supervised Salient object detection with short connections (Hou et al., CVPR 2017).

The network of the common PyTorch port (AceCoooool/DSS-pytorch, ``dssnet.py``), so its
released state_dict loads:

- VGG16 ``features`` (torchvision indices; the port's ``base``), with six side outputs on
  conv1_2, conv2_2, conv3_3, conv4_3, conv5_3 and pool5 followed by a 3x3 average pool.
  Side k (stride 2^k) is two convs + ReLU (width, kernel: 128/3, 128/3, 256/5, 256/5,
  512/5, 512/7) and a 1x1 conv to one score map.
- Short connections: the score of side k is concatenated with the deeper sides' scores
  (sides 0-1 take sides 2-5, sides 2-3 take sides 4-5), each upsampled by a transposed conv
  (kernel 2f, stride f), merged by a 1x1 conv and upsampled to the input size (side 0 is
  at full size already).
- Fusion: a learned weighted sum of the six side maps (the port's "v2"; its "v1" files,
  without fusion weights, are the mean: weights 1/6).

Seven logit maps come out (six sides, fusion). The port's prediction, used here: input
resized to 256 x 256 with ImageNet normalisation, the mean of the sigmoid of side maps
1, 2, 3 and the fusion, resized back bilinearly (aligned corners).
"""

from __future__ import annotations

import re

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from eps.data.imagenet import MEAN, STD
from eps.errors import EpsError, file_error
from eps.saliency import check_rgb, to_uint8
from eps.saliency.pfan import vgg16_features

INPUT_SIZE = 256
# (in channels, width, kernel) of each side output, and its tap in VGG16 `features`
SIDES = ((64, 128, 3), (128, 128, 3), (256, 256, 5), (512, 256, 5), (512, 512, 5), (512, 512, 7))
TAPS = (3, 8, 15, 22, 29)  # ReLU after conv1_2 ... conv5_3; side 5 reads pool5 (+ 3x3 average)
SHORT_CONNECTIONS = ((2, 3, 4, 5), (2, 3, 4, 5), (4, 5), (4, 5), (), ())
PREDICT_MAPS = (1, 2, 3, 6)  # the port's choice at prediction time (6: the fusion)

# The port's state_dict names -> this module's, both ways; {i}, {k}, {j} are integers.
PORT_KEYS = (
    ("base.{i}", "features.{i}"),
    ("feat.{k}.main.0", "sides.{k}.conv1"),
    ("feat.{k}.main.2", "sides.{k}.conv2"),
    ("feat.{k}.main.4", "sides.{k}.score"),
    ("comb.{k}.upconv.{j}", "shorts.{k}.up.{j}"),
    ("comb.{k}.conv", "shorts.{k}.combine"),
    ("comb.{k}.deconv", "shorts.{k}.upsample"),
)
PORT_FUSION, OWN_FUSION = "fuse.weights", "fusion_weights"


def bilinear_kernel(size: int) -> torch.Tensor:
    """The (size x size) kernel with which a stride size/2 transposed conv interpolates bilinearly."""
    factor = (size + 1) // 2
    centre = factor - 1 if size % 2 else factor - 0.5
    ramp = 1 - torch.abs(torch.arange(size, dtype=torch.float32) - centre) / factor
    return ramp[:, None] * ramp[None, :]


def upsampler(factor: int) -> nn.ConvTranspose2d:
    """x`factor` upsampling of a one-channel map (the port's layer), initialised bilinear."""
    layer = nn.ConvTranspose2d(1, 1, 2 * factor, factor, factor // 2)
    with torch.no_grad():
        layer.weight.copy_(bilinear_kernel(2 * factor)[None, None])
        layer.bias.zero_()
    return layer


class SideOutput(nn.Module):
    def __init__(self, cin: int, width: int, kernel: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, kernel, padding=kernel // 2)
        self.conv2 = nn.Conv2d(width, width, kernel, padding=kernel // 2)
        self.score = nn.Conv2d(width, 1, 1)

    def forward(self, x):
        return self.score(F.relu(self.conv2(F.relu(self.conv1(x)))))


class ShortConnection(nn.Module):
    """Side k's score + the deeper sides' scores brought to its size, merged, upsampled to the input."""

    def __init__(self, k: int, deeper):
        super().__init__()
        self.up = nn.ModuleList(upsampler(2 ** (j - k)) for j in deeper)
        self.combine = nn.Conv2d(len(deeper) + 1, 1, 1)
        self.upsample = upsampler(2 ** k) if k else None

    def forward(self, score, deeper):
        merged = self.combine(torch.cat([score] + [up(d) for up, d in zip(self.up, deeper)], 1))
        return self.upsample(merged) if self.upsample is not None else merged


class DSS(nn.Module):
    """``forward(x)`` -> 7 logit maps at input size (6 sides, fusion); x: ImageNet-normalised
    RGB, N x 3 x H x W with H, W multiples of 32."""

    def __init__(self):
        super().__init__()
        self.features = vgg16_features()
        self.pool5a = nn.AvgPool2d(3, 1, 1)
        self.sides = nn.ModuleList(SideOutput(*spec) for spec in SIDES)
        self.shorts = nn.ModuleList(ShortConnection(k, deeper) for k, deeper in enumerate(SHORT_CONNECTIONS))
        self.fusion_weights = nn.Parameter(torch.full((len(SIDES),), 1.0 / len(SIDES)))
        for m in self.features:  # torchvision's initialisation of VGG16
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
        for side in self.sides:  # the paper's initialisation of the new layers
            for conv in (side.conv1, side.conv2, side.score):
                nn.init.normal_(conv.weight, 0.0, 0.01)
                nn.init.zeros_(conv.bias)
        for short in self.shorts:
            nn.init.normal_(short.combine.weight, 0.0, 0.01)
            nn.init.zeros_(short.combine.bias)

    def forward(self, x):
        taps = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in TAPS:
                taps.append(x)
        taps.append(self.pool5a(x))
        scores = [side(t) for side, t in zip(self.sides, taps)]
        maps = [short(scores[k], [scores[j] for j in SHORT_CONNECTIONS[k]])
                for k, short in enumerate(self.shorts)]
        fused = sum(w * m for w, m in zip(self.fusion_weights, maps))
        return maps + [fused]

    def upsampling_layers(self):
        """The transposed convs: fixed bilinear in the paper's training."""
        for short in self.shorts:
            yield from short.up
            if short.upsample is not None:
                yield short.upsample

    def parameter_groups(self):
        """(params, lr multiplier, weight-decay multiplier) as in the paper's Caffe training:
        backbone / side convs 1 / 2 (biases, no decay), score and merge convs and fusion
        0.1 / 0.2; the transposed convs are left out (fixed)."""
        fixed = {id(p) for layer in self.upsampling_layers() for p in layer.parameters()}
        scoring = {id(p) for side in self.sides for p in side.score.parameters()}
        scoring |= {id(p) for short in self.shorts for p in short.combine.parameters()}
        scoring.add(id(self.fusion_weights))
        groups = {(1.0, 1.0): [], (2.0, 0.0): [], (0.1, 1.0): [], (0.2, 0.0): []}
        for name, p in self.named_parameters():
            if id(p) in fixed:
                continue
            bias = name.endswith(".bias")
            if id(p) in scoring:
                groups[(0.2, 0.0) if bias else (0.1, 1.0)].append(p)
            else:
                groups[(2.0, 0.0) if bias else (1.0, 1.0)].append(p)
        return [(params, lr, decay) for (lr, decay), params in groups.items() if params]


# ------------------------------------------------------------------------ the port's names

def _pattern(template: str) -> re.Pattern:
    body = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{k\}", r"(?P<k>\d+)")
    body = body.replace(r"\{j\}", r"(?P<j>\d+)")
    return re.compile(body + r"\.(?P<param>weight|bias)")


_FROM_PORT = [(_pattern(port), own) for port, own in PORT_KEYS]
_TO_PORT = [(_pattern(own), port) for port, own in PORT_KEYS]


def _rename(name: str, table) -> str | None:
    for pattern, target in table:
        m = pattern.fullmatch(name)
        if m:
            fields = m.groupdict()
            return target.format(**fields) + "." + fields["param"]
    return None


def own_name(port_name: str) -> str | None:
    """This module's name of a port state_dict key (None when it is not one)."""
    return OWN_FUSION if port_name == PORT_FUSION else _rename(port_name, _FROM_PORT)


def port_name(name: str) -> str:
    """The port's state_dict key of one of this module's names."""
    port = PORT_FUSION if name == OWN_FUSION else _rename(name, _TO_PORT)
    if port is None:
        raise ValueError(f"no DSS-pytorch name for {name}")
    return port


def to_port_state_dict(model: DSS) -> dict:
    """`model`'s weights under the port's names (what its ``build_model().load_state_dict`` takes)."""
    return {port_name(name): tensor.detach().clone() for name, tensor in model.state_dict().items()}


def port_state(path, state: dict, model: DSS) -> dict:
    """A port state_dict renamed and checked against `model`: one-line error naming the tensor."""
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    own = model.state_dict()
    renamed = {}
    for key, tensor in state.items():
        name = own_name(key)
        if name is None or name not in own:
            raise file_error(path, f"unexpected tensor {key} (not in the DSS-pytorch network)")
        if tuple(tensor.shape) != tuple(own[name].shape):
            raise file_error(path, f"tensor {key} has shape {tuple(tensor.shape)}, expected {tuple(own[name].shape)}")
        renamed[name] = tensor.float()
    if OWN_FUSION not in renamed:  # the port's v1 files: mean fusion
        renamed[OWN_FUSION] = torch.full((len(SIDES),), 1.0 / len(SIDES))
    missing = [port_name(name) for name in own if name not in renamed]
    if missing:
        more = f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""
        raise file_error(path, f"missing tensor {missing[0]}{more}")
    return renamed


def load_weights(model: DSS, path) -> DSS:
    """Load a DSS-pytorch state_dict (.pth; plain or under 'state_dict', 'module.' prefix
    allowed) or an eps .pt (``eps train-saliency``) into `model`."""
    from eps.saliency.network_file import check_fit, read_model_file

    state, ours = read_model_file(path, "dss")
    model.load_state_dict(check_fit(path, state, model, "DSS") if ours else port_state(path, state, model))
    return model


# ------------------------------------------------------------------------------- predictor

def preprocess(rgb: np.ndarray, size: int = INPUT_SIZE) -> torch.Tensor:
    """The port's input: resized to size x size (bilinear), ImageNet mean / std."""
    resized = np.asarray(Image.fromarray(rgb).resize((size, size), Image.BILINEAR), np.float32) / 255.0
    x = (resized - np.asarray(MEAN, np.float32)) / np.asarray(STD, np.float32)
    return torch.from_numpy(x.transpose(2, 0, 1).copy())[None]


def saliency_probability(maps) -> torch.Tensor:
    """The port's prediction from the 7 logit maps: mean of the sigmoid of sides 1-3 and the fusion."""
    return torch.stack([torch.sigmoid(maps[i]) for i in PREDICT_MAPS]).mean(0)


def predictor(model: DSS, device="cpu"):
    """`rgb uint8 H x W x 3 -> uint8 H x W` as the port predicts (256 x 256, maps 1, 2, 3 and fusion)."""
    device = torch.device(device)
    model = model.to(device).eval()

    @torch.no_grad()
    def predict(rgb: np.ndarray) -> np.ndarray:
        rgb = check_rgb(np.asarray(rgb), "dss")
        prob = saliency_probability(model(preprocess(rgb).to(device)))
        prob = F.interpolate(prob, size=rgb.shape[:2], mode="bilinear", align_corners=True)[0, 0]
        return to_uint8(prob.cpu().numpy())

    return predict


def load_predictor(weights, device="cpu"):
    """The predictor of a weights file: a DSS-pytorch .pth or an eps .pt (``eps train-saliency``)."""
    if weights is None:
        raise EpsError("dss needs --weights FILE (a DSS-pytorch .pth state_dict, or a .pt written by "
                       "eps train-saliency)")
    return predictor(load_weights(DSS(), weights), device)
