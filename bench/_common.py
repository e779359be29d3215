"""Helpers shared by the benchmark scripts: machine description, interleaved timing,
the shared data folder, and the summary line every script prints last.

The scripts are run as ``python bench/<name>.py`` (``make bench`` runs them all), so this
module is imported by its bare name from the script's own folder.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/x.py` from anywhere: the checkout's eps first
    sys.path.insert(0, str(ROOT))


def shared_dir() -> Path | None:
    """``../shared`` beside the checkout (or $EPS_SHARED); None when absent."""
    path = Path(os.environ.get("EPS_SHARED", ROOT.parent / "shared"))
    return path if path.is_dir() else None


def snakemake_env() -> dict:
    """This process's environment with its interpreter's folder first on PATH, so the
    Snakemake it starts runs its jobs with the same Python (the checkout's venv)."""
    return dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def machine(device: str = "cpu") -> str:
    """One line: CPU model, usable cores, torch version and threads (GPU name on cuda)."""
    import torch

    text = (f"{cpu_model()}, {cores()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), python {platform.python_version()}")
    if device.startswith("cuda") and torch.cuda.is_available():
        text += f", GPU {torch.cuda.get_device_name()}"
    return text


def load() -> str:
    """The 1-minute load average against the core count: other work competing for the CPU."""
    try:
        return f"load average {os.getloadavg()[0]:.1f} on {cores()} cores"
    except (AttributeError, OSError):
        return "load average unknown"


def set_threads(threads: int) -> None:
    """torch's CPU threads; 0 keeps its default (the cores). On a shared machine one thread
    is far less disturbed by a neighbour: a parallel region waits for its slowest thread."""
    import torch

    if threads:
        torch.set_num_threads(int(threads))


def header(name: str, device: str = "cpu", argv=None) -> None:
    args = " ".join(sys.argv[1:] if argv is None else argv)
    print(f"== {name}: python bench/{name}.py {args}".rstrip())
    print(f"machine: {machine(device)}; {load()} at start")


def sync(device) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def interleaved(funcs: dict, repeats: int, device="cpu", warmup: bool = True) -> dict:
    """Time each callable ``repeats`` times, alternating between them (A B A B ...), so a
    busy neighbour on a shared machine slows both alike. Returns name -> list of seconds.
    ``warmup`` runs each once first, untimed (allocator, oneDNN kernel choice, page cache)."""
    if warmup:
        for f in funcs.values():
            f()
            sync(device)
    times = {name: [] for name in funcs}
    for r in range(repeats):
        order = list(funcs.items())
        if r % 2:  # alternate who goes first, too
            order.reverse()
        for name, f in order:
            sync(device)
            t0 = time.perf_counter()
            f()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def classifier_step(model, optimizer, batch, target, autocast=None):
    """One training step of a C+1-output classifier as a callable for `interleaved`: forward
    (under autocast to `autocast`, a dtype, if given), the multi-label loss of the C class
    logits in float32, backward, optimizer step."""
    import torch

    def step():
        with torch.autocast(batch.device.type, dtype=autocast, enabled=autocast is not None):
            logits, _ = model(batch)
        loss = torch.nn.functional.multilabel_soft_margin_loss(logits.float()[:, :-1], target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def median(xs) -> float:
    return float(statistics.median(xs))


def fmt_times(xs) -> str:
    return f"median {median(xs):.3f} s (min {min(xs):.3f}, max {max(xs):.3f}, n={len(xs)})"


def summary(text: str) -> None:
    """The last line of every benchmark: ``SUMMARY <name>: ...`` (after the load at the end)."""
    print(f"{load()} at the end")
    print(f"SUMMARY {text}", flush=True)
