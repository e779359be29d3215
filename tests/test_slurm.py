"""A real SLURM run: a tiny config through `snakemake --executor slurm` on a one-node cluster.

The cluster is started on localhost by ``../shared/tools/local-slurm/start-local-slurm.sh``
(as root; it apt-installs SLURM 22.05 and munge when missing, runs without job accounting,
and gives the node two fake GPUs, so `--gpus=1` jobs are accepted on a machine without one).
The run uses the workflow's SLURM profile (workflow/profiles/slurm) with its sizes scaled to
the tiny node, and `--slurm-status-command squeue` (no accounting). Every SLURM job of the
run is watched with `scontrol`: the GPU rules must have been given a GPU (two for the eps
classifier, trained data-parallel with `gpus: 2`), the other rules none.

Skipped, with the reason, where no cluster can be started: not root, the script or the
slurm executor plugin missing, or the script failing (no package mirror, say).
Set EPS_SLURM_KEEP=1 to leave a cluster this test started running afterwards.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml
from tiny_workflow import copy_workflow, snakemake_env, start_snakemake, tiny_config

ROOT = Path(__file__).resolve().parents[1]
GPU_RULES = {"train_classifier", "infer_cams", "train_segmenter", "predict"}
PARTITION, ACCOUNT = "debug", "ci"


def _cluster_up() -> bool:
    if not shutil.which("scontrol"):
        return False
    try:
        out = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return "UP" in out


@pytest.fixture(scope="session")
def slurm_cluster(shared_dir):
    """A running one-node SLURM cluster with 2 fake GPUs (started here if not running).

    Stopped only when the session ends: with the SLURM tools installed but no controller, every
    later `snakemake` start would wait ~9 s (the executor plugin asks `scontrol` at import)."""
    tools = shared_dir / "tools" / "local-slurm"
    start, stop = tools / "start-local-slurm.sh", tools / "stop-local-slurm.sh"
    if not start.is_file():
        pytest.skip(f"{start} not found: cannot start a local SLURM cluster")
    if os.geteuid() != 0:
        pytest.skip("the local SLURM cluster needs root (start-local-slurm.sh installs and starts daemons)")
    try:
        import snakemake_executor_plugin_slurm  # noqa: F401
    except ImportError:
        pytest.skip("snakemake-executor-plugin-slurm is not installed")
    was_up = _cluster_up()
    env = dict(os.environ, WITH_ACCOUNTING="0", FAKE_GPUS="2", PARTITION=PARTITION, CI_ACCOUNT=ACCOUNT)
    t0 = time.monotonic()
    try:
        proc = subprocess.run(["bash", str(start)], env=env, capture_output=True, text=True, timeout=1200)
    except subprocess.TimeoutExpired:
        pytest.skip(f"{start.name} did not finish in 1200 s")
    if proc.returncode != 0:
        tail = " | ".join((proc.stdout + proc.stderr).strip().splitlines()[-3:])
        pytest.skip(f"SLURM could not be started ({start.name} exited {proc.returncode}): {tail}")
    print(f"local SLURM up in {time.monotonic() - t0:.1f} s", flush=True)
    yield
    if not was_up and os.environ.get("EPS_SLURM_KEEP") != "1":
        subprocess.run(["bash", str(stop)], env=dict(os.environ, CANCEL_JOBS="1"), capture_output=True, timeout=300)


class JobWatch:
    """Polls `scontrol show job -o` while a run goes on: {job id: record} of jobs in `workdir`."""

    def __init__(self, workdir: Path, every: float = 1.0):
        self.workdir, self.every = str(workdir), every
        self.jobs: dict[str, dict] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=30)
        self.poll()

    def _run(self):
        while not self._stop.wait(self.every):
            self.poll()

    def poll(self):
        try:
            out = subprocess.run(["scontrol", "show", "job", "-o"], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            return
        for line in out.splitlines():
            fields = dict(re.findall(r"(\S+?)=(\S*)", line))
            if fields.get("WorkDir", "").startswith(self.workdir) and "JobId" in fields:
                self.jobs[fields["JobId"]] = fields

    def by_rule(self) -> dict[str, list[dict]]:
        out: dict[str, list[dict]] = {}
        for job in self.jobs.values():
            comment = job.get("Comment", "")
            rule = comment[len("rule_"):].split("_wildcards_")[0] if comment.startswith("rule_") else comment
            out.setdefault(rule, []).append(job)
        return out


def cluster_profile(dest: Path) -> Path:
    """The SLURM workflow profile with its memory and run times scaled to the tiny test node."""
    profile = yaml.safe_load((ROOT / "workflow" / "profiles" / "slurm" / "config.yaml").read_text())
    profile["default-resources"].update(mem_mb=500, runtime=20)
    for rule, res in profile["set-resources"].items():
        res.update(mem_mb=1000, runtime=30)
    profile["latency-wait"] = 10
    profile["retries"] = 0
    dest.mkdir(parents=True)
    (dest / "config.yaml").write_text(yaml.safe_dump(profile))
    return dest


def slurm_config(path: Path, base: Path) -> Path:
    """The tiny config, with data-parallel training of eps: one job, two GPUs (gloo on CPU here).

    One shard per stage: every SLURM job costs seconds of start-up (a Snakemake and an eps
    process on the node), so the per-image stages run one job each (9 jobs fewer than 2 shards)."""
    return tiny_config(path, base / "base-config.yaml", shards=1, variants__eps__gpus=2)


def run_snakemake(args, cwd: Path, timeout: float) -> tuple[int, str]:
    """Run snakemake; past `timeout` stop it with SIGINT (which makes it scancel its jobs)."""
    env = snakemake_env(EPS_SLURM_PARTITION=PARTITION, EPS_SLURM_ACCOUNT=ACCOUNT)
    log = cwd / "snakemake.out"
    with open(log, "w") as out:
        proc = start_snakemake(args, out, cwd=cwd, env=env)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)  # not SIGTERM: Snakemake cancels its SLURM jobs on SIGINT
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            rc = -1
    return rc, log.read_text()


@pytest.mark.slow
def test_tiny_run_through_slurm(slurm_cluster, tmp_path):
    work = tmp_path / "run"
    work.mkdir()
    wf = copy_workflow(tmp_path / "workflow")
    profile = cluster_profile(tmp_path / "profile")
    config = slurm_config(tmp_path / "tiny.yaml", wf)
    args = ["--workflow-profile", str(profile), "--slurm-status-command", "squeue",
            "--slurm-init-seconds-before-status-checks", "2",
            "-s", str(wf / "Snakefile"), "--directory", str(work), "--configfile", str(config)]
    t0 = time.monotonic()
    with JobWatch(work) as watch:
        rc, out = run_snakemake(args, tmp_path, timeout=1500)
    seconds = time.monotonic() - t0
    assert rc == 0, out[-5000:]
    print(f"SLURM run: {len(watch.jobs)} jobs in {seconds:.0f} s", flush=True)

    results = work / "results" / "synthetic"
    assert (results / "summary.csv").is_file()
    for variant in ("cam", "eps"):
        assert (results / variant / "classifier.pt").stat().st_size > 0
        assert (results / variant / "deeplab_small" / "model.pt").stat().st_size > 0
        assert (results / variant / "pseudo_masks" / "train" / "metrics.json").is_file()
        assert (results / variant / "segmenter" / "val" / "metrics.json").is_file()

    # every job went through SLURM, the GPU rules with a GPU and the others without, except
    # the Snakefile's localrules (seconds of bookkeeping), which Snakemake runs itself
    rules = watch.by_rule()
    assert GPU_RULES <= set(rules), sorted(rules)
    assert {"saliency", "pseudo_masks", "crf", "evaluate_masks"} <= set(rules)
    assert not {"index", "summary", "report_tables", "export_pngs"} & set(rules), sorted(rules)
    for rule, jobs in rules.items():
        for job in jobs:
            assert job["Partition"] == PARTITION
            gres = job.get("TresPerJob", "") + job.get("TresPerNode", "")
            if rule in GPU_RULES:
                want = 2 if job["Comment"] == "rule_train_classifier_wildcards_eps" else 1
                assert f"gpu:{want}" in gres, (rule, job)
            else:
                assert "gpu" not in gres, (rule, job)
            assert job["JobState"] in ("COMPLETED", "COMPLETING", "RUNNING"), (rule, job["JobState"])

    # a second run through SLURM has nothing to do
    rc, out = run_snakemake(args + ["-n"], tmp_path, timeout=300)
    assert rc == 0 and "Nothing to be done" in out, out[-3000:]
