"""Ceiling: achieved GFLOP/s of the ResNet-38 forward against a matmul peak of the same machine.

FLOPs of the forward are counted with ``torch.utils.flop_counter.FlopCounterMode`` (2 per
multiply-add) and cross-checked with an analytic count of the convolutions (hooks on every
``Conv2d``: 2 * output elements * in_channels / groups * kernel area). The forward runs as
the CAM inference stage runs it (``eps.infer.prepare_model``: eval, channels-last,
``torch.inference_mode``). The peak is ``torch.mm`` of large float32 square matrices timed
in the same run, interleaved with the forward, and the same product computed as a 1x1
convolution (oneDNN's GEMM, the kernels the forward runs on; torch.mm goes to the BLAS);
the higher of the two counts as the peak. Figures: both rates (median of the repeats,
and the best) and the forward's share of the matmul rate (medians, and best against best).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402


def analytic_conv_flops(model, x) -> int:
    total = 0

    def hook(module, inputs, output):
        nonlocal total
        k = module.kernel_size[0] * module.kernel_size[1]
        total += 2 * output.numel() * (module.in_channels // module.groups) * k

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    try:
        with torch.inference_mode():
            model.forward_cam(x)
    finally:
        for h in handles:
            h.remove()
    return total


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="resnet38")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--size", type=int, default=224, help="square input side")
    p.add_argument("--matmul", type=int, default=4096, help="square matrix side of the peak")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default, the cores)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", action="store_true", help="cuda: forward under autocast, matmul in float16")
    p.add_argument("--quick", action="store_true", help="small backbone, 1x3x64x64, 512 matmul, 2 repeats")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"SKIP ceiling: --device {args.device} but no CUDA device is available")
        return 0
    if args.quick:
        args.backbone, args.batch, args.size, args.matmul, args.repeats = "small", 1, 64, 512, 2
    _common.set_threads(args.threads)
    _common.header("ceiling", args.device, argv)
    from torch.utils.flop_counter import FlopCounterMode

    from eps.infer import prepare_model
    from eps.models import build_classifier

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = prepare_model(build_classifier(args.backbone, 20, background=True), device)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device).contiguous(memory_format=torch.channels_last)
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        model.forward_cam(x)
    flops = counter.get_total_flops()
    conv_count = analytic_conv_flops(model, x)
    amp = args.amp and device.type == "cuda"
    dtype = torch.float16 if amp else torch.float32
    a = torch.randn(args.matmul, args.matmul, device=device, dtype=dtype)
    b = torch.randn(args.matmul, args.matmul, device=device, dtype=dtype)
    mm_flops = 2 * args.matmul ** 3

    def forward():
        with torch.inference_mode(), torch.autocast(device.type, enabled=amp):
            model.forward_cam(x)

    def matmul():
        torch.mm(a, b)

    # the same product as a 1x1 convolution: oneDNN's own GEMM kernels, which the forward uses
    # (torch.mm goes to the BLAS, MKL here, whose code path on AMD CPUs may be slower)
    side = int(round(args.matmul ** 0.5))
    conv_in = torch.randn(1, args.matmul, side, side, device=device, dtype=dtype).contiguous(
        memory_format=torch.channels_last)
    conv = nn.Conv2d(args.matmul, args.matmul, 1, bias=False).to(device=device, dtype=dtype)
    conv = conv.to(memory_format=torch.channels_last).eval()
    conv_flops = 2 * args.matmul * args.matmul * side * side

    def conv_mm():
        with torch.inference_mode():
            conv(conv_in)

    times = _common.interleaved({"forward": forward, "matmul": matmul, "conv1x1": conv_mm}, args.repeats,
                                device=args.device)
    fwd_rate = flops / _common.median(times["forward"]) / 1e9
    fwd_best = flops / min(times["forward"]) / 1e9
    mm_rate = mm_flops / _common.median(times["matmul"]) / 1e9
    mm_best = mm_flops / min(times["matmul"]) / 1e9
    cv_rate = conv_flops / _common.median(times["conv1x1"]) / 1e9
    cv_best = conv_flops / min(times["conv1x1"]) / 1e9
    print(f"{args.backbone} forward, input {args.batch}x3x{args.size}x{args.size}: {flops / 1e9:.2f} GFLOP "
          f"(FlopCounterMode; convolutions counted analytically: {conv_count / 1e9:.2f} GFLOP), "
          f"{_common.fmt_times(times['forward'])} -> {fwd_rate:.1f} GFLOP/s (best {fwd_best:.1f})")
    print(f"matmul {args.matmul}x{args.matmul} {str(dtype).replace('torch.', '')}: {mm_flops / 1e9:.2f} GFLOP, "
          f"{_common.fmt_times(times['matmul'])} -> {mm_rate:.1f} GFLOP/s (best {mm_best:.1f})")
    print(f"the same product as a 1x1 convolution ({args.matmul} -> {args.matmul} channels, {side}x{side}): "
          f"{conv_flops / 1e9:.2f} GFLOP, {_common.fmt_times(times['conv1x1'])} -> {cv_rate:.1f} GFLOP/s "
          f"(best {cv_best:.1f})")
    peak, peak_best = max(mm_rate, cv_rate), max(mm_best, cv_best)
    which = "torch.mm" if mm_rate >= cv_rate else "1x1 convolution"
    print(f"forward at {100 * fwd_rate / mm_rate:.0f}% of the torch.mm rate and {100 * fwd_rate / cv_rate:.0f}% of "
          f"the 1x1-convolution rate (medians; best against best: {100 * fwd_best / peak_best:.0f}% of the higher)")
    _common.summary(f"ceiling: {args.backbone} forward {fwd_rate:.1f} GFLOP/s = {100 * fwd_rate / peak:.0f}% of the "
                    f"matmul peak {peak:.1f} GFLOP/s ({which}; torch.mm {mm_rate:.1f}) "
                    f"({args.device}{', amp' if amp else ''})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
