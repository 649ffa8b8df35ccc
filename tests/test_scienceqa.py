"""ScienceQA: the problem format, the answer parser, per-class accuracy on a fixture with known
answers, and the Ray Data job on the real shared problems with images drawn into the official layout."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from pipelines.tasks.scienceqa import (
    accuracy,
    answer_text,
    check_problem,
    classes_of,
    format_problem,
    markdown_table,
    parse_answer,
)
from tests.conftest import shared_file
from tests.test_image_encoder import png


def _problem(subject="natural science", grade="grade3", hint="", image=None, answer=1, n=3):
    return {
        "question": "Which is it?",
        "choices": [f"c{i}" for i in range(n)],
        "answer": answer,
        "hint": hint,
        "image": image,
        "subject": subject,
        "grade": grade,
    }


def test_problem_text_is_scienceqas_question_context_options_format():
    p = _problem(hint="Read the text.")
    assert format_problem(p) == (
        "Question: Which is it?\nContext: Read the text.\nOptions: (A) c0 (B) c1 (C) c2\nAnswer:"
    )
    assert "Context: N/A\n" in format_problem(_problem())
    assert answer_text(p) == "The answer is (B)."


@pytest.mark.parametrize(
    "text, n, expected",
    [
        ("The answer is (B).", 3, ("B", "ok")),
        ("the answer is (c).", 3, ("C", "ok")),
        ("Let me think. The answer is A. Because the sun.", 2, ("A", "ok")),
        ("THE ANSWER IS ( b ) and then The answer is (A).", 3, ("B", "ok")),
        ("The answer is (E).", 3, ("E", "out_of_range")),
        ("Once upon a time there was a cat.", 4, (None, "no_answer")),
        ("The answer is Because", 4, (None, "no_answer")),
        ("", 2, (None, "no_answer")),
        ("\x00\ufffd)(((", 2, (None, "no_answer")),
    ],
)
def test_answer_parser(text, n, expected):
    assert parse_answer(text, n, parser="lenient") == expected


def test_classes_follow_table_2():
    assert classes_of(_problem()) == ["NAT", "NO", "G1-6"]
    assert classes_of(_problem("social science", "grade7", hint="h", image="image.png")) == [
        "SOC",
        "TXT",
        "IMG",
        "G7-12",
    ]
    assert classes_of(_problem("language science", "grade12", hint="h")) == ["LAN", "TXT", "G7-12"]


def test_per_class_accuracy_is_exact_on_a_fixture_with_known_answers():
    problems = [
        (_problem("natural science", "grade2", image="i.png"), "The answer is (B).", True),
        (_problem("natural science", "grade8", hint="h"), "the answer is (a)", False),
        (_problem("social science", "grade5"), "garbage", False),
        (_problem("social science", "grade10", hint="h", image="i.png"), "The answer is (B). Yes.", True),
        (_problem("language science", "grade1", hint="h"), "The answer is (B)", True),
        (_problem("language science", "grade9"), "The answer is (Z).", False),
    ]
    rows = []
    for p, gen, want in problems:
        letter, status = parse_answer(gen, len(p["choices"]), parser="lenient")
        correct = status == "ok" and letter == "ABCDE"[p["answer"]]
        assert correct == want
        rows.append({"classes": classes_of(p), "correct": correct})
    acc = accuracy(rows)
    expected = {
        "NAT": (1, 2),
        "SOC": (1, 2),
        "LAN": (1, 2),
        "TXT": (2, 3),
        "IMG": (2, 2),
        "NO": (0, 2),
        "G1-6": (2, 3),
        "G7-12": (1, 3),
        "Avg": (3, 6),
    }
    assert {k: (v["correct"], v["total"]) for k, v in acc.items()} == expected
    assert acc["TXT"]["accuracy"] == 66.67 and acc["NO"]["accuracy"] == 0.0 and acc["Avg"]["accuracy"] == 50.0
    table = markdown_table(acc, "fixture")
    assert "| Method | NAT | SOC | LAN | TXT | IMG | NO | G1-6 | G7-12 | Avg |" in table
    assert "| fixture | 50.00 | 50.00 | 50.00 | 66.67 | 100.00 | 0.00 | 66.67 | 33.33 | 50.00 |" in table
    assert accuracy([])["Avg"]["accuracy"] is None


def test_malformed_problems_are_named():
    assert check_problem(_problem()) == ""
    assert "answer 7" in check_problem(_problem(answer=7))
    assert "choices" in check_problem({**_problem(), "choices": ["only one"]})
    assert "unknown grade" in check_problem(_problem(grade="grade13"))
    assert "not an object" in check_problem(["x"])


def draw_images(problems_dir, out_images, splits=("train", "val", "test"), limit=None, corrupt: str | None = None):
    """Small PNGs in the official layout for every problem (of the first `limit` per split) that names one."""
    problems = json.loads((problems_dir / "problems.json").read_text())
    pid_splits = json.loads((problems_dir / "pid_splits.json").read_text())
    drawn = 0
    for split in splits:
        for k, pid in enumerate(pid_splits[split][:limit]):
            if problems[pid].get("image"):
                d = out_images / split / pid
                d.mkdir(parents=True, exist_ok=True)
                (d / problems[pid]["image"]).write_bytes(
                    b"\x89PNG broken" if pid == corrupt else png((k * 37 % 256, 90, 160), pattern=k % 20)
                )
                drawn += 1
    return drawn


def test_preprocessing_the_official_layout_with_ray_data(ray_cluster, tmp_path):
    from pipelines.job_config import TrainConfig
    from pipelines.preprocess import run

    src = shared_file("scienceqa/problems.json").parent
    problems = json.loads((src / "problems.json").read_text())
    splits = json.loads((src / "pid_splits.json").read_text())
    with_image = [p for p in splits["train"][:30] if problems[p]["image"]]
    draw_images(src, tmp_path / "images", splits=("train", "val"), limit=30, corrupt=with_image[0])
    missing = with_image[1]
    (tmp_path / "images" / "train" / missing / "image.png").unlink()
    stories = shared_file("stories260K/params.json").parent
    cfg = TrainConfig.model_validate(
        {
            "task": "scienceqa",
            "model": {"base": str(stories), "tokenizer": str(stories / "tokenizer.model")},
            "data": {"source": str(src), "out": str(tmp_path / "out"), "max_seq_len": 512, "limit": 30},
            "scienceqa": {"images": str(tmp_path / "images")},
        }
    )
    stats = run(cfg)
    assert stats["records_read"] == 60
    assert stats["rejected_by_reason"].get("image_corrupt") == 1 and stats["rejected_by_reason"]["image_missing"] == 1
    assert stats["records_written"] + stats["records_rejected"] == 60 and stats["val_records"] > 0
    rejects = [json.loads(x) for x in open(tmp_path / "out" / "rejects.jsonl")]
    assert {r["key"] for r in rejects if r["reason"].startswith("image")} == {with_image[0], missing}
    train = pq.read_table(tmp_path / "out" / "train").to_pylist()
    by_key = {r["key"]: r for r in train}
    from adapter.tokenizer import Tokenizer

    tok = Tokenizer(stories / "tokenizer.model")
    key = next(k for k in splits["train"] if k in by_key and problems[k]["image"])
    first, p = by_key[key], problems[key]
    # BOS + prompt unlabelled, then exactly "The answer is (X)." + EOS as the target.
    target = [t for t, lab in zip(first["input_ids"], first["labels"]) if lab != -100]
    assert tok.decode(target[:-1]) == answer_text(p) and target[-1] == tok.eos_id
    assert first["input_ids"][0] == tok.bos_id and first["input_ids"][1] != tok.bos_id
    assert (first["image"] is not None) == bool(p["image"])
    kept_with_image = [k for k in with_image if k in by_key]
    assert 0 < len(kept_with_image) <= len(with_image) - 2
    assert sum(1 for r in train if r["image"]) == len(kept_with_image)
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["fingerprint"]["task"] == "scienceqa"
