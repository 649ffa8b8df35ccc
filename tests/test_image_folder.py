"""The class-per-folder image layout: scikit-learn's real digits written as train/ and val/ (counts,
stratified deterministic split, pixels, PNG size), and the folder listing with ImageFolder's class
order and its rejects."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipelines.datasets.image_folder import digit_image, digits_split, list_image_folder, main, write_digits

pytest.importorskip("sklearn", reason="scikit-learn provides the digits (pip install scikit-learn)")

N_DIGITS, SIZE, VAL_FRACTION = 1797, 32, 0.2


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    summary = write_digits(out, size=SIZE, val_fraction=VAL_FRACTION, seed=0)
    return out, summary


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    return load_digits()


def test_every_digit_is_written_once_as_a_png_of_the_given_size(digits_dir):
    out, summary = digits_dir
    files = sorted(out.rglob("*"))
    pngs = [f for f in files if f.is_file()]
    assert len(pngs) == N_DIGITS and all(f.suffix == ".png" for f in pngs)
    assert summary["train"] + summary["val"] == N_DIGITS
    assert sorted(int(f.stem) for f in pngs) == list(range(N_DIGITS))  # file name = index in load_digits
    for split in ("train", "val"):
        assert sorted(p.name for p in (out / split).iterdir()) == [str(d) for d in range(10)]
    with Image.open(pngs[0]) as im:
        assert im.format == "PNG" and im.size == (SIZE, SIZE) and im.mode == "RGB"


def test_split_is_stratified_and_follows_the_seed(digits_dir, digits):
    out, summary = digits_dir
    for label in range(10):
        n_class = int((digits.target == label).sum())
        n_val = len(list((out / "val" / str(label)).iterdir()))
        assert n_val == round(n_class * VAL_FRACTION)
        assert summary["per_class"]["val"][str(label)] == n_val
        assert n_val + len(list((out / "train" / str(label)).iterdir())) == n_class
    mask = digits_split(digits.target, VAL_FRACTION, seed=0)
    assert np.array_equal(mask, digits_split(digits.target, VAL_FRACTION, seed=0))
    assert not np.array_equal(mask, digits_split(digits.target, VAL_FRACTION, seed=1))
    written_val = sorted(int(p.stem) for p in (out / "val").rglob("*.png"))
    assert written_val == np.flatnonzero(mask).tolist()
    with pytest.raises(ValueError):
        digits_split(digits.target, 1.0)


def test_pixels_are_the_digits_scaled_to_0_255_and_enlarged(digits_dir, digits):
    out, _ = digits_dir
    for index in (0, 1, 1796):
        label = int(digits.target[index])
        split = "val" if (out / "val" / str(label) / f"{index}.png").exists() else "train"
        with Image.open(out / split / str(label) / f"{index}.png") as im:
            pixels = np.asarray(im)
        expected = np.rint(digits.images[index] * 255 / 16).astype(np.uint8)
        assert np.array_equal(pixels[..., 0], pixels[..., 2])  # grey in all three channels
        assert np.array_equal(pixels[:: SIZE // 8, :: SIZE // 8, 0], expected)  # one sample per 4x4 block
        assert np.array_equal(pixels[..., 1], np.kron(expected, np.ones((SIZE // 8, SIZE // 8), np.uint8)))
    assert np.asarray(digit_image(digits.images[0], 8))[..., 0].max() <= 255


def test_listing_matches_what_was_written(digits_dir):
    out, summary = digits_dir
    for split in ("train", "val"):
        classes, items, rejects = list_image_folder(out / split, check_decode=split == "val")
        assert classes == [str(d) for d in range(10)] and rejects == []
        assert len(items) == summary[split]
        assert all(classes[label] == path.split("/")[0] for path, label in items)
        assert items == sorted(items)


def test_listing_rejects_what_is_not_an_image(tmp_path):
    root = tmp_path / "split"
    for folder in ("b/sub", "a", "c_empty", "B"):
        (root / folder).mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(root / "a" / "x.png")
    Image.new("RGB", (4, 4)).save(root / "b" / "sub" / "y.JPG")
    Image.new("RGB", (4, 4)).save(root / "B" / "z.webp")
    (root / "a" / "notes.txt").write_text("not an image")
    (root / "a" / "broken.png").write_bytes(b"\x89PNG not really")
    (root / "README.md").write_text("about this folder")
    classes, items, rejects = list_image_folder(root)
    assert classes == ["B", "a", "b", "c_empty"]  # sorted names, as ImageFolder orders them
    assert items == [("B/z.webp", 0), ("a/broken.png", 1), ("a/x.png", 1), ("b/sub/y.JPG", 2)]
    assert sorted(rejects) == [
        ("README.md", "outside_class_folder"),
        ("a/notes.txt", "not_an_image"),
        ("c_empty", "empty_class"),
    ]
    _, items, rejects = list_image_folder(root, check_decode=True)
    assert ("a/broken.png", "undecodable") in rejects and ("a/broken.png", 1) not in items
    with pytest.raises(FileNotFoundError):
        list_image_folder(tmp_path / "nowhere")


def test_cli_writes_the_folder_and_refuses_to_mix_two_splits(tmp_path, capsys):
    main(["digits", str(tmp_path / "d"), "--size", "8", "--seed", "3"])
    assert '"train": ' in capsys.readouterr().out
    with Image.open(next((tmp_path / "d" / "train").rglob("*.png"))) as im:
        assert im.size == (8, 8)
    assert len(list((tmp_path / "d").rglob("*.png"))) == N_DIGITS
    with pytest.raises(FileExistsError):
        write_digits(tmp_path / "d", size=8, seed=4)
