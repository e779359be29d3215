"""One EPS training step (ResNet-38): eps's step against the official step, same weights and data.

- eps: the pieces of the classifier's training (``build_classifier``, ``eps.training.make_optimizer`` with its four
  parameter groups, ``set_poly_lr``, ``eps.losses.classification_loss`` and
  ``saliency_loss``, the finite-loss check and the logged ``.item()`` values).
- official (a re-creation of halbielee/EPS ``module/train.py: train_eps`` with psa's
  ``PolyOptimizer`` and ``eps.py: get_eps_loss``): the same model, SGD whose third
  positional argument puts the weight decay in the momentum slot, poly decay inside
  ``step()``, ``F.multilabel_soft_margin_loss(pred[:, :-1], label)`` and the saliency loss
  with its boolean label maps and masked copies.

Both use the voc12 preset's optimiser values (lr 0.01, weight decay 5e-4, momentum 5e-4,
poly power 0.9) and seeded random inputs (image, saliency, labels). Figures: seconds per
step (median of interleaved repeats), the ratio, the largest difference of losses and
weights after the same steps from the same start (the two steps compute the same thing),
and peak memory: on CPU the peak resident set (VmHWM) of a fresh process running only that
path, and its growth over the process's size before the first step; on CUDA
``torch.cuda.max_memory_allocated`` of the step.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

NUM_CLASSES = 20
HYPER = {"lr": 0.01, "weight_decay": 5e-4, "momentum": 5e-4, "poly_power": 0.9, "tau": 0.4, "lam": 0.5}
TOTAL_STEPS = 20000


# ------------------------------------------------------------------------------ official path

class PolyOptimizer(torch.optim.SGD):
    """psa's ``tool/torchutils.PolyOptimizer``: poly decay applied inside ``step``."""

    def __init__(self, params, lr, weight_decay, max_step, momentum=0.9):
        super().__init__(params, lr, weight_decay)  # sic: weight_decay lands in SGD's momentum
        self.global_step = 0
        self.max_step = max_step
        self.momentum = momentum
        self.initial_lr = [group["lr"] for group in self.param_groups]

    def step(self, closure=None):
        if self.global_step < self.max_step:
            lr_mult = (1 - self.global_step / self.max_step) ** self.momentum
            for i in range(len(self.param_groups)):
                self.param_groups[i]["lr"] = self.initial_lr[i] * lr_mult
        super().step(closure)
        self.global_step += 1


def official_optimizer(model):
    groups = model.get_parameter_groups()
    lr, wd = HYPER["lr"], HYPER["weight_decay"]
    return PolyOptimizer([
        {"params": groups[0], "lr": lr, "weight_decay": wd},
        {"params": groups[1], "lr": 2 * lr, "weight_decay": 0},
        {"params": groups[2], "lr": 10 * lr, "weight_decay": wd},
        {"params": groups[3], "lr": 20 * lr, "weight_decay": 0},
    ], lr=lr, weight_decay=wd, max_step=TOTAL_STEPS, momentum=HYPER["poly_power"])


def get_eps_loss(cam, saliency, num_classes, label, tau, lam):
    """``eps.py: get_eps_loss`` of the official code (``.cuda()`` -> the cam's device)."""
    dev = cam.device
    b, c, h, w = cam.size()
    saliency = F.interpolate(saliency, size=(h, w))
    label_map = label.view(b, num_classes, 1, 1).expand(size=(b, num_classes, h, w)).bool()
    label_map_fg = torch.zeros(size=(b, num_classes + 1, h, w)).bool().to(dev)
    label_map_bg = torch.zeros(size=(b, num_classes + 1, h, w)).bool().to(dev)
    label_map_bg[:, num_classes] = True
    label_map_fg[:, :-1] = label_map.clone()
    sal_pred = F.softmax(cam, dim=1)
    iou_saliency = (torch.round(sal_pred[:, :-1].detach()) * torch.round(saliency)).view(b, num_classes, -1).sum(-1) / \
        (torch.round(sal_pred[:, :-1].detach()) + 1e-04).view(b, num_classes, -1).sum(-1)
    valid_channel = (iou_saliency > tau).view(b, num_classes, 1, 1).expand(size=(b, num_classes, h, w))
    label_fg_valid = label_map & valid_channel
    label_map_fg[:, :-1] = label_fg_valid
    label_map_bg[:, :-1] = label_map & (~valid_channel)
    fg_map = torch.zeros_like(sal_pred).to(dev)
    bg_map = torch.zeros_like(sal_pred).to(dev)
    fg_map[label_map_fg] = sal_pred[label_map_fg]
    bg_map[label_map_bg] = sal_pred[label_map_bg]
    fg_map = torch.sum(fg_map, dim=1, keepdim=True)
    bg_map = torch.sum(bg_map, dim=1, keepdim=True)
    bg_map = torch.sub(1, bg_map)
    sal_pred = fg_map * lam + bg_map * (1 - lam)
    loss = F.mse_loss(sal_pred, saliency)
    return loss, fg_map, bg_map, sal_pred


class OfficialStep:
    def __init__(self, model):
        self.model = model
        self.optimizer = official_optimizer(model)

    def losses(self, pred, cam, saliency, label):
        loss_cls = F.multilabel_soft_margin_loss(pred[:, :-1], label)
        loss_sal = get_eps_loss(cam, saliency, NUM_CLASSES, label, HYPER["tau"], HYPER["lam"])[0]
        loss = loss_cls + loss_sal
        logged = {"loss": loss.item(), "loss_cls": loss_cls.item(), "loss_sal": loss_sal.item()}
        return loss, logged

    def update(self):
        self.optimizer.step()

    def __call__(self, img, saliency, label):
        pred, cam = self.model(img)
        loss, logged = self.losses(pred, cam, saliency, label)
        self.optimizer.zero_grad()
        loss.backward()
        self.update()
        return logged["loss"]


# ------------------------------------------------------------------------------ eps path

class EpsStep:
    def __init__(self, model):
        from eps.training import make_optimizer

        self.model = model
        self.optimizer = make_optimizer(model, HYPER)
        self.step = 0

    def losses(self, logits, cam, saliency, label):
        from eps.losses import classification_loss, saliency_loss

        loss_cls = classification_loss(logits, label)
        loss_sal = saliency_loss(cam, saliency, label, HYPER["tau"], HYPER["lam"])[0]
        loss = loss_cls + loss_sal
        if not math.isfinite(loss.item()):
            raise RuntimeError("loss is not finite")
        logged = {"loss": loss.item(), "loss_cls": loss_cls.item(), "loss_sal": loss_sal.item()}
        return loss, logged

    def update(self):
        from eps.training import set_poly_lr

        set_poly_lr(self.optimizer, self.step, TOTAL_STEPS, HYPER["poly_power"])
        self.optimizer.step()
        self.step += 1

    def __call__(self, img, saliency, label):
        from eps.training import set_poly_lr

        set_poly_lr(self.optimizer, self.step, TOTAL_STEPS, HYPER["poly_power"])
        logits, cam = self.model(img)
        loss, logged = self.losses(logits, cam, saliency, label)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.step += 1
        return logged["loss"]


# ------------------------------------------------------------------------------ run

def make_model(args, device):
    from eps.models import build_classifier

    torch.manual_seed(args.seed)
    return build_classifier(args.backbone, NUM_CLASSES, background=True).to(device).train()


def make_batch(args, device):
    g = torch.Generator().manual_seed(args.seed + 1)
    n, s = args.batch, args.crop
    img = torch.randn(n, 3, s, s, generator=g)
    # saliency: a soft disc per image, as a detector's map
    yy, xx = torch.meshgrid(torch.arange(s), torch.arange(s), indexing="ij")
    centres = torch.rand(n, 2, generator=g) * s
    dist = ((yy[None] - centres[:, 0, None, None]) ** 2 + (xx[None] - centres[:, 1, None, None]) ** 2).sqrt()
    sal = torch.sigmoid((s / 4 - dist) / 3)[:, None]
    label = torch.zeros(n, NUM_CLASSES)
    for i in range(n):
        label[i, torch.randperm(NUM_CLASSES, generator=g)[: 1 + i % 2]] = 1
    return img.to(device), sal.to(device), label.to(device)


def proc_status(key: str) -> int:
    """VmRSS / VmHWM of this process in bytes (Linux); ru_maxrss elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def memory_child(args) -> int:
    """Run one path alone in this fresh process: print its memory figures as JSON."""
    device = torch.device(args.device)
    model = make_model(args, device)
    step = (OfficialStep if args.memory_child == "official" else EpsStep)(model)
    batch = make_batch(args, device)
    before = proc_status("VmRSS")
    for _ in range(2):
        step(*batch)
    peak = proc_status("VmHWM")
    print(json.dumps({"path": args.memory_child, "before": before, "peak": peak}))
    return 0


def cpu_memory(args, paths) -> dict:
    """Per path: median peak RSS and growth over `args.memory_repeats` fresh processes, the
    two paths alternating (one process's peak varies by ~100 MiB with the allocator)."""
    runs = {path: [] for path in paths}
    for _ in range(args.memory_repeats):
        for path in paths:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-child", path, "--backbone",
                   args.backbone, "--batch", str(args.batch), "--crop", str(args.crop), "--seed", str(args.seed),
                   "--device", "cpu", "--threads", str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            runs[path].append(json.loads(out.strip().splitlines()[-1]))
    return {path: {"peak": _common.median([r["peak"] for r in rs]),
                   "growth": _common.median([r["peak"] - r["before"] for r in rs]), "runs": len(rs)}
            for path, rs in runs.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="resnet38")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--crop", type=int, default=128)
    p.add_argument("--repeats", type=int, default=6, help="timed steps per path")
    p.add_argument("--part-repeats", type=int, default=30, help="timed loss / update parts per path")
    p.add_argument("--memory-repeats", type=int, default=3, help="fresh processes per path for the CPU memory")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default, the cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="small backbone, 64 px crops, 2 steps")
    p.add_argument("--memory-child", choices=["official", "eps"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory_child:
        _common.set_threads(args.threads)
        return memory_child(args)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"SKIP train_step: --device {args.device} but no CUDA device is available")
        return 0
    if args.quick:
        args.backbone, args.crop, args.repeats, args.part_repeats, args.memory_repeats = "small", 64, 2, 3, 1
    _common.set_threads(args.threads)
    _common.header("train_step", args.device, argv)
    device = torch.device(args.device)
    base = make_model(args, device)
    models = {"official": base, "eps": copy.deepcopy(base)}
    steps = {"official": OfficialStep(models["official"]), "eps": EpsStep(models["eps"])}
    batch = make_batch(args, device)

    # same start, same data, same dropout draws: the two steps must agree
    losses = {k: [] for k in steps}
    for name, step in steps.items():
        for i in range(2):
            torch.manual_seed(1000 + i)
            losses[name].append(step(*batch))
    loss_diff = max(abs(a - b) for a, b in zip(losses["official"], losses["eps"]))
    weight_diff = max(float((a.detach() - b.detach()).abs().max()) for a, b in
                      zip(models["official"].parameters(), models["eps"].parameters()))
    print(f"{args.backbone}, batch {args.batch}x3x{args.crop}x{args.crop}, device {args.device}: after 2 steps "
          f"from the same weights, max |loss difference| {loss_diff:.2e}, max |weight difference| {weight_diff:.2e}")

    mem = {}
    if device.type == "cuda":
        def measured(name):
            def run():
                torch.cuda.reset_peak_memory_stats()
                steps[name](*batch)
                mem[name] = torch.cuda.max_memory_allocated()
            return run
        funcs = {name: measured(name) for name in steps}
    else:
        funcs = {name: (lambda s=s: s(*batch)) for name, s in steps.items()}
    times = _common.interleaved(funcs, args.repeats, device=args.device, warmup=False)
    if device.type != "cuda":
        mem = cpu_memory(args, list(steps))
    for name in steps:
        if device.type == "cuda":
            m = f"peak CUDA memory {mem[name] / 2**20:.0f} MiB"
        else:
            m = (f"peak RSS {mem[name]['peak'] / 2**20:.0f} MiB, +{mem[name]['growth'] / 2**20:.0f} MiB over the "
                 f"process before its first step (medians of {mem[name]['runs']} fresh processes)")
        print(f"{name:<9} step: {_common.fmt_times(times[name])}; {m}")
    t_off, t_eps = _common.median(times["official"]), _common.median(times["eps"])
    ratio = t_off / t_eps

    # The network's forward and backward are the same code in both paths; what differs is
    # the losses (forward + backward on the CAMs) and the optimiser update. Timed alone,
    # interleaved, many times: a precise comparison where the whole step is noisy.
    with torch.no_grad():
        logits0, cam0 = base(batch[0])
    parts = {}
    for name, step in steps.items():
        def loss_part(step=step):
            logits = logits0.clone().requires_grad_(True)
            cam = cam0.clone().requires_grad_(True)
            loss, _ = step.losses(logits, cam, batch[1], batch[2])
            loss.backward()
        parts[f"{name} losses"] = loss_part
    for name, step in steps.items():
        for prm in step.model.parameters():
            if prm.requires_grad and prm.grad is None:
                prm.grad = torch.zeros_like(prm)
        parts[f"{name} update"] = step.update
    part_times = _common.interleaved(parts, args.part_repeats, device=args.device)
    own = {name: 1e3 * (_common.median(part_times[f"{name} losses"]) + _common.median(part_times[f"{name} update"]))
           for name in steps}
    for name in steps:
        print(f"{name:<9} own parts: losses {1e3 * _common.median(part_times[f'{name} losses']):.2f} ms "
              f"+ optimiser update {1e3 * _common.median(part_times[f'{name} update']):.1f} ms = {own[name]:.1f} ms "
              f"(medians of {args.part_repeats})")
    mem_text = (f"peak {mem['eps'] / 2**20:.0f} vs {mem['official'] / 2**20:.0f} MiB" if device.type == "cuda"
                else f"step memory +{mem['eps']['growth'] / 2**20:.0f} vs +{mem['official']['growth'] / 2**20:.0f} MiB "
                     f"(peak RSS {mem['eps']['peak'] / 2**20:.0f} vs {mem['official']['peak'] / 2**20:.0f} MiB)")
    # "no slower": eps's median step at most the official one; where the whole step says
    # otherwise only by noise (the network work is the same), the parts that differ decide
    if loss_diff >= 1e-4:
        verdict = "NOT met (the steps differ)"
    elif ratio >= 1.0:
        verdict = "met"
    elif own["eps"] <= own["official"]:
        verdict = (f"met on the parts that differ ({own['eps']:.1f} vs {own['official']:.1f} ms); "
                   f"whole-step medians {ratio:.2f}x within this machine's noise")
    else:
        verdict = "NOT met"
    _common.summary(f"train_step: {args.backbone} eps {t_eps:.3f} s vs official {t_off:.3f} s per step "
                    f"({ratio:.2f}x), {mem_text}, same losses (diff {loss_diff:.1e}); target no slower: {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
