"""CSNet from the authors' checkpoint against the authors' own maps, and its speed.

Data: ``../shared/data/voc12_photos`` (``JPEGImages/*.jpg``; ``SALImages/*.png``, the maps
the authors' code computed from csnet-L-x2) and ``../shared/weights/csnet/`` (the released
checkpoints, test and benchmark use only: CC BY-NC-SA 4.0, never shipped).

Figures: the mean absolute difference to SALImages in grey levels (over all pixels of all
images), the fraction of pixels within 2 levels, the worst image's mean difference, and
images per second of ``eps.saliency.csnet``'s predictor (`predict.batch`, JPEG decoding
included, resize and uint8 conversion included) over all images at their VOC size.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402  (puts the checkout first on sys.path)

TARGET_IMAGES_PER_S = 10.0  # on 2 CPU threads


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default=None, help="checkpoint (default ../shared/weights/csnet/csnet-L-x2.pth.tar)")
    parser.add_argument("--photos", default=None, help="voc12_photos folder (default ../shared/data/voc12_photos)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--limit", type=int, default=0, help="first N images only (0: all)")
    parser.add_argument("--quick", action="store_true", help="8 images (tests/test_bench.py style smoke run)")
    args = parser.parse_args(argv)
    shared = _common.shared_dir()
    if shared is None and (args.weights is None or args.photos is None):
        print("SUMMARY saliency_csnet: skipped (no ../shared beside the checkout; give --weights and --photos)")
        return 0
    weights = Path(args.weights or shared / "weights" / "csnet" / "csnet-L-x2.pth.tar")
    photos = Path(args.photos or shared / "data" / "voc12_photos")
    _common.set_threads(args.threads)
    _common.header("saliency_csnet", args.device, argv)

    from eps.data.io import read_image, read_saliency
    from eps.saliency import csnet

    paths = sorted((photos / "JPEGImages").glob("*.jpg"))
    limit = 8 if args.quick else args.limit
    if limit:
        paths = paths[:limit]
    predict = csnet.predictor(csnet.load_model(weights), args.device)
    predict.batch([read_image(paths[0])])  # warm-up
    total = within = count = 0
    worst = (0.0, "")
    start = time.perf_counter()
    maps = []
    for first in range(0, len(paths), csnet.BATCH):
        chunk = paths[first:first + csnet.BATCH]
        maps += zip(chunk, predict.batch([read_image(p) for p in chunk]))
    _common.sync(args.device)
    seconds = time.perf_counter() - start
    for path, sal in maps:
        ref = read_saliency(photos / "SALImages" / f"{path.stem}.png")
        diff = np.abs(sal.astype(np.int16) - ref.astype(np.int16))
        total += int(diff.sum())
        within += int(np.count_nonzero(diff <= 2))
        count += diff.size
        worst = max(worst, (float(diff.mean()), path.stem))
    rate = len(paths) / seconds
    print(f"images: {len(paths)}; checkpoint {weights.name}")
    print(f"mean |difference| to SALImages: {total / count:.5f} grey levels; within 2 levels: "
          f"{100 * within / count:.4f}% of pixels; worst image {worst[1]} {worst[0]:.4f}")
    print(f"speed: {rate:.1f} images/s ({1000 / rate:.1f} ms/image, batches of {csnet.BATCH}, "
          f"decoding included); target {TARGET_IMAGES_PER_S} images/s on 2 threads")
    print(f"{_common.load()} at end")
    print(f"SUMMARY saliency_csnet: {len(paths)} images, mean |diff| {total / count:.4f}, "
          f"{100 * within / count:.3f}% within 2, {rate:.1f} images/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
