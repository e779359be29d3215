"""Reading images, masks and saliency maps, writing palette PNGs and HDF5 shards.

Every reader raises `EpsError("<path>: <problem>")` on a bad file; every writer writes
to a temporary name and renames when complete, so no partial output is left behind.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import h5py
import numpy as np
from PIL import Image, ImageFile

from eps.errors import file_error

FORMAT_VERSION = 1


def voc_palette(n: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map (bit-interleaved), as an (n, 3) uint8 array."""
    palette = np.zeros((n, 3), np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for bit in range(8):
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        palette[i] = (r, g, b)
    return palette


VOC_PALETTE = voc_palette()


def _tmp_name(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; rename it to `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_index_png(path, mask: np.ndarray) -> None:
    """Write a uint8 index mask as a VOC-palette PNG (atomic)."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"index mask must be 2-D, got shape {mask.shape}")
    img = Image.fromarray(mask.astype(np.uint8), mode="P")
    img.putpalette(VOC_PALETTE.reshape(-1).tolist())
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


def write_gray_png(path, array: np.ndarray) -> None:
    """Write a uint8 single-channel PNG (atomic)."""
    with atomic_path(path) as tmp:
        Image.fromarray(np.asarray(array, np.uint8), mode="L").save(tmp, format="PNG")


def write_rgb(path, image: np.ndarray, quality: int = 95) -> None:
    """Write an RGB uint8 image; the format follows the extension (atomic)."""
    path = Path(path)
    fmt = "JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG"
    with atomic_path(path) as tmp:
        kwargs = {"quality": quality} if fmt == "JPEG" else {}
        Image.fromarray(np.asarray(image, np.uint8), mode="RGB").save(tmp, format=fmt, **kwargs)


def _open(path) -> Image.Image:
    """Open and fully decode an image, so a truncated or corrupt file fails here, not later.

    PIL decodes lazily and a library may have set `ImageFile.LOAD_TRUNCATED_IMAGES`, which
    would silently pad a truncated file; the flag is forced off while decoding, and PNG chunk
    checksums are verified first.
    """
    path = Path(path)
    if not path.exists():
        raise file_error(path, "file not found")
    if not path.is_file():
        raise file_error(path, "not a file")
    saved = ImageFile.LOAD_TRUNCATED_IMAGES
    if saved:  # touch the global only when someone switched it on
        ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with Image.open(path) as probe:
            if probe.format == "PNG":
                probe.verify()
        img = Image.open(path)
        img.load()
    except Exception as exc:  # PIL raises many types for corrupt files
        raise file_error(path, f"cannot decode image ({type(exc).__name__}: {exc})") from None
    finally:
        if saved:
            ImageFile.LOAD_TRUNCATED_IMAGES = saved
    return img


def _grey_to_uint8(img: Image.Image) -> np.ndarray:
    """A 16- or 32-bit grey image as uint8 0..255 (PIL's convert would clip it to 255)."""
    arr = np.asarray(img, dtype=np.float64)
    # a 16-bit file spans 0..65535 whatever its values (a dark map stays dark); mode "I"
    # (32-bit, or 16-bit PNGs in old Pillow) does not say its depth: judged by the values
    peak = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
    return np.clip(np.round(arr / peak * 255.0), 0, 255).astype(np.uint8)


WIDE_GREY = ("I;16", "I;16B", "I;16L", "I")


def read_image(path) -> np.ndarray:
    """Read an image as RGB uint8 (H, W, 3); 16-bit grey images are rescaled, not clipped."""
    img = _open(path)
    if img.mode in WIDE_GREY:
        return np.repeat(_grey_to_uint8(img)[:, :, None], 3, axis=2)
    return np.asarray(img.convert("RGB"))


def image_size(path) -> tuple[int, int]:
    """(H, W) of an image file from its header, nothing decoded: stages group a shard's images
    by size without holding them all in memory (`read_image` gives the same shape)."""
    path = Path(path)
    if not path.is_file():
        raise file_error(path, "file not found" if not path.exists() else "not a file")
    try:
        with Image.open(path) as img:
            width, height = img.size
    except Exception as exc:  # PIL raises many types for corrupt files
        raise file_error(path, f"cannot read the image header ({type(exc).__name__}: {exc})") from None
    return height, width


def read_index_png(path) -> np.ndarray:
    """Read an index mask (palette or grayscale PNG) as uint8 (H, W), values kept as stored."""
    img = _open(path)
    if img.mode in ("P", "L"):
        return np.asarray(img, dtype=np.uint8)
    if img.mode in ("I", "I;16"):
        arr = np.asarray(img)
        if arr.max(initial=0) > 255:
            raise file_error(path, f"index mask has values above 255 (mode {img.mode})")
        return arr.astype(np.uint8)
    raise file_error(path, f"expected an index or grayscale mask PNG, got mode {img.mode}")


def read_ids_file(path) -> list[str]:
    """Image ids, one a line (blank lines and `#` comments skipped): a missing or non-UTF-8
    file, one without ids, or an id listed twice is a one-line error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise file_error(path, "file not found")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise file_error(path, f"not a UTF-8 text file of ids (byte {exc.start})") from None
    ids = [i for i in (line.split("#")[0].strip() for line in lines) if i]
    if not ids:
        raise file_error(path, "lists no ids: no image ids, only blank lines or comments")
    seen = set()
    for image_id in ids:
        if image_id in seen:
            raise file_error(path, f"id {image_id!r} is listed twice")
        seen.add(image_id)
    return ids


def read_saliency(path) -> np.ndarray:
    """Read a saliency map as uint8 (H, W) in 0..255 (16-bit maps are rescaled, alpha dropped)."""
    img = _open(path)
    if img.mode in WIDE_GREY:
        return _grey_to_uint8(img)
    if img.mode != "L":
        img = img.convert("L")
    return np.asarray(img, dtype=np.uint8)


@contextlib.contextmanager
def atomic_h5(path, fmt: str, dataset: str):
    """Open a new HDF5 shard for writing under a temporary name, renamed on success.

    The file carries the attributes `format`, `version` and `dataset`.
    """
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.attrs["format"] = fmt
            f.attrs["version"] = FORMAT_VERSION
            f.attrs["dataset"] = dataset
            yield f


def _plain(value):
    """An HDF5 attribute as a plain Python value, so messages read 2, not np.int64(2)."""
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return value.item() if isinstance(value, np.generic) else value


def open_h5(path, fmt: str, dataset: str | None = None) -> h5py.File:
    """Open a shard for reading, checking its format, version and (optionally) dataset."""
    path = Path(path)
    if not path.is_file():
        raise file_error(path, "file not found")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise file_error(path, f"not a readable HDF5 file ({exc})") from None
    got_fmt, got_ver, got_ds = (_plain(f.attrs.get(k)) for k in ("format", "version", "dataset"))
    if got_fmt != fmt:
        f.close()
        raise file_error(path, f"expected an HDF5 shard of format {fmt!r}, found {got_fmt!r}")
    if got_ver != FORMAT_VERSION:
        f.close()
        raise file_error(path, f"shard format version {got_ver!r} is not supported (expected {FORMAT_VERSION})")
    if dataset is not None and got_ds != dataset:
        f.close()
        raise file_error(path, f"shard belongs to dataset {got_ds!r}, not {dataset!r}")
    return f


# An output folder eps writes carries this file, naming the command that wrote it: a later run
# replaces the folder only when the marker says it is that command's own and nothing else was
# put in it since (a command never deletes what it did not write).
OWNER_FILE = ".eps-output"


def check_replaceable(out_dir, writer: str, own_names=None) -> None:
    """Refuse (one line) an existing `out_dir` that `writer` may not replace.

    Allowed: no `out_dir`, an empty folder, or a folder whose OWNER_FILE names `writer` and
    whose every other entry passes `own_names(name)` (the names `writer` writes). Anything
    else (a file, a folder of the user's, a folder with added files) is the user's and stays.
    """
    out_dir = Path(out_dir)
    if not out_dir.exists() and not out_dir.is_symlink():
        return
    if not out_dir.is_dir() or out_dir.is_symlink():
        raise file_error(out_dir, "exists and is not a folder eps wrote; remove it or choose another output")
    entries = sorted(p.name for p in out_dir.iterdir())
    if not entries:
        return
    marker = out_dir / OWNER_FILE
    owner = marker.read_text(errors="replace").strip() if marker.is_file() else None
    if owner != writer:
        raise file_error(out_dir, f"exists and was not written by eps {writer} (no {OWNER_FILE} of its own); "
                            "remove it or choose another output")
    foreign = [n for n in entries if n != OWNER_FILE and not (own_names and own_names(n))]
    if foreign:
        raise file_error(out_dir, f"holds {foreign[0]!r}, which eps {writer} did not write; "
                            "remove it or choose another output")


def new_output_dir(out_dir) -> Path:
    """A fresh temporary folder beside `out_dir` (same file system, so the final rename is atomic)."""
    import tempfile

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))


def commit_output_dir(tmp, out_dir, writer: str, own_names=None) -> None:
    """Mark `tmp` as `writer`'s and put it in place of `out_dir` (checked again just before)."""
    import shutil
    import tempfile

    tmp, out_dir = Path(tmp), Path(out_dir)
    (tmp / OWNER_FILE).write_text(writer + "\n")
    check_replaceable(out_dir, writer, own_names)
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, old / "d")
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)
