"""Running snakemake from the tests (every Snakemake subprocess a test starts itself), a private
copy of the workflow and a tiny config over it (tests/test_workflow.py, test_evaluate_index.py,
test_config_schema.py, test_staleness.py, test_slurm.py, reliability/test_workflow_recovery.py,
reliability/test_bad_input.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def snakemake_env(**extra: str) -> dict:
    """os.environ with this Python's bin first on PATH (the rules call `eps`), plus `extra`."""
    env = dict(os.environ, **extra)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def snakemake(args, cwd=ROOT, timeout=600, env=None) -> subprocess.CompletedProcess:
    """`python -m snakemake ARGS` in `cwd`, output captured; `env` defaults to snakemake_env()."""
    return subprocess.run([*SNAKEMAKE, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=snakemake_env() if env is None else env)


def start_snakemake(args, log, cwd=ROOT, env=None, **popen) -> subprocess.Popen:
    """The same run in the background, stdout and stderr into the open file `log`, for the tests
    that interrupt it (`popen`: more subprocess.Popen arguments)."""
    return subprocess.Popen([*SNAKEMAKE, *map(str, args)], cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                            env=snakemake_env() if env is None else env, **popen)


def copy_workflow(dest: Path) -> Path:
    """Snakefile, workflow/, eps/ (whose sources the rules hash) and envs/ as they are now: a
    minutes-long run is not disturbed by edits to the checkout meanwhile."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(ROOT / "Snakefile", dest / "Snakefile")
    # not as config.yaml: in the working directory the Snakefile's `configfile:` would load it
    # and --configfile would only extend it (its other variants would join the run)
    shutil.copy2(ROOT / "config.yaml", dest / "base-config.yaml")
    for folder in ("workflow", "eps", "envs"):
        shutil.copytree(ROOT / folder, dest / folder, ignore=ignore)
    return dest


TINY = Path(__file__).resolve().parent / "tiny.yaml"


def _merge(into: dict, extra: dict) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def tiny_config(path: Path, base: Path, **changes) -> Path:
    """tests/tiny.yaml over the config file `base` (a copied workflow's `base-config.yaml`, or
    config.yaml), the variants it lists only; `changes` set nested keys (`crf__bi_w=5` sets
    crf.bi_w; `variants=...` replaces the selection). Written to `path`."""
    cfg = yaml.safe_load(Path(base).read_text())
    tiny = yaml.safe_load(TINY.read_text())
    keep = tiny.pop("variants")
    cfg["synth"] = tiny.pop("synth")  # the whole world's block: config.yaml's scales and miss rates do not join
    _merge(cfg, tiny)
    cfg["variants"] = {name: cfg["variants"][name] for name in keep}
    for dotted, value in changes.items():
        *parents, key = dotted.split("__")
        block = cfg
        for p in parents:
            block = block[p]
        block[key] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path
