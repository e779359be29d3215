"""Classification network: a backbone plus a 1x1 conv head whose maps are the CAMs.

The backbone's submodules are registered directly on the classifier (no ``backbone.``
prefix), so a ResNet-38 classifier has exactly the state_dict names of the official EPS
``resnet38_eps.Net`` and its released weights load as they are.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from eps.errors import EpsError
from eps.models.efficientnet import Lite0Backbone, fold_batchnorm
from eps.models.resnet38 import ResNet38
from eps.models.small import SmallNet

BACKBONES = {
    "resnet38": ResNet38,
    "small": SmallNet,
    "small_os4": lambda: SmallNet(output_stride=4),
    # output stride 16: on a 2-core CPU a training step at stride 8 is 4x slower (bench/lite0.py)
    "efficientnet_lite0": lambda: Lite0Backbone(output_stride=16),
    "efficientnet_lite0_os8": lambda: Lite0Backbone(output_stride=8),
}
LITE0_BACKBONES = ("efficientnet_lite0", "efficientnet_lite0_os8")
# Backbones whose ImageNet weights come with an installed package (weights: null loads them).
PACKAGED_WEIGHTS = LITE0_BACKBONES


class Classifier(nn.Module):
    """``forward(x) -> (logits, cam)``; cam has C+1 channels (last = background) if
    ``background`` else C; logits are the global average pool of all cam channels.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, background: bool = True):
        super().__init__()
        if list(backbone.parameters(recurse=False)) or list(backbone.buffers(recurse=False)):
            raise ValueError("a backbone must keep its parameters and buffers in submodules")
        for name, child in backbone.named_children():
            self.add_module(name, child)
        # Kept out of the module tree (object.__setattr__), so its children are not
        # registered twice and names carry no prefix; it shares the child modules above.
        object.__setattr__(self, "_backbone", backbone)
        self.num_classes = num_classes
        self.background = background
        self.output_stride = backbone.output_stride
        k = num_classes + 1 if background else num_classes
        self.fc8 = nn.Conv2d(backbone.out_channels, k, 1, bias=False)
        nn.init.xavier_uniform_(self.fc8.weight)

    def train(self, mode: bool = True):
        super().train(mode)
        self._backbone.train(mode)  # lets the backbone re-apply what it keeps frozen
        return self

    def forward_cam(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc8(self._backbone(x))

    def forward(self, x: torch.Tensor):
        cam = self.forward_cam(x)
        logits = F.adaptive_avg_pool2d(cam, 1).flatten(1)
        return logits, cam

    def get_parameter_groups(self):
        """(backbone weights, backbone biases, head weights, head biases), trainable only.

        The trainer gives them lr, 2x lr, 10x lr and 20x lr as in the official code;
        normalisation weights / biases count as backbone weights / biases.
        """
        groups = ([], [], [], [])
        for module in self.modules():
            head = module is self.fc8
            for name, p in module.named_parameters(recurse=False):
                if not p.requires_grad:
                    continue
                bias = name == "bias"
                groups[(2 if head else 0) + (1 if bias else 0)].append(p)
        return groups


def training_layout(backbone: str, autocast, device) -> torch.memory_format:
    """The memory format a classifier trains in (weights and batches).

    Channels-last only for a Lite0 under bfloat16 autocast on a CPU, where it makes oneDNN's
    depthwise convolutions fast (a step 1.4x faster than contiguous). ResNet-38 and `small`
    train no faster channels-last, and float32 keeps its layout and so its measured results
    (docs/benchmarks.md "bfloat16").
    """
    if backbone in LITE0_BACKBONES and autocast == torch.bfloat16 and torch.device(device).type == "cpu":
        return torch.channels_last
    return torch.contiguous_format


def build_classifier(backbone: str, num_classes: int, background: bool = True) -> Classifier:
    """Build a classifier by backbone name ("resnet38" or "small")."""
    if backbone not in BACKBONES:
        allowed = ", ".join(sorted(BACKBONES))
        raise EpsError(f"backbone: unknown value {backbone!r} (allowed: {allowed})")
    return Classifier(BACKBONES[backbone](), num_classes, background)


def load_classifier(path, device="cpu"):
    """Rebuild a trained classifier from `classifier.pt` (weights_only): `(model in eval mode, meta)`,
    for inference (a Lite0 backbone's BatchNorm folded into its convolutions)."""
    from eps.models.convert import load_fitting, read_model_file

    state = read_model_file(path, "classifier")
    if not isinstance(state, dict) or "state_dict" not in state or "meta" not in state:
        raise EpsError(f"{path}: not an eps classifier file (expected keys state_dict and meta)")
    meta = state["meta"]
    needed = ("backbone", "num_classes", "background")
    if not isinstance(meta, dict) or any(k not in meta for k in needed):
        raise EpsError(f"{path}: not an eps classifier file (meta lacks {', '.join(needed)})")
    model = build_classifier(meta["backbone"], meta["num_classes"], background=meta["background"])
    load_fitting(model, state["state_dict"], path, f"the {meta['backbone']} classifier")
    return fold_batchnorm(model.eval()).to(device), meta
