"""Rerunning only what is stale, and a DAG whose size does not grow with the dataset.

One tiny end-to-end run (module fixture, in a copy of Snakefile + workflow/ + eps/ so the
tests can edit the eps sources the rules hash) is followed by dry runs after one change each;
the jobs a dry run lists are what a real run would redo:

- nothing changed: nothing to do;
- a CRF parameter: the CRF and what follows, nothing upstream;
- tau of the eps variant: its classifier and what follows; not saliency, not the cam variant;
- eps/metrics.py edited: the evaluations and the prediction stage, which scores its shard
  (the rules hash what their modules import: workflow/stage_code.py), and what follows;
- eps/train.py edited: the classifiers' training for its code, and what follows from their weights.

One change (CRF) is also rerun for real, in a copy of the finished run, to check that the
dry run told the truth: the CRF outputs are new, everything upstream is untouched, and a
further dry run has nothing to do.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tiny_workflow
from tiny_workflow import copy_workflow, tiny_config

ROOT = Path(__file__).resolve().parents[1]
RESULTS = "results/synthetic"


def snakemake(work: Path, config: Path, *args: str, timeout: int = 900) -> str:
    proc = tiny_workflow.snakemake(["--cores", "2", "--configfile", config, *args], cwd=work, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return out


PARAMS = "Params have changed since last execution"
FOLLOWS = "Input files updated by another job"


def plan(work: Path, config: Path, reasons: dict | None = None) -> dict[str, set[str]]:
    """What a run would do now: {rule: outputs of its jobs} from `snakemake -n` ({} = nothing).

    With `reasons` given, fill it with {rule: the reasons Snakemake gives for its jobs}
    (the text before the first colon: PARAMS, FOLLOWS, ...)."""
    out = snakemake(work, config, "-n")
    jobs: dict[str, set[str]] = {}
    why: dict[str, set[str]] = {}
    rule = None
    for line in out.splitlines():
        text = line.strip()
        m = re.match(r"^(?:local)?rule (\w+):$", text)
        if m:
            rule = m.group(1)
            jobs.setdefault(rule, set())
            why.setdefault(rule, set())
        elif rule and text.startswith("output:"):
            jobs[rule] |= {p.strip() for p in text.split(":", 1)[1].split(",")}
        elif rule and text.startswith("reason:"):
            why[rule] |= {r.split(":")[0].strip() for r in text.split(":", 1)[1].split(";")}
    jobs.pop("all", None)
    why.pop("all", None)
    if not jobs:
        assert "Nothing to be done" in out, out[-2000:]
    if reasons is not None:
        reasons.update(why)
    return jobs


def only_followers(reasons: dict, *stale: str) -> None:
    """The `stale` rules rerun for their own parameters (or code hash); every other job only
    because an input of it is redone."""
    for rule, why in reasons.items():
        if rule in stale:  # a job of it whose input is redone too names that reason instead
            assert PARAMS in why and why <= {PARAMS, FOLLOWS}, (rule, why)
        else:
            assert why == {FOLLOWS}, (rule, why)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished tiny run in a private copy of the workflow; returns (work dir, its config)."""
    work = copy_workflow(tmp_path_factory.mktemp("stale"))
    config = tiny_config(work / "tiny.yaml", work / "base-config.yaml")
    snakemake(work, config)
    assert (work / RESULTS / "summary.csv").is_file()
    return work, config


@pytest.fixture
def edited(finished):
    """Append a comment to an eps module of the copy; restored afterwards."""
    work, _ = finished
    saved = {}

    def edit(rel: str):
        path = work / rel
        saved.setdefault(path, path.read_text())
        path.write_text(saved[path] + "\n# an edit\n")

    yield edit
    for path, text in saved.items():
        path.write_text(text)


VARIANTS = {"cam", "eps"}
UPSTREAM = {"synth", "index", "saliency"}  # the dataset and its saliency: never redone by these changes


def variants_of(outputs) -> set[str]:
    """The variant folders the outputs lie in (summary.csv, report figures: none)."""
    return {Path(p).relative_to(RESULTS).parts[0] for p in outputs} & VARIANTS


def split_jobs(jobs: dict[str, set[str]]) -> tuple[set[str], set[str]]:
    """(rules with per-variant outputs, the other rules): the latter gather across variants
    (summary, report tables and figures) and follow any change of what they gather."""
    per_variant = {rule for rule, outputs in jobs.items() if variants_of(outputs)}
    return per_variant, set(jobs) - per_variant


@pytest.mark.slow
def test_an_unchanged_run_has_nothing_to_do(finished):
    work, config = finished
    assert plan(work, config) == {}


@pytest.mark.slow
def test_crf_parameters_rerun_the_crf_and_what_follows(finished, tmp_path):
    work, _ = finished
    config = tiny_config(tmp_path / "crf.yaml", work / "base-config.yaml", crf__bi_w=5)
    reasons = {}
    jobs = plan(work, config, reasons)
    per_variant, gathering = split_jobs(jobs)
    assert per_variant == {"crf", "export_pngs", "evaluate_masks"}
    assert "summary" in gathering and not gathering & UPSTREAM
    # the parameters changed for the CRF alone; the rest follows its new files
    # (`--list-changes params` cannot tell: Snakemake 9.27 lists every output there)
    only_followers(reasons, "crf")
    # of the evaluations, only those of the CRF stage
    assert {Path(p).parts[-3] for p in jobs["evaluate_masks"]} == {"crf"}
    assert variants_of(jobs["crf"]) == {"cam", "eps"}


@pytest.mark.slow
def test_tau_reruns_the_classifier_and_what_follows_not_saliency(finished, tmp_path):
    work, _ = finished
    reasons = {}
    jobs = plan(work, tiny_config(tmp_path / "tau.yaml", work / "base-config.yaml", variants__eps__tau=0.3), reasons)
    only_followers(reasons, "train_classifier")
    per_variant, gathering = split_jobs(jobs)
    assert {"train_classifier", "infer_cams", "pseudo_masks", "crf", "evaluate_masks", "train_segmenter",
            "predict"} <= per_variant
    assert "summary" in gathering and not set(jobs) & UPSTREAM
    # only the eps variant: the cam baseline does not use tau
    for rule in per_variant:
        assert variants_of(jobs[rule]) == {"eps"}, (rule, jobs[rule])


@pytest.mark.slow
def test_editing_metrics_reruns_what_imports_it(finished, edited):
    work, config = finished
    edited("eps/metrics.py")
    reasons = {}
    jobs = plan(work, config, reasons)
    only_followers(reasons, "evaluate_masks", "predict")
    per_variant, gathering = split_jobs(jobs)
    assert per_variant == {"evaluate_masks", "predict", "export_pngs"}  # not the training
    assert "summary" in gathering and not gathering & UPSTREAM
    metrics = [p for p in jobs["evaluate_masks"] if p.endswith("metrics.json")]
    assert len(metrics) == 2 * 3  # 2 variants x 3 stages (pseudo_masks, crf, segmenter)


@pytest.mark.slow
def test_editing_train_reruns_training_and_what_follows(finished, edited):
    work, config = finished
    edited("eps/train.py")
    reasons = {}
    jobs = plan(work, config, reasons)
    per_variant, gathering = split_jobs(jobs)
    # training reruns for its code; after it everything does (Snakemake names one reason per
    # job: that an input is redone, before that its own code hash changed too)
    assert reasons["train_classifier"] == {PARAMS}
    assert {"train_classifier", "infer_cams", "train_segmenter", "predict", "pseudo_masks",
            "evaluate_masks"} <= per_variant
    assert "summary" in gathering and not set(jobs) & UPSTREAM


@pytest.mark.slow
def test_a_real_rerun_redoes_exactly_what_the_dry_run_said(finished, tmp_path):
    src, _ = finished
    work = tmp_path / "copy"
    shutil.copytree(src, work, symlinks=True)  # copy2: mtimes and Snakemake's metadata kept
    config = tiny_config(work / "crf.yaml", work / "base-config.yaml", crf__bi_w=5)
    predicted = plan(work, config)
    assert split_jobs(predicted)[0] == {"crf", "export_pngs", "evaluate_masks"}
    before = {p: p.stat().st_mtime_ns for p in (work / RESULTS).rglob("*") if p.is_file()}
    snakemake(work, config)
    changed = {p.relative_to(work).as_posix() for p in (work / RESULTS).rglob("*")
               if p.is_file() and before.get(p) != p.stat().st_mtime_ns}
    changed = {c for c in changed if "/logs/" not in c and "/benchmarks/" not in c}
    expected = set().union(*predicted.values())
    # every output the dry run listed was rewritten (directories: the PNGs inside them) ...
    for out in expected:
        assert any(c == out or c.startswith(out + "/") for c in changed), out
    # ... and nothing else was
    for c in changed:
        assert any(c == out or c.startswith(out + "/") for out in expected), c
    assert plan(work, config) == {}


def dag_jobs(*args: str) -> int:
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "dag.py"), *args], capture_output=True, text=True,
                          timeout=300, env=tiny_workflow.snakemake_env())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return int(re.search(r"^jobs: (\d+)$", proc.stdout, re.M).group(1))


def test_job_count_is_set_by_shards_not_images():
    """A VOC-size dataset (10,582 train_aug ids) has as many jobs as 100 ids at the same shard count."""
    full = dag_jobs("--shards", "4")
    assert full == dag_jobs("--shards", "4", "--ids", "100")
    assert dag_jobs("--shards", "8", "--ids", "100") > full
