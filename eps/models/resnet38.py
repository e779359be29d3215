"""ResNet-38 ("wider ResNet-38", model A1) as used by PSA and EPS, with the official names.

Module and parameter names follow the official PyTorch port (``conv1a``, ``b2`` ...
``b7``, ``bn7``; inside a block ``bn_branch2a``, ``conv_branch2a``, ``bn_branch2b1``, ...,
``conv_branch1``), so released ImageNet / EPS weights load without renaming.

Blocks are pre-activation (BN -> ReLU -> conv). The projection shortcut ``conv_branch1``
takes the BN-ReLU output, as in the official code. Strides at b2, b3 and b4 give an
output stride of 8; b5-b7 are dilated instead. Batch-norm is frozen (the statistics of
the ImageNet weights are kept: batches of 8 crops are too small to re-estimate them),
and the first stages (conv1a, b2, b2_1, b2_2) are not trained, as in the official code.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class ResBlock(nn.Module):
    """Two 3x3 convolutions (the first possibly strided / dilated) with a residual."""

    def __init__(self, in_ch, mid_ch, out_ch, stride=1, first_dilation=None, dilation=1):
        super().__init__()
        first_dilation = dilation if first_dilation is None else first_dilation
        self.same_shape = in_ch == out_ch and stride == 1
        self.bn_branch2a = nn.BatchNorm2d(in_ch)
        self.conv_branch2a = nn.Conv2d(in_ch, mid_ch, 3, stride, padding=first_dilation,
                                       dilation=first_dilation, bias=False)
        self.bn_branch2b1 = nn.BatchNorm2d(mid_ch)
        self.conv_branch2b1 = nn.Conv2d(mid_ch, out_ch, 3, padding=dilation,
                                        dilation=dilation, bias=False)
        if not self.same_shape:
            self.conv_branch1 = nn.Conv2d(in_ch, out_ch, 1, stride, bias=False)

    def forward(self, x):
        pre = F.relu(self.bn_branch2a(x))
        shortcut = x if self.same_shape else self.conv_branch1(pre)
        y = self.conv_branch2a(pre)
        y = self.conv_branch2b1(F.relu(self.bn_branch2b1(y)))
        return shortcut + y


class ResBlockBottleneck(nn.Module):
    """1x1 -> 3x3 (dilated) -> 1x1 bottleneck with channel dropout, used by b6 and b7."""

    def __init__(self, in_ch, out_ch, stride=1, dilation=1, dropout=0.0):
        super().__init__()
        self.same_shape = in_ch == out_ch and stride == 1
        self.bn_branch2a = nn.BatchNorm2d(in_ch)
        self.conv_branch2a = nn.Conv2d(in_ch, out_ch // 4, 1, stride, bias=False)
        self.bn_branch2b1 = nn.BatchNorm2d(out_ch // 4)
        self.dropout_2b1 = nn.Dropout2d(dropout)
        self.conv_branch2b1 = nn.Conv2d(out_ch // 4, out_ch // 2, 3, padding=dilation,
                                        dilation=dilation, bias=False)
        self.bn_branch2b2 = nn.BatchNorm2d(out_ch // 2)
        self.dropout_2b2 = nn.Dropout2d(dropout)
        self.conv_branch2b2 = nn.Conv2d(out_ch // 2, out_ch, 1, bias=False)
        if not self.same_shape:
            self.conv_branch1 = nn.Conv2d(in_ch, out_ch, 1, stride, bias=False)

    def forward(self, x):
        pre = F.relu(self.bn_branch2a(x))
        shortcut = x if self.same_shape else self.conv_branch1(pre)
        y = self.conv_branch2a(pre)
        y = self.conv_branch2b1(self.dropout_2b1(F.relu(self.bn_branch2b1(y))))
        y = self.conv_branch2b2(self.dropout_2b2(F.relu(self.bn_branch2b2(y))))
        return shortcut + y


class ResNet38(nn.Module):
    """The ResNet-38 trunk: image (N, 3, H, W) -> features (N, 4096, H/8, W/8)."""

    out_channels = 4096
    output_stride = 8

    def __init__(self):
        super().__init__()
        self.conv1a = nn.Conv2d(3, 64, 3, padding=1, bias=False)
        self.b2 = ResBlock(64, 128, 128, stride=2)
        self.b2_1 = ResBlock(128, 128, 128)
        self.b2_2 = ResBlock(128, 128, 128)
        self.b3 = ResBlock(128, 256, 256, stride=2)
        self.b3_1 = ResBlock(256, 256, 256)
        self.b3_2 = ResBlock(256, 256, 256)
        self.b4 = ResBlock(256, 512, 512, stride=2)
        self.b4_1 = ResBlock(512, 512, 512)
        self.b4_2 = ResBlock(512, 512, 512)
        self.b4_3 = ResBlock(512, 512, 512)
        self.b4_4 = ResBlock(512, 512, 512)
        self.b4_5 = ResBlock(512, 512, 512)
        self.b5 = ResBlock(512, 512, 1024, first_dilation=1, dilation=2)
        self.b5_1 = ResBlock(1024, 512, 1024, dilation=2)
        self.b5_2 = ResBlock(1024, 512, 1024, dilation=2)
        self.b6 = ResBlockBottleneck(1024, 2048, dilation=4, dropout=0.3)
        self.b7 = ResBlockBottleneck(2048, 4096, dilation=4, dropout=0.5)
        self.bn7 = nn.BatchNorm2d(4096)
        self.freeze()

    def not_trained(self) -> list[nn.Module]:
        """The early stages the official code keeps at their ImageNet values."""
        return [self.conv1a, self.b2, self.b2_1, self.b2_2]

    def freeze(self) -> None:
        """Put every BN in eval mode and stop gradients to BN and the early stages.

        Called at construction (so parameter groups are right before training starts)
        and after every ``train()`` (which would otherwise switch BN back to batch stats).
        """
        for module in self.not_trained():
            for p in module.parameters():
                p.requires_grad = False
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
                m.weight.requires_grad = False
                m.bias.requires_grad = False

    def train(self, mode: bool = True):
        super().train(mode)
        self.freeze()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1a(x)
        for name in ("b2", "b2_1", "b2_2", "b3", "b3_1", "b3_2",
                     "b4", "b4_1", "b4_2", "b4_3", "b4_4", "b4_5",
                     "b5", "b5_1", "b5_2", "b6", "b7"):
            x = getattr(self, name)(x)
        return F.relu(self.bn7(x))
