"""The image index (`index.csv`, `classes.json`, `ids/{split}.txt`): writing, reading, sharding.

Every later stage reads the dataset only through the index, built once by ``eps.data.build``
from the dataset readers, so the rest of the pipeline never knows which layout the images
came from (and does not import the readers).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from eps.data.io import atomic_path
from eps.data.rows import id_problem, make_row  # noqa: F401  (make_row: re-exported)
from eps.errors import EpsError, file_error

COLUMNS = ["id", "image", "mask", "saliency", "context", "labels", "splits"]



def _as_list(value) -> list:
    if isinstance(value, str):
        return value.split()
    return list(value)


# ---------------------------------------------------------------------------- writing

def write_index(rows: Sequence[dict], classes: Sequence[str], out_csv, *, dataset: str,
                contexts: Sequence[str] = ()) -> None:
    """Write index.csv, classes.json and ids/{split}.txt beside it.

    index.csv is written last, so its presence means the whole index is complete.
    """
    out_csv = Path(out_csv)
    classes = [str(c) for c in classes]
    if not rows:
        raise file_error(out_csv, "no images to index")
    seen: set[str] = set()
    split_ids: dict[str, list[str]] = {}
    records = []
    for row in rows:
        id_ = str(row["id"])
        problem = id_problem(id_)
        if problem:
            raise file_error(out_csv, problem)
        if id_ in seen:
            raise file_error(out_csv, f"duplicate id {id_!r}")
        seen.add(id_)
        labels = sorted({int(c) for c in _as_list(row.get("labels", ()))})
        bad = [c for c in labels if not 0 <= c < len(classes)]
        if bad:
            raise file_error(out_csv, f"id {id_!r}: label {bad[0]} outside 0..{len(classes) - 1}")
        splits = _as_list(row.get("splits", ()))
        for s in splits:
            split_ids.setdefault(s, []).append(id_)
        records.append({
            "id": id_, "image": str(row["image"]), "mask": str(row.get("mask") or ""),
            "saliency": str(row.get("saliency") or ""), "context": str(row.get("context") or ""),
            "labels": " ".join(map(str, labels)), "splits": " ".join(splits),
        })
    for s in split_ids:
        if id_problem(s) or not s.strip() or s != s.split()[0]:
            raise file_error(out_csv, f"bad split name {s!r}")

    out_csv.unlink(missing_ok=True)  # a failure below must not leave an old index looking current
    ids_dir = out_csv.parent / "ids"
    ids_dir.mkdir(parents=True, exist_ok=True)
    for stale in ids_dir.glob("*.txt"):
        if stale.stem not in split_ids:
            stale.unlink()
    for split, ids in split_ids.items():
        with atomic_path(ids_dir / f"{split}.txt") as tmp:
            tmp.write_text("".join(i + "\n" for i in ids))
    meta = {"classes": classes, "contexts": [str(c) for c in contexts], "dataset": dataset}
    with atomic_path(out_csv.parent / "classes.json") as tmp:
        tmp.write_text(json.dumps(meta, indent=1) + "\n")
    with atomic_path(out_csv) as tmp:
        pd.DataFrame(records, columns=COLUMNS).to_csv(tmp, index=False)


# ---------------------------------------------------------------------------- reading

def read_index(path) -> pd.DataFrame:
    """Read index.csv; `labels` becomes list[int] and `splits` list[str] per row."""
    path = Path(path)
    if not path.is_file():
        raise file_error(path, "index not found (run the index stage first)")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as exc:
        raise file_error(path, f"cannot read index CSV ({type(exc).__name__}: {exc})") from None
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise file_error(path, f"missing columns {missing}")
    # ids become file and HDF5 names downstream: a hand-edited index is checked like a built one
    seen: set[str] = set()
    for line, id_ in enumerate(df["id"], 2):
        problem = id_problem(id_) or (f"duplicate id {id_!r}" if id_ in seen else None)
        if problem:
            raise file_error(path, f"line {line}: {problem}")
        seen.add(id_)
    try:
        df["labels"] = [[int(c) for c in s.split()] for s in df["labels"]]
    except ValueError:
        raise file_error(path, "column 'labels' holds a non-integer value") from None
    df["splits"] = [s.split() for s in df["splits"]]
    return df


def read_classes(index_csv) -> dict:
    """classes.json beside `index_csv`: {"classes": [...], "contexts": [...], "dataset": name}."""
    path = Path(index_csv).parent / "classes.json"
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise file_error(path, "file not found (run the index stage first)") from None
    except (OSError, ValueError) as exc:
        raise file_error(path, f"cannot read JSON ({exc})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("classes"), list):
        raise file_error(path, "expected an object with a 'classes' list")
    meta.setdefault("contexts", [])
    meta.setdefault("dataset", "")
    return meta


def labels_of(df: pd.DataFrame, num_classes: int) -> np.ndarray:
    """(N, C) float32 multi-hot image-level labels of the rows of `df`."""
    out = np.zeros((len(df), num_classes), np.float32)
    for i, labels in enumerate(df["labels"]):
        for c in _as_list(labels):
            c = int(c)
            if not 0 <= c < num_classes:
                raise EpsError(f"index: label {c} outside 0..{num_classes - 1} "
                               f"(id {df['id'].iloc[i]!r})")
            out[i, c] = 1.0
    return out


def split_rows(df: pd.DataFrame, split: str) -> pd.DataFrame:
    """The rows that belong to `split`, in index order (re-numbered from 0)."""
    member = [split in _as_list(s) for s in df["splits"]]
    if not any(member):
        available = sorted({s for ss in df["splits"] for s in _as_list(ss)})
        raise EpsError(f"index: unknown split {split!r} (available: {', '.join(available)})")
    return df[member].reset_index(drop=True)


def split_ground_truth(index_csv, split: str) -> tuple[list[str], dict, dict]:
    """The ids of `split` and their ground truth, as the index records them.

    Returns (ids, masks {id: path}, contexts {id: path} of the ids that have one). Evaluation
    reads masks from here, so it needs no knowledge of dataset layouts.
    """
    rows = split_rows(read_index(index_csv), split)
    missing = [i for i, m in zip(rows["id"], rows["mask"]) if not m]
    if missing:
        raise file_error(Path(index_csv), f"{len(missing)} id(s) of split {split!r} have no ground-truth mask, "
                                    f"e.g. {missing[0]!r}: nothing to evaluate against")
    ids = list(rows["id"])
    masks = dict(zip(ids, rows["mask"]))
    contexts = {i: c for i, c in zip(ids, rows["context"]) if c}
    return ids, masks, contexts


def shard_rows(rows, index: int, count: int):
    """The `index`-th (1-based) of `count` contiguous near-equal chunks, numpy.array_split order.

    Works on a DataFrame (returns one, re-numbered) or any sequence (returns a list).
    """
    if not (isinstance(count, int) and isinstance(index, int) and 1 <= index <= count):
        raise EpsError(f"shard: need 1 <= index <= count, got {index}-of-{count}")
    chunk = np.array_split(np.arange(len(rows)), count)[index - 1]
    if isinstance(rows, pd.DataFrame):
        return rows.iloc[chunk].reset_index(drop=True)
    return [rows[i] for i in chunk]


def parse_scatteritem(item: str) -> tuple[int, int]:
    """"2-of-4" (Snakemake's scatteritem, optionally prefixed "shard-") -> (2, 4)."""
    m = re.fullmatch(r"(?:shard-)?(\d+)-of-(\d+)", str(item).strip())
    if not m or not 1 <= int(m.group(1)) <= int(m.group(2)):
        raise EpsError(f"shard: {item!r} is not of the form 'i-of-n' with 1 <= i <= n")
    return int(m.group(1)), int(m.group(2))


# ---------------------------------------------------------------------------- building
