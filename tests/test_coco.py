"""COCO Caption: the caption metrics on a fixture with reference values, and the annotation readers.
The Ray Data job itself (with a corrupt and a missing image) runs in tests/test_multimodal_train.py."""

from __future__ import annotations

import json
import math

import pytest

from pipelines.datasets.caption_metrics import score_captions
from pipelines.tasks.coco import CocoFormatError, read_captions, read_karpathy
from tests.conftest import shared_file

REFS = {
    "1": ["A cat sat on the mat.", "a cat is on a mat"],
    "2": ["Two dogs run in a park.", "dogs running on grass"],
    "3": ["A red bus on the street"],
}
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
    karpathy = {
        "images": [
            {
                "cocoid": 7,
                "filepath": "val2014",
                "filename": "a.jpg",
                "split": "test",
                "sentences": [{"raw": "A dog."}],
            },
            {
                "cocoid": 8,
                "filepath": "train2014",
                "filename": "b.jpg",
                "split": "restval",
                "sentences": [{"raw": "Cat."}],
            },
            {
                "cocoid": 9,
                "filepath": "train2014",
                "filename": "c.jpg",
                "split": "train",
                "sentences": [{"raw": "Sky"}],
            },
        ]
    }
    (tmp_path / "k.json").write_text(json.dumps(karpathy))
    assert [i["key"] for i in read_karpathy(tmp_path / "k.json", "train")] == ["8", "9"]
    assert read_karpathy(tmp_path / "k.json", "test") == [{"key": "7", "file": "val2014/a.jpg", "captions": ["A dog."]}]
    (tmp_path / "bad.json").write_text(json.dumps({"images": [{"id": 1}]}))
    with pytest.raises(CocoFormatError, match="not a COCO captions file"):
        read_captions(tmp_path / "bad.json")
