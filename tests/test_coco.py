"""COCO Caption: the caption metrics on a fixture with reference values, the annotation readers,
and the Ray Data job on the real coco-mini images (plus a corrupt and a missing one)."""

from __future__ import annotations

import json
import math
import shutil

import pyarrow.parquet as pq
import pytest

from pipelines.caption_metrics import score_captions
from pipelines.coco import CocoFormatError, read_captions, read_karpathy
from tests.conftest import shared_file

REFS = {"1": ["A cat sat on the mat.", "a cat is on a mat"],
        "2": ["Two dogs run in a park.", "dogs running on grass"],
        "3": ["A red bus on the street"]}
HYPS = {"1": "a cat sits on a mat", "2": "", "3": "A red bus on a street."}


def test_bleu_and_cider_d_match_the_reference_values():
    m = score_captions(REFS, HYPS)
    # By hand (PTB tokens: lower case, punctuation gone): 12 hypothesis words; clipped matches for
    # 1..4-grams 10/12, 6/10, 3/8, 1/6; closest reference lengths 16, so the brevity penalty is
    # exp(1 - 16/12).
    bp = math.exp(1 - 16 / 12)
    p = [10 / 12, 6 / 10, 3 / 8, 1 / 6]
    for n in range(1, 5):
        assert m[f"BLEU-{n}"] == pytest.approx(bp * math.prod(p[:n]) ** (1 / n), rel=1e-6)
    assert m["BLEU-4"] == pytest.approx(0.3012643, abs=1e-6)
    # CIDEr-D as coco-caption computes it on this fixture (sigma 6, clipped counts; idf from these refs).
    assert m["CIDEr-D"] == pytest.approx(3.0544609, abs=1e-6)


def test_metric_inputs_are_checked():
    with pytest.raises(ValueError, match="not both"):
        score_captions(REFS, {"1": "x"})
    with pytest.raises(ValueError, match="without reference captions"):
        score_captions({"1": []}, {"1": "x"})


def test_annotation_readers(tmp_path):
    items = read_captions(shared_file("coco-mini/annotations/captions_val2017.json"))
    assert len(items) == 79 and sum(len(i["captions"]) for i in items) == 395
    assert all(i["file"].endswith(".jpg") for i in items)
    karpathy = {"images": [
        {"cocoid": 7, "filepath": "val2014", "filename": "a.jpg", "split": "test", "sentences": [{"raw": "A dog."}]},
        {"cocoid": 8, "filepath": "train2014", "filename": "b.jpg", "split": "restval", "sentences": [{"raw": "Cat."}]},
        {"cocoid": 9, "filepath": "train2014", "filename": "c.jpg", "split": "train", "sentences": [{"raw": "Sky"}]}]}
    (tmp_path / "k.json").write_text(json.dumps(karpathy))
    assert [i["key"] for i in read_karpathy(tmp_path / "k.json", "train")] == ["8", "9"]
    assert read_karpathy(tmp_path / "k.json", "test") == [{"key": "7", "file": "val2014/a.jpg", "captions": ["A dog."]}]
    (tmp_path / "bad.json").write_text(json.dumps({"images": [{"id": 1}]}))
    with pytest.raises(CocoFormatError, match="not a COCO captions file"):
        read_captions(tmp_path / "bad.json")


def test_preprocessing_coco_mini_with_ray_data(ray_cluster, tmp_path):
    from pipelines.coco import run
    from pipelines.config import TrainConfig

    src = shared_file("coco-mini/annotations").parent
    shutil.copytree(src / "annotations", tmp_path / "coco" / "annotations")
    (tmp_path / "coco" / "val2017").symlink_to(src / "val2017")
    train = read_captions(src / "annotations" / "captions_train2017.json")[:6]
    (tmp_path / "coco" / "train2017").mkdir()
    for it in train[:4]:
        shutil.copy(src / "train2017" / it["file"], tmp_path / "coco" / "train2017" / it["file"])
    (tmp_path / "coco" / "train2017" / train[4]["file"]).write_bytes(b"\xff\xd8\xff garbage")  # corrupt JPEG
    # train[5]'s file is missing.
    stories = shared_file("stories260K/params.json").parent
    cfg = TrainConfig.model_validate({
        "task": "coco", "vision": {"encoder": str(tmp_path / "unused")},
        "model": {"base": str(stories), "tokenizer": str(stories / "tokenizer.model")},
        "data": {"source": str(tmp_path / "coco"), "out": str(tmp_path / "out"), "max_seq_len": 192, "limit": 6}})
    stats = run(cfg)
    n_caps = [len(i["captions"]) for i in train]
    assert stats["rejected_by_reason"] == {"image_corrupt": n_caps[4], "image_missing": n_caps[5]}
    assert stats["train_records"] == sum(n_caps[:4]) and stats["val_records"] > 0
    rows = pq.read_table(tmp_path / "out" / "train").to_pylist()
    assert {r["key"] for r in rows} == {i["key"] for i in train[:4]}
    assert all(r["image"][:2] == b"\xff\xd8" for r in rows)  # the original JPEG bytes
    from adapter.tokenizer import Tokenizer
    tok = Tokenizer(stories / "tokenizer.model")
    first = next(r for r in rows if r["key"] == train[0]["key"])
    target = [t for t, lab in zip(first["input_ids"], first["labels"]) if lab != -100]
    assert tok.decode(target[:-1]) in train[0]["captions"]
