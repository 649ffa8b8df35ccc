"""Image classification data as a class-per-folder tree (VTAB-1k's released layout, torchvision's
ImageFolder): `<split>/<class>/<file>`, labels numbered by the sorted class folder names.

    python -m pipelines.datasets.image_folder digits OUT [--size 32] [--val-fraction 0.2] [--seed 0]

`digits` writes scikit-learn's bundled handwritten digits (1,797 real 8x8 scans, 10 classes, no
download) in that layout: a real, small, offline classification set for the ViT adapter
(docs/encoders.md) to be trained and checked on. `list_image_folder` reads any such split.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

# torchvision.datasets.folder.IMG_EXTENSIONS
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
DIGITS_MAX = 16  # load_digits pixel values are counts 0..16 (4x4 blocks of a 32x32 bitmap)


def digits_split(labels: np.ndarray, val_fraction: float, seed: int = 0) -> np.ndarray:
    """Boolean mask of the validation images: per class, round(n * val_fraction) images drawn with
    a seeded generator, so every class keeps its share and the same seed gives the same split."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction {val_fraction} is not in [0, 1)")
    rng = np.random.default_rng(seed)
    is_val = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        n_val = int(round(len(members) * val_fraction))
        is_val[rng.permutation(members)[:n_val]] = True
    return is_val


def digit_image(pixels: np.ndarray, size: int):
    """One 8x8 digit (values 0..16) as a size x size RGB PIL image: 0..16 scaled to 0..255, enlarged
    with nearest-neighbour sampling (the 8x8 blocks stay sharp, nothing is invented), grey copied to RGB."""
    from PIL import Image

    grey = (
        np.rint(np.asarray(pixels, dtype=np.float64).reshape(8, 8) * (255.0 / DIGITS_MAX)).clip(0, 255).astype(np.uint8)
    )
    return Image.fromarray(grey).resize((size, size), Image.NEAREST).convert("RGB")


def write_digits(out_dir: str | Path, size: int = 32, val_fraction: float = 0.2, seed: int = 0) -> dict:
    """Write the digits as out_dir/{train,val}/<digit>/<index>.png (index = the image's position in
    load_digits, so every file traces back to its source); train/ and val/ must not hold files yet.
    Returns counts per split and class."""
    from sklearn.datasets import load_digits

    if size < 1:
        raise ValueError(f"size {size} must be positive")
    out = Path(out_dir)
    for split in ("train", "val"):
        if (out / split).exists() and any((out / split).iterdir()):
            # another seed or fraction would leave stale images in the other split: refuse, never delete
            raise FileExistsError(f"{out / split} is not empty; write the digits into a new folder")
    digits = load_digits()
    images, labels = digits.images, digits.target
    is_val = digits_split(labels, val_fraction, seed)
    counts: dict[str, dict[str, int]] = {"train": {}, "val": {}}
    for index, (pixels, label) in enumerate(zip(images, labels)):
        split = "val" if is_val[index] else "train"
        folder = out / split / str(int(label))
        folder.mkdir(parents=True, exist_ok=True)
        digit_image(pixels, size).save(folder / f"{index}.png")
        counts[split][str(int(label))] = counts[split].get(str(int(label)), 0) + 1
    return {
        "root": str(out),
        "size": size,
        "val_fraction": val_fraction,
        "seed": seed,
        "classes": sorted({str(int(x)) for x in labels}),
        "train": sum(counts["train"].values()),
        "val": sum(counts["val"].values()),
        "per_class": counts,
    }


def list_image_folder(
    root: str | Path, check_decode: bool = False
) -> tuple[list[str], list[tuple[str, int]], list[tuple[str, str]]]:
    """(classes, items, rejects) of one split folder, by torchvision ImageFolder's rules: classes are
    the sorted names of root's sub-folders, label = index in that list, every file below a class
    folder (at any depth) with an image extension is an item (path relative to root, "/"-separated,
    sorted). What is not used is a reject (path, reason) instead of an error: not_an_image (its
    extension), outside_class_folder (a file directly in root), undecodable (check_decode opens every
    image with PIL), empty_class (a class folder without images; it keeps its label index so that
    train and val number classes alike)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    rejects: list[tuple[str, str]] = [
        (e.name, "outside_class_folder") for e in sorted(os.scandir(root), key=lambda e: e.name) if not e.is_dir()
    ]
    items: list[tuple[str, int]] = []
    for label, name in enumerate(classes):
        found = 0
        for dirpath, _, filenames in sorted(os.walk(root / name, followlinks=True)):
            for filename in sorted(filenames):
                rel = Path(dirpath, filename).relative_to(root).as_posix()
                if not filename.lower().endswith(IMAGE_EXTENSIONS):
                    rejects.append((rel, "not_an_image"))
                elif check_decode and not _decodes(root / rel):
                    rejects.append((rel, "undecodable"))
                else:
                    items.append((rel, label))
                    found += 1
        if not found:
            rejects.append((name, "empty_class"))
    return classes, sorted(items), rejects


def _decodes(path: Path) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.verify()
        return True
    except Exception:  # PIL raises many kinds for a broken file; each just means "not an image"
        return False


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    digits = sub.add_parser("digits", help="write scikit-learn's digits as train/ and val/ class folders")
    digits.add_argument("out", help="output folder")
    digits.add_argument("--size", type=int, default=32, help="image side in pixels (8x8 enlarged)")
    digits.add_argument("--val-fraction", type=float, default=0.2, help="share of each class put in val/")
    digits.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    summary = write_digits(args.out, size=args.size, val_fraction=args.val_fraction, seed=args.seed)
    print(json.dumps({k: v for k, v in summary.items() if k != "per_class"}))


if __name__ == "__main__":
    # Run it as `pipelines.datasets.image_folder`, not `__main__`: what this module hands to Ray workers must be
    # importable there by its module name.
    from pipelines.datasets.image_folder import main as _main

    _main()
