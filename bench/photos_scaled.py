"""The real-photo preset at the size of a larger VOC-layout folder: a folder of `voc12_photos`
repeated under new ids (symbolic links) until it has `--train` train and `--val` val photos,
and the overlay that points `configs/voc12_cpu.yaml` at it.

For run time and memory only: the copies add no new photos, so the scores of a run on it say
nothing that the original 822 + 140 do not. A copy's id is the photo's id with `_c1`, `_c2`, ...
appended; its image, mask, saliency map and labels are the photo's.

    python bench/photos_scaled.py --train 2050 --val 280 --out /tmp/photos_2050
    snakemake --cores 2 --configfile configs/voc12_cpu.yaml /tmp/photos_2050/overlay.yaml

Without `--out`, a new temporary folder (links only; remove it when done).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

import numpy as np  # noqa: E402

FOLDERS = (("JPEGImages", ".jpg"), ("SegmentationClassAug", ".png"), ("SALImages", ".png"))


def repeated_ids(ids: list[str], count: int) -> list[tuple[str, str]]:
    """(new id, source id) pairs: the ids themselves first, then copies `_c1`, `_c2`, ... in order."""
    pairs = []
    for k in range(count):
        source = ids[k % len(ids)]
        copy = k // len(ids)
        pairs.append((source if copy == 0 else f"{source}_c{copy}", source))
    return pairs


def build(source: Path, out: Path, counts: dict[str, int], name: str) -> Path:
    """The scaled folder under `out/voc` and `out/overlay.yaml`; refuses an `out` that holds
    anything, and checks every source file before it writes."""
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out}: not empty; give a new folder")
    labels = np.load(source / "cls_labels.npy", allow_pickle=True).item()
    plan = {}
    for split, count in counts.items():
        ids = (source / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()
        if not ids:
            raise SystemExit(f"{source}/ImageSets/Segmentation/{split}.txt: no ids")
        for i in ids:
            missing = [f"{folder}/{i}{ext}" for folder, ext in FOLDERS if not (source / folder / f"{i}{ext}").is_file()]
            if i not in labels or missing:
                raise SystemExit(f"{source}: {i} lacks {', '.join(missing) or 'a label in cls_labels.npy'}")
        plan[split] = repeated_ids(ids, count)
    root = out / "voc"
    for folder, _ in FOLDERS:
        (root / folder).mkdir(parents=True)
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    new_labels = {}
    for split, pairs in plan.items():
        for new, old in pairs:
            for folder, ext in FOLDERS:
                (root / folder / f"{new}{ext}").symlink_to((source / folder / f"{old}{ext}").resolve())
            new_labels[new] = labels[old]
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("".join(f"{n}\n" for n, _ in pairs))
    np.save(root / "cls_labels.npy", new_labels)
    overlay = out / "overlay.yaml"
    overlay.write_text(f"dataset: {{name: {json.dumps(name)}, root: {json.dumps(str(root.resolve()))}}}\n")
    return overlay


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a tiny folder (10 train, 4 val; the test suite)")
    parser.add_argument("--train", type=int, default=2050)
    parser.add_argument("--val", type=int, default=280)
    parser.add_argument("--out", type=Path, default=None,
                        help="a new or empty folder (default: a new temporary folder)")
    parser.add_argument("--name", default=None, help="dataset.name of the overlay (default: photos_<train>)")
    args = parser.parse_args(argv)
    _common.header("photos_scaled", argv=argv)
    shared = _common.shared_dir()
    source = shared / "data" / "voc12_photos" if shared else None
    if source is None or not source.is_dir():
        _common.summary("photos_scaled: skipped (no ../shared/data/voc12_photos)")
        return
    counts = {"train": 10, "val": 4} if args.quick else {"train": args.train, "val": args.val}
    out = args.out or Path(tempfile.mkdtemp(prefix="eps-photos-scaled-"))
    overlay = build(source, out, counts, args.name or f"photos_{counts['train']}")
    print(f"overlay: {overlay}")
    _common.summary(f"photos_scaled: {counts['train']} train and {counts['val']} val photos under "
                    f"{out / 'voc'}, overlay {overlay}")


if __name__ == "__main__":
    main()
