"""EfficientNet-Lite0 on a CPU: why configs/voc12_cpu.yaml trains at output stride 16 and runs
its CRF at half size.

Figures (medians of interleaved repeats, after one untimed warm-up):
- a classifier training step (forward, backward, SGD step; batch 8, EPS head of 9 maps) at
  output stride 8 and 16, with the preset's frozen stages (stem, BN, stride-2/4 blocks);
- CAM inference of one VOC-size image (500x375) at scale 1.0 at both strides;
- the pseudo-mask CRF of one VOC-size photo (3 labels) at full size and at `crf.scale: 0.5`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny inputs, one repeat (the test suite)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = the cores)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--crop", type=int, default=224)
    args = parser.parse_args(argv)
    _common.set_threads(args.threads)
    _common.header("lite0", argv=argv)
    from eps.crf import CRF_DEFAULTS, refine_cams
    from eps.models import build_classifier
    from eps.models.efficientnet import load_lite0
    from eps.training import make_optimizer

    crop, size, repeats = (32, (48, 64), 1) if args.quick else (args.crop, (375, 500), args.repeats)
    torch.manual_seed(0)
    batch = torch.randn(8, 3, crop, crop)
    image = torch.randn(1, 3, *size)
    steps, infers = {}, {}
    for name in ("efficientnet_lite0_os8", "efficientnet_lite0"):
        model = build_classifier(name, 8, background=True)
        load_lite0(model._backbone)
        model.train()
        optimizer = make_optimizer(model, {"lr": 0.01, "weight_decay": 5e-4, "momentum": 0.9})
        stride = model.output_stride
        steps[f"os{stride}"] = _common.classifier_step(model, optimizer, batch, torch.ones(len(batch), 8))

        def infer(model=model):
            with torch.no_grad():
                model.eval().forward_cam(image)
            model.train()
        infers[f"os{stride}"] = infer
    step_times = _common.interleaved(steps, repeats)
    infer_times = _common.interleaved(infers, repeats)
    for key in ("os8", "os16"):
        print(f"training step {key}, batch 8, crop {crop}: {_common.fmt_times(step_times[key])}")
    for key in ("os8", "os16"):
        print(f"CAM inference {key}, one {size[1]}x{size[0]} image: {_common.fmt_times(infer_times[key])}")
    step_ratio = _common.median(step_times["os8"]) / _common.median(step_times["os16"])
    infer_ratio = _common.median(infer_times["os8"]) / _common.median(infer_times["os16"])

    rng = np.random.default_rng(0)
    h, w = size
    photo = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
    yy, xx = np.mgrid[:h, :w]
    maps = np.stack([np.exp(-((yy - h * c / 3) ** 2 + (xx - w / 2) ** 2) / (0.05 * h * w)) for c in (1, 2)])
    maps = maps.astype(np.float32)
    crfs = {f"scale {s}": (lambda s=s: refine_cams(photo, maps, [0, 1], False, {**CRF_DEFAULTS, "scale": s}))
            for s in (1.0, 0.5)}
    crf_times = _common.interleaved(crfs, repeats)
    for key, times in crf_times.items():
        print(f"pseudo-mask CRF at {key}, one {w}x{h} photo: {_common.fmt_times(times)}")
    crf_ratio = _common.median(crf_times["scale 1.0"]) / _common.median(crf_times["scale 0.5"])
    _common.summary(f"lite0: training step os8 / os16 {step_ratio:.1f}x, CAM inference os8 / os16 "
                    f"{infer_ratio:.1f}x, CRF full / half size {crf_ratio:.1f}x")


if __name__ == "__main__":
    main()
