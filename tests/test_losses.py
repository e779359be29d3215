"""Losses: golden conformance with the official EPS loss, and the map selections."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from eps.errors import EpsError
from eps.losses import classification_loss, foreground_share, saliency_loss, select_foreground

SHARED = Path(__file__).resolve().parents[2] / "shared"
GOLDEN = SHARED / "golden" / "eps_loss_reference.npz"


def _golden_cases():
    if not GOLDEN.is_file():
        return []
    with np.load(GOLDEN) as data:
        return list(range(int(data["n_cases"])))


@pytest.mark.parametrize("case", _golden_cases() or [None])
def test_adaptive_loss_matches_official_values_and_gradients(case):
    if case is None:
        pytest.skip("../shared not found: golden files (eps_loss_reference.npz) absent")
    with np.load(GOLDEN) as data:
        ref = {k[len(f"c{case}_"):]: data[k] for k in data.files if k.startswith(f"c{case}_")}
    cam = torch.from_numpy(ref["cam"]).requires_grad_()
    loss, fg, bg, pred = saliency_loss(cam, torch.from_numpy(ref["saliency"]),
                                       torch.from_numpy(ref["labels"]),
                                       float(ref["tau"]), float(ref["lam"]))
    loss.backward()
    for got, key in ((loss, "loss"), (fg, "fg_map"), (bg, "bg_map"), (pred, "sal_pred"),
                     (cam.grad, "grad_cam")):
        np.testing.assert_allclose(got.detach().numpy(), ref[key], atol=1e-5, err_msg=key)


def _two_class_case():
    """Class 0 sits on the salient left half, class 1 on the non-salient right half."""
    cam = torch.full((1, 3, 2, 2), -4.0)
    cam[0, 0, :, 0] = 4.0
    cam[0, 1, :, 1] = 4.0
    saliency = torch.zeros(1, 1, 4, 4)
    saliency[..., :2] = 1.0  # nearest resizing to 2x2 keeps the left column salient
    labels = torch.tensor([[1.0, 1.0]])
    return cam, saliency, labels


def test_adaptive_sends_non_salient_class_to_background_naive_does_not():
    cam, saliency, labels = _two_class_case()
    p = F.softmax(cam, dim=1)
    _, fg, bg, pred = saliency_loss(cam, saliency, labels, tau=0.4, lam=0.5)
    torch.testing.assert_close(fg, p[:, 0:1])
    torch.testing.assert_close(bg, 1 - p[:, 1:2] - p[:, 2:3])
    torch.testing.assert_close(pred, 0.5 * fg + 0.5 * bg)

    loss_n, fg_n, bg_n, _ = saliency_loss(cam, saliency, labels, tau=0.4, lam=0.5, selection="naive")
    torch.testing.assert_close(fg_n, p[:, 0:1] + p[:, 1:2])
    torch.testing.assert_close(bg_n, 1 - p[:, 2:3])
    loss_a = saliency_loss(cam, saliency, labels, tau=0.4, lam=0.5)[0]
    assert loss_a < loss_n  # the right half is not salient: calling class 1 foreground costs


def test_predefined_selection_uses_the_given_background_classes():
    cam, saliency, labels = _two_class_case()
    adaptive = saliency_loss(cam, saliency, labels, tau=0.4, lam=0.5)
    predefined = saliency_loss(cam, saliency, labels, tau=0.4, lam=0.5,
                               selection="predefined", background_classes=(1,))
    naive = saliency_loss(cam, saliency, labels, tau=0.4, lam=0.5, selection="naive")
    none_bg = saliency_loss(cam, saliency, labels, tau=0.4, lam=0.5, selection="predefined")
    for a, b in zip(adaptive, predefined):
        torch.testing.assert_close(a, b)
    for a, b in zip(naive, none_bg):
        torch.testing.assert_close(a, b)


def test_unlabelled_classes_join_neither_map():
    cam, saliency, _ = _two_class_case()
    p = F.softmax(cam, dim=1)
    _, fg, bg, _ = saliency_loss(cam, saliency, torch.tensor([[1.0, 0.0]]), tau=0.4, lam=0.5,
                                 selection="naive")
    torch.testing.assert_close(fg, p[:, 0:1])
    torch.testing.assert_close(bg, 1 - p[:, 2:3])


def test_bad_selection_and_class_index_raise():
    cam, saliency, labels = _two_class_case()
    with pytest.raises(EpsError, match="selection"):
        saliency_loss(cam, saliency, labels, 0.4, 0.5, selection="greedy")
    with pytest.raises(EpsError, match="background_classes"):
        saliency_loss(cam, saliency, labels, 0.4, 0.5, selection="predefined",
                      background_classes=(2,))


def test_classification_loss_ignores_background_logit():
    labels = torch.tensor([[1.0, 0.0, 1.0]])
    logits = torch.tensor([[2.0, -1.0, 0.5, 9.0]])
    expected = F.multilabel_soft_margin_loss(logits[:, :3], labels)
    torch.testing.assert_close(classification_loss(logits, labels), expected)
    changed = logits.clone()
    changed[0, 3] = -9.0
    torch.testing.assert_close(classification_loss(changed, labels), expected)


def test_select_foreground_and_the_logged_share():
    cam, saliency, labels = _two_class_case()
    probs = F.softmax(cam, dim=1)
    small = F.interpolate(saliency, size=(2, 2))
    assert select_foreground(probs, small, 0.4).flatten().tolist() == [True, False]
    assert select_foreground(probs, small, 0.4, "naive").flatten().tolist() == [True, True]
    assert select_foreground(probs, small, 0.4, "predefined", [0]).flatten().tolist() == [False, True]
    # the share counts labelled classes only: one of two on the foreground side
    assert foreground_share(cam, saliency, labels, 0.4) == 0.5
    assert foreground_share(cam, saliency, torch.tensor([[1.0, 0.0]]), 0.4) == 1.0
    assert foreground_share(cam, saliency, labels, 0.4, "naive") == 1.0
    # a map with no pixel over 0.5 (a fresh head) overlaps nothing: background side
    flat = torch.zeros(1, 3, 2, 2)
    assert foreground_share(flat, saliency, labels, 0.4) == 0.0
