"""Scale of the workflow's DAG: a VOC-size dataset (10,582 train_aug ids) as a dry run.

The job count is set by the shard count (config `shards`), not by the image count: every
per-image stage is scattered over `shards` shards. This builds the `configs/voc12.yaml` run
on a VOC-type dataset whose root is a temporary folder holding only the split lists
(ImageSets/Segmentation/{train_aug,train,val}.txt; a dry run reads no image), runs
`snakemake -n` on it, and prints the jobs per rule, `jobs: N` and, last, the seconds the
dry run took (the whole `python -m snakemake -n` process: start-up, parsing, DAG).

The ids are those of ../shared/data/voc12_masks/metadata/train_aug.txt (train.txt, val.txt
beside it) when present, else made-up VOC-style ids of the same counts.

    python bench/dag.py                 # 10,582 ids at the preset's 16 shards
    python bench/dag.py --ids 100       # the same DAG for 100 ids
    python bench/dag.py --shards 64
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

ROOT = _common.ROOT
COUNTS = {"train_aug": 10582, "train": 1464, "val": 1449}  # VOC 2012 (+ SBD) split sizes


def split_ids(limit: int | None) -> dict[str, list[str]]:
    """{split: ids}: the real VOC lists when ../shared has them, else made-up ids; at most `limit` each."""
    shared = _common.shared_dir()
    meta = shared / "data" / "voc12_masks" / "metadata" if shared else None
    out = {}
    for split, count in COUNTS.items():
        path = meta / f"{split}.txt" if meta else None
        if path is not None and path.is_file():
            ids = path.read_text().split()
        else:
            ids = [f"2008_{i:06d}" for i in range(count)]
        out[split] = ids[:limit] if limit else ids
    return out


def write_dataset(folder: Path, ids: dict[str, list[str]]) -> Path:
    """A VOC-type root holding only the split lists."""
    lists = folder / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True, exist_ok=True)
    for split, names in ids.items():
        (lists / f"{split}.txt").write_text("\n".join(names) + "\n")
    return folder


def dry_run(workdir: Path, ids: dict[str, list[str]], shards: int | None = None,
            configfile: Path = ROOT / "configs" / "voc12.yaml") -> tuple[int, dict[str, int], float, str]:
    """Run `snakemake -n` on the preset over `ids`; return (jobs, jobs per rule, seconds, output)."""
    cfg = yaml.safe_load(configfile.read_text())
    cfg["dataset"]["root"] = str(write_dataset(workdir / "data", ids))
    if shards:
        cfg["shards"] = shards
    config = workdir / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    env = _common.snakemake_env()
    cmd = [sys.executable, "-m", "snakemake", "-n", "--quiet", "rules", "--cores", "8",
           "-s", str(ROOT / "Snakefile"), "--directory", str(workdir), "--configfile", str(config)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t0
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise SystemExit(f"snakemake -n failed ({proc.returncode}):\n{out[-3000:]}")
    per_rule = {}
    table = out[out.index("Job stats:"):] if "Job stats:" in out else ""
    for line in table.splitlines()[3:]:
        m = re.match(r"^(\w+)\s+(\d+)$", line.strip())
        if not m:
            break
        per_rule[m.group(1)] = int(m.group(2))
    total = per_rule.pop("total", None)
    if total is None:
        raise SystemExit(f"no job stats in the output of snakemake -n:\n{out[-3000:]}")
    return total, per_rule, seconds, out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ids", type=int, default=None, help="use the first N ids of each split (default: all)")
    ap.add_argument("--shards", type=int, default=None, help="config shards (default: the preset's)")
    ap.add_argument("--quick", action="store_true", help="100 ids (for the test suite)")
    args = ap.parse_args(argv)
    limit = 100 if args.quick and args.ids is None else args.ids
    print(f"== dag: python bench/dag.py {' '.join(sys.argv[1:] if argv is None else argv)}".rstrip())
    print(f"machine: {_common.cpu_model()}, {_common.cores()} cores, python {sys.version.split()[0]}")
    ids = split_ids(limit)
    with tempfile.TemporaryDirectory(prefix="eps-dag-") as tmp:
        total, per_rule, seconds, _ = dry_run(Path(tmp), ids, args.shards)
    shards = args.shards or yaml.safe_load((ROOT / "configs" / "voc12.yaml").read_text())["shards"]
    print(f"dataset: {len(ids['train_aug'])} train_aug ids ({', '.join(f'{s} {len(v)}' for s, v in ids.items())}), "
          f"shards: {shards}")
    for rule, n in per_rule.items():
        print(f"  {rule:<20} {n:>5}")
    print(f"jobs: {total}")
    _common.summary(f"dag: jobs: {total} for {len(ids['train_aug'])} ids at {shards} shards; "
                    f"seconds: {seconds:.2f}")


if __name__ == "__main__":
    main()
