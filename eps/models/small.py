"""A small convolutional backbone for CPU runs and tests (trains from scratch in minutes).

Same contract as ResNet-38 (output stride 8, ``out_channels``), so the classifier, the
losses and inference code paths are the ones used at full scale.

Normalisation is GroupNorm, trained (not frozen): it works from random initialisation
and, unlike BatchNorm, behaves the same in train and eval mode and at any batch size, so
CAMs inferred on single images at several scales see the normalisation used in training.
"""

from __future__ import annotations

import torch
import torch.nn as nn

WIDTHS = (32, 64, 128, 128)


def _conv_gn_relu(in_ch: int, out_ch: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 3, stride, padding=dilation, dilation=dilation, bias=False),
        nn.GroupNorm(8, out_ch),
        nn.ReLU(inplace=True),
    )


class SmallNet(nn.Module):
    """Four stages of 3x3 conv-GN-ReLU; three stride-2 stages, the last one dilated.

    image (N, 3, H, W) -> features (N, 128, ceil(H/8), ceil(W/8)).
    With ``output_stride=4`` the third stage is dilated instead of strided: finer maps for
    small images (the synthetic world's 96-pixel images give 24x24 CAMs instead of 12x12).
    """

    def __init__(self, widths=WIDTHS, output_stride: int = 8):
        super().__init__()
        if output_stride not in (4, 8):
            raise ValueError(f"output_stride must be 4 or 8, got {output_stride}")
        self.output_stride = output_stride
        w1, w2, w3, w4 = widths
        self.out_channels = w4
        s3, d3 = (2, 1) if output_stride == 8 else (1, 2)
        d4 = 2 * d3
        self.stage1 = _conv_gn_relu(3, w1, stride=2)
        self.stage2 = nn.Sequential(_conv_gn_relu(w1, w2, stride=2), _conv_gn_relu(w2, w2))
        self.stage3 = nn.Sequential(_conv_gn_relu(w2, w3, stride=s3, dilation=d3), _conv_gn_relu(w3, w3, dilation=d3))
        self.stage4 = nn.Sequential(_conv_gn_relu(w3, w4, dilation=d4),
                                    _conv_gn_relu(w4, w4, dilation=d4))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stage4(self.stage3(self.stage2(self.stage1(x))))
