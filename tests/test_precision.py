"""`precision: bf16` for CAM inference and classifier training: opt-in bfloat16 autocast.

On a CPU without AVX-512 BF16 or AMX both stages refuse it in one line, before writing
anything. Where the CPU has them (simulated here by patching the check, so the test runs
the same on every machine) the stages run their forward passes in bfloat16 and agree with
float32 closely. Speed is a benchmark (bench/precision.py), not a test.
"""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

import eps.config
from eps.config import INFER_DEFAULTS, TRAIN_DEFAULTS, autocast_dtype
from eps.errors import EpsError
from eps.infer import infer_cams, multiscale_cams
from eps.models import build_classifier
from eps.train import train_classifier

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    monkeypatch.setenv("EPS_THREADS", "1")


def train_params(**overrides) -> dict:
    p = dict(TRAIN_DEFAULTS, loss="eps", backbone="small", iterations=2, batch_size=2, crop=32,
             resize_long=[32, 48], checkpoint_every=2, device="cpu")
    p.update(overrides)
    return p


@pytest.fixture(scope="module")
def classifier(tiny_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("clf") / "classifier.pt"
    return train_classifier(tiny_world["index"], out, train_params(), saliency_shards=[tiny_world["sal"]])


def test_float32_is_no_autocast_and_amp_is_float16_on_cuda_only():
    assert autocast_dtype("float32", CPU, "infer.precision") is None
    assert autocast_dtype("float32", CPU, "infer.precision", amp=True) is None
    assert autocast_dtype("float32", torch.device("cuda"), "infer.precision", amp=True) is torch.float16


def test_unknown_precision_is_named(monkeypatch):
    with pytest.raises(EpsError, match=r"^infer.precision: unknown value 'fp8' \(allowed: float32, bf16\)$"):
        autocast_dtype("fp8", CPU, "infer.precision")


def test_bf16_on_a_cpu_without_it_is_refused_in_one_line(monkeypatch):
    monkeypatch.setattr(eps.config, "cpu_has_bf16", lambda: False)
    with pytest.raises(EpsError) as err:
        autocast_dtype("bf16", CPU, "classifier.precision")
    text = str(err.value)
    assert "\n" not in text and text.startswith("classifier.precision: bf16 needs a CPU with AVX-512 BF16")
    monkeypatch.setattr(eps.config, "cpu_has_bf16", lambda: True)
    assert autocast_dtype("bf16", CPU, "classifier.precision") is torch.bfloat16


def test_stages_refuse_bf16_before_writing_anything(tiny_world, classifier, tmp_path, monkeypatch):
    monkeypatch.setattr(eps.config, "cpu_has_bf16", lambda: False)
    out = tmp_path / "cams.h5"
    params = dict(INFER_DEFAULTS, scales=[1.0], batch_size=2, device="cpu", precision="bf16")
    with pytest.raises(EpsError, match="^infer.precision: bf16 needs"):
        infer_cams(tiny_world["index"], classifier, out, "train", "1-of-1", params)
    run = tmp_path / "run" / "classifier.pt"
    with pytest.raises(EpsError, match="^classifier.precision: bf16 needs"):
        train_classifier(tiny_world["index"], run, train_params(precision="bf16"), saliency_shards=[tiny_world["sal"]])
    assert sorted(p.name for p in tmp_path.rglob("*")) == []


def test_bf16_maps_are_bfloat16_forwards_close_to_float32(monkeypatch):
    torch.manual_seed(0)
    model = build_classifier("small", 4, background=True).eval()
    images = torch.randint(0, 256, (2, 3, 40, 48), dtype=torch.uint8)
    seen = []
    forward = model.forward_cam

    def spy(x):
        y = forward(x)
        seen.append(y.dtype)
        return y

    model.forward_cam = spy
    with torch.no_grad():
        full = multiscale_cams(model, images, [1.0, 0.5], True, True)
        half = multiscale_cams(model, images, [1.0, 0.5], True, True, autocast=torch.bfloat16)
    assert seen[:2] == [torch.float32] * 2 and seen[2:] == [torch.bfloat16] * 2
    assert half.dtype == torch.float32 and not torch.equal(full, half)
    torch.testing.assert_close(half, full, atol=0.05, rtol=0.05)


def losses(run) -> list[float]:
    rows = (run.parent / "train_log.csv").read_text().splitlines()
    column = rows[0].split(",").index("loss")
    return [float(r.split(",")[column]) for r in rows[1:]]


def test_bf16_training_and_inference_run_where_the_cpu_has_it(tiny_world, classifier, tmp_path, monkeypatch):
    monkeypatch.setattr(eps.config, "cpu_has_bf16", lambda: True)
    runs = {precision: train_classifier(tiny_world["index"], tmp_path / precision / "classifier.pt",
                                        train_params(precision=precision), saliency_shards=[tiny_world["sal"]])
            for precision in ("float32", "bf16")}
    full, half = losses(runs["float32"]), losses(runs["bf16"])
    assert len(half) == 2 and half != full  # the same samples, the forward in bfloat16
    np.testing.assert_allclose(half, full, rtol=0.05)
    shards = {}
    for precision in ("float32", "bf16"):
        params = dict(INFER_DEFAULTS, scales=[1.0, 0.5], batch_size=2, device="cpu", precision=precision)
        shards[precision] = infer_cams(tiny_world["index"], classifier, tmp_path / f"{precision}.h5", "train",
                                       "1-of-1", params)
    with h5py.File(shards["float32"]) as a, h5py.File(shards["bf16"]) as b:
        assert sorted(a) == sorted(b)
        assert any(not np.array_equal(a[key][()], b[key][()]) for key in a)
        for key in a:
            np.testing.assert_allclose(b[key][()], a[key][()], rtol=0.05, atol=1e-3 * float(a[key][()].max()))


def test_bf16_inference_stores_the_weights_in_bfloat16_on_a_cpu():
    from eps.infer import prepare_model

    torch.manual_seed(0)
    images = torch.randint(0, 256, (2, 3, 40, 48), dtype=torch.uint8)
    full = prepare_model(build_classifier("small", 4, background=True), CPU)
    half = build_classifier("small", 4, background=True)
    half.load_state_dict(full.state_dict())
    half = prepare_model(half, CPU, torch.bfloat16)
    assert {p.dtype for p in full.parameters()} == {torch.float32}
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        a = multiscale_cams(full, images, [1.0, 0.5], True, True)
        b = multiscale_cams(half, images, [1.0, 0.5], True, True, autocast=torch.bfloat16)
    assert b.dtype == torch.float32 and not torch.equal(a, b)
    torch.testing.assert_close(b, a, atol=0.05, rtol=0.05)


def test_lite0_trains_channels_last_under_bf16_only(tiny_world, tmp_path, monkeypatch):
    """Channels-last makes a Lite0's bfloat16 step fast on a CPU; float32 and the other
    backbones keep the contiguous layout (and with it their measured results)."""
    from eps.models.classifier import Classifier, training_layout

    assert training_layout("efficientnet_lite0", torch.bfloat16, CPU) == torch.channels_last
    assert training_layout("efficientnet_lite0", None, CPU) == torch.contiguous_format
    assert training_layout("resnet38", torch.bfloat16, CPU) == torch.contiguous_format
    assert training_layout("efficientnet_lite0", torch.bfloat16, torch.device("cuda")) == torch.contiguous_format
    monkeypatch.setattr(eps.config, "cpu_has_bf16", lambda: True)
    seen = []
    forward = Classifier.forward_cam

    def channels_last(t):
        return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()

    def spy(self, x):
        seen.append((channels_last(x), channels_last(self._conv_stem.weight)))
        return forward(self, x)

    monkeypatch.setattr(Classifier, "forward_cam", spy)
    for precision in ("float32", "bf16"):
        train_classifier(tiny_world["index"], tmp_path / precision / "classifier.pt",
                         train_params(backbone="efficientnet_lite0", iterations=1, precision=precision),
                         saliency_shards=[tiny_world["sal"]])
    assert seen == [(False, False), (True, True)]  # the batches and the weights


def test_the_stage_benchmark_runs_infer_cams_in_both_precisions(tiny_world, classifier):
    """bench/precision.py --stage: the figure docs/benchmarks.md gives for CAM inference as the stage runs it."""
    from test_bench import run_script

    if not eps.config.cpu_has_bf16():
        pytest.skip("this CPU has no AVX-512 BF16 or AMX: the stage refuses bf16 here")
    out = run_script("precision", "--stage", "train", "--index", str(tiny_world["index"]), "--classifier",
                     str(classifier), "--threads", "1", timeout=300)
    lines = out.splitlines()
    assert sum(line.startswith("eps infer-cams --split train, ") for line in lines) == 2
    assert lines[-1].startswith("SUMMARY precision: infer_cams stage over train bf16 / float32 ")
    agree = float(lines[-1].split("(")[-1].split("%")[0])
    assert 90 <= agree <= 100
