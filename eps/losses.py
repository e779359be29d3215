"""Losses of EPS: multi-label classification and the saliency (pseudo-pixel) loss.

The saliency loss follows the official code (``get_eps_loss``) operation by operation;
its values and gradients are pinned by ``shared/golden/eps_loss_reference.npz``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from eps.errors import EpsError

SELECTIONS = ("adaptive", "naive", "predefined")


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Multilabel soft margin on the C foreground logits (the background logit is unused)."""
    c = labels.shape[1]
    return F.multilabel_soft_margin_loss(logits[:, :c], labels)


def saliency_loss(cam, saliency, labels, tau, lam, selection="adaptive", background_classes=()):
    """EPS saliency loss. Returns ``(loss, fg_map, bg_map, sal_pred)``.

    cam: (N, C+1, h, w) raw scores, last channel = background; saliency: (N, 1, H, W) in
    [0, 1], resized to (h, w) with nearest; labels: (N, C) multi-hot.

    Map selection decides which labelled classes explain the salient region:
    ``adaptive`` (paper): a class whose rounded map overlaps the rounded saliency by more
    than ``tau`` (share of the class's pixels) is foreground, other labelled classes go
    to the background side with the background channel; ``naive``: every labelled class
    is foreground; ``predefined``: labelled classes in ``background_classes`` (0-based)
    are background-side, the others foreground.
    fg_map = sum of foreground probabilities, bg_map = 1 - sum of background-side ones,
    sal_pred = lam * fg_map + (1 - lam) * bg_map, loss = MSE(sal_pred, saliency).
    """
    n, k, h, w = cam.shape
    c = k - 1
    if labels.shape != (n, c):
        raise EpsError(f"saliency_loss: labels of shape {tuple(labels.shape)} do not fit "
                       f"a cam with {k} channels (expected ({n}, {c}))")
    saliency = F.interpolate(saliency, size=(h, w))
    probs = F.softmax(cam, dim=1)
    present = labels.bool().view(n, c, 1, 1)

    is_fg = select_foreground(probs, saliency, tau, selection, background_classes)
    fg_mask = (present & is_fg).to(probs.dtype)
    bg_mask = (present & ~is_fg).to(probs.dtype)
    fg_map = (probs[:, :c] * fg_mask).sum(1, keepdim=True)
    bg_map = 1 - ((probs[:, :c] * bg_mask).sum(1, keepdim=True) + probs[:, c:])
    sal_pred = lam * fg_map + (1 - lam) * bg_map
    loss = F.mse_loss(sal_pred, saliency)
    return loss, fg_map, bg_map, sal_pred


def select_foreground(probs, saliency, tau, selection="adaptive", background_classes=()):
    """Map selection: a boolean (N or 1, C, 1, 1), True where a class explains the salient region.

    probs: (N, C+1, h, w) softmax scores; saliency: (N, 1, h, w) in [0, 1] at the same size.
    """
    c = probs.shape[1] - 1
    if selection == "adaptive":
        fg_bin = torch.round(probs[:, :c].detach())
        overlap = (fg_bin * torch.round(saliency)).flatten(2).sum(-1)
        ratio = overlap / (fg_bin.flatten(2).sum(-1) + 1e-4)
        return (ratio > tau).view(probs.shape[0], c, 1, 1)
    if selection == "naive":
        return torch.ones(1, c, 1, 1, dtype=torch.bool, device=probs.device)
    if selection == "predefined":
        is_fg = torch.ones(c, dtype=torch.bool, device=probs.device)
        for i in background_classes:
            if not 0 <= int(i) < c:
                raise EpsError(f"background_classes: index {i} outside 0..{c - 1}")
            is_fg[int(i)] = False
        return is_fg.view(1, c, 1, 1)
    raise EpsError(f"selection: unknown value {selection!r} (allowed: {', '.join(SELECTIONS)})")


@torch.no_grad()
def foreground_share(cam, saliency, labels, tau, selection="adaptive", background_classes=()) -> float:
    """Share of the batch's labelled (image, class) pairs that map selection puts on the foreground side.

    Logged by classifier training: adaptive selection starts near 0 (a fresh head's rounded
    maps are empty) and should climb as the class maps become object-like.
    """
    c = labels.shape[1]
    saliency = F.interpolate(saliency, size=cam.shape[-2:])
    is_fg = select_foreground(F.softmax(cam, dim=1), saliency, tau, selection, background_classes)
    present = labels.bool().view(labels.shape[0], c, 1, 1)
    return float((present & is_fg).sum() / present.sum().clamp(min=1))
