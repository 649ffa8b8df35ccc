"""SQuAD: the official EM / F1 arithmetic on cases worked out by hand, reading the official JSON with
its rejects, the run_qa-style windowed features on a tiny byte-level BPE tokenizer trained here on the
fixture text, and the logits-to-text post-processing with the v2.0 null rule."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest

from pipelines.datasets.squad_format import (
    answer_token_span,
    article_split,
    best_answers,
    features_for_eval,
    features_for_training,
    only_articles,
    read_squad,
)
from pipelines.datasets.squad_metrics import (
    exact_match,
    f1,
    gold_texts,
    normalize_answer,
    score_dataset,
    score_question,
)

FIXTURES = Path(__file__).parent / "fixtures" / "squad"


def _load(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text())


# --- the official metric -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, normalized",
    [
        ("The  Cat, sat!", "cat sat"),
        ("an apple a day", "apple day"),
        ("Theatre anthem", "theatre anthem"),  # articles only as whole words
        ("the-end", "theend"),  # punctuation goes first, so no article is left
        ("A. B. Smith", "b smith"),  # "A." becomes the article "a"
        ("  Whale\toil.\n", "whale oil"),
        ("café – 1,000", "café – 1000"),  # the en dash is not in string.punctuation
        ("", ""),
    ],
)
def test_normalize_answer_is_the_official_one(text, normalized):
    assert normalize_answer(text) == normalized


def test_exact_match_ignores_case_articles_punctuation_and_spacing():
    assert exact_match("The Whale-oil!", "whaleoil") == 1
    assert exact_match("the small museum", "A small museum") == 1
    assert exact_match("small museums", "a small museum") == 0


@pytest.mark.parametrize(
    "prediction, gold, expected",
    [
        ("the cat sat", "a cat sat down", 0.8),  # P = 2/2, R = 2/3: 2 * 1 * 2/3 / (5/3) = 4/5
        ("paris paris paris", "paris", 0.5),  # overlap counted once: P = 1/3, R = 1: 2/3 / (4/3)
        ("how far away", "how far away they are", 0.75),  # P = 1, R = 3/5: 1.2 / 1.6
        ("Avery", "Thomas Avery", 2 / 3),  # P = 1, R = 1/2
        ("red", "blue", 0.0),
        ("The Cat.", "cat", 1.0),
    ],
)
def test_f1_on_hand_worked_cases(prediction, gold, expected):
    assert f1(prediction, gold) == pytest.approx(expected)
    assert f1(prediction, gold, version_2=False) == pytest.approx(expected)


def test_empty_answers_follow_each_script():
    # v2.0: an agreed no-answer is right, a one-sided one wrong
    assert f1("", "") == 1.0 and f1("the", "") == 1.0  # "the" normalizes to nothing
    assert f1("1989", "") == 0.0 and f1("", "1989") == 0.0
    # v1.1: F1 needs a shared token, so "" against "" is 0 while EM still matches
    assert f1("", "", version_2=False) == 0.0 and exact_match("", "") == 1


def test_v2_drops_gold_answers_that_normalize_to_nothing():
    qa = {"id": "q", "answers": [{"text": "The", "answer_start": 0}, {"text": "cat", "answer_start": 4}]}
    assert gold_texts(qa, version_2=True) == ["cat"] and gold_texts(qa, version_2=False) == ["The", "cat"]
    assert score_question("", gold_texts(qa, True)) == (0, 0.0)  # "" would have matched "The"
    assert gold_texts({"id": "q", "answers": []}, version_2=True) == [""]


def test_max_over_gold_answers_takes_each_metric_on_its_own():
    golds = ["31 metres", "31 metres tall", "31"]
    assert score_question("31 metres", golds) == (1, 1.0)
    # "metres tall": 0.5 against "31 metres", 0.8 against "31 metres tall" (P 1, R 2/3), 0 against "31"
    em, f = score_question("metres tall", golds)
    assert em == 0 and f == pytest.approx(0.8)


PREDICTIONS = {
    "lh-01": "1847",  # EM 1, F1 1
    "lh-02": "metres tall",  # EM 0, F1 0.8
    "lh-03": "Whale oil.",  # EM 1, F1 1
    "lh-04": "Avery",  # EM 0, F1 2/3 (0.4 against "The last keeper, Thomas Avery")
    "lh-05": "the small museum",  # EM 1 with "a small museum"
    # "wd-01" missing: 0 and 0
    "wd-02": "how far away",  # EM 0, F1 0.75
    "sd-01": "",  # an answerable question answered with nothing: 0 and 0
    "lh-x1": "",  # unanswerable, no answer: 1 and 1
    "lh-x2": "red and white",  # unanswerable, answered: 0 and 0
    "wd-x1": "",  # 1 and 1
    # "sd-x1" missing: 0 and 0
    "not-in-file": "ignored",
}
HAS_ANS_F1 = 1 + 0.8 + 1 + 2 / 3 + 1 + 0 + 0.75 + 0


def test_v2_dataset_scores_with_the_official_keys():
    result = score_dataset(_load("v2.0-mini.json"), PREDICTIONS)
    assert result["total"] == 12 and result["HasAns_total"] == 8 and result["NoAns_total"] == 4
    assert result["HasAns_exact"] == pytest.approx(100 * 3 / 8)
    assert result["HasAns_f1"] == pytest.approx(100 * HAS_ANS_F1 / 8)
    assert result["NoAns_exact"] == pytest.approx(50.0) and result["NoAns_f1"] == pytest.approx(50.0)
    assert result["exact"] == pytest.approx(100 * 5 / 12)
    assert result["f1"] == pytest.approx(100 * (HAS_ANS_F1 + 2) / 12)
    assert result["missing"] == 2 and sorted(result["missing_ids"]) == ["sd-x1", "wd-01"]
    assert "exact_match" not in result


def test_v1_dataset_scores_and_counts_missing_as_wrong():
    result = score_dataset(_load("v1.1-mini.json"), PREDICTIONS)
    assert result["total"] == 8 and result["missing"] == 1
    assert result["exact"] == result["exact_match"] == pytest.approx(100 * 3 / 8)
    assert result["f1"] == pytest.approx(100 * HAS_ANS_F1 / 8)
    assert not any(k.startswith(("HasAns", "NoAns")) for k in result)
    perfect = {
        qa["id"]: qa["answers"][0]["text"]
        for a in _load("v1.1-mini.json")["data"]
        for p in a["paragraphs"]
        for qa in p["qas"]
    }
    assert score_dataset(_load("v1.1-mini.json"), perfect)["f1"] == 100.0
    assert score_dataset(_load("v1.1-mini.json"), {})["exact"] == 0.0


def test_version_comes_from_the_file_or_the_caller():
    v2 = _load("v2.0-mini.json")
    del v2["version"]  # is_impossible still marks it v2.0
    assert "NoAns_total" in score_dataset(v2, {})
    assert "NoAns_total" not in score_dataset(v2, {}, version_2=False)


# --- reading the JSON ----------------------------------------------------------------------------
def test_fixtures_read_cleanly():
    v1, rejects1 = read_squad(_load("v1.1-mini.json"))
    v2, rejects2 = read_squad(_load("v2.0-mini.json"))
    assert rejects1 == rejects2 == []
    assert len(v1) == 8 and len(v2) == 12
    assert sum(e["is_impossible"] for e in v2) == 4 and not any(e["is_impossible"] for e in v1)
    lh02 = next(e for e in v1 if e["id"] == "lh-02")
    assert lh02["answers"] == ["31 metres", "31 metres tall", "31"] and len(set(lh02["answer_starts"])) == 1
    x1 = next(e for e in v2 if e["id"] == "lh-x1")
    assert x1["answers"] == [] and x1["plausible_answers"] == ["1989"]


def test_bad_records_are_rejects_with_reasons_never_errors():
    context = "Bees dance to show where the flowers are."
    good = {
        "id": "ok",
        "question": "Why do bees dance?",
        "answers": [{"text": "to show where the flowers are", "answer_start": 11}],
    }
    bad = [
        {"question": "No id?", "answers": []},
        {"id": "no-q", "answers": [{"text": "Bees", "answer_start": 0}]},
        {"id": "ok", "question": "Same id again?", "answers": [{"text": "Bees", "answer_start": 0}]},
        {"id": "far", "question": "Where?", "answers": [{"text": "flowers", "answer_start": 400}]},
        {"id": "neg", "question": "Where?", "answers": [{"text": "flowers", "answer_start": -1}]},
        {"id": "shifted", "question": "What?", "answers": [{"text": "flowers", "answer_start": 3}]},
        {
            "id": "one-bad-of-two",
            "question": "What?",
            "answers": [{"text": "flowers", "answer_start": 29}, {"text": "flowers", "answer_start": 30}],
        },
        {"id": "int-text", "question": "What?", "answers": [{"text": 7, "answer_start": 0}]},
        {"id": "int-question", "question": 7, "answers": [{"text": "Bees", "answer_start": 0}]},
        {"id": "blank", "question": "   ", "answers": [{"text": "Bees", "answer_start": 0}]},
        {"id": "no-start", "question": "What?", "answers": [{"text": "Bees"}]},
        {"id": "str-start", "question": "What?", "answers": [{"text": "Bees", "answer_start": "0"}]},
        {"id": "no-answers-key", "question": "What?"},
        {"id": "unanswered", "question": "What?", "answers": []},
        {"id": "both", "question": "What?", "is_impossible": True, "answers": [{"text": "Bees", "answer_start": 0}]},
        "not an object",
    ]
    data = {
        "version": "v2.0",
        "data": [
            {
                "title": "Bees",
                "paragraphs": [
                    {"context": context, "qas": [good, *bad]},
                    {"context": "", "qas": [{"id": "ctx", "question": "Hm?", "answers": []}]},
                    {"context": context, "qas": "not a list"},
                ],
            },
            {"title": "No paragraphs"},
            "not an article",
        ],
    }
    snapshot = copy.deepcopy(data)
    examples, rejects = read_squad(data)
    assert data == snapshot
    assert [e["id"] for e in examples] == ["ok"]
    reasons = [(r["id"], r["reason"]) for r in rejects]
    assert reasons == [
        (None, "missing_field"),
        ("no-q", "missing_field"),
        ("ok", "duplicate_id"),
        ("far", "answer_start_out_of_range"),
        ("neg", "answer_start_out_of_range"),
        ("shifted", "answer_text_mismatch"),
        ("one-bad-of-two", "answer_text_mismatch"),
        ("int-text", "non_string_text"),
        ("int-question", "non_string_text"),
        ("blank", "empty_question"),
        ("no-start", "missing_field"),
        ("str-start", "missing_field"),
        ("no-answers-key", "missing_field"),
        ("unanswered", "no_answers"),
        ("both", "impossible_with_answers"),
        (None, "missing_field"),
        ("ctx", "missing_context"),
        (None, "missing_field"),
        (None, "missing_field"),
        (None, "missing_field"),
    ]
    assert all(r["detail"] for r in rejects)
    assert "reads 's dance'" in next(r["detail"] for r in rejects if r["id"] == "shifted")
    assert read_squad({"version": "1.1"}) == (
        [],
        [{"id": None, "title": None, "reason": "missing_field", "detail": 'no "data" list'}],
    )


# --- features ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer():
    """A RoBERTa-shaped fast tokenizer: byte-level BPE trained on the fixture text, <s> q </s></s> c </s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    data = _load("v2.0-mini.json")["data"]
    texts = [p["context"] for a in data for p in a["paragraphs"]]
    texts += [qa["question"] for a in data for p in a["paragraphs"] for qa in p["qas"]]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    bpe.post_processor = processors.RobertaProcessing(
        ("</s>", bpe.token_to_id("</s>")), ("<s>", bpe.token_to_id("<s>")), trim_offsets=True, add_prefix_space=False
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<s>",
        eos_token="</s>",
        sep_token="</s>",
        cls_token="<s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    pair = tok("How tall?", "The tower", return_offsets_mapping=True)
    assert pair.sequence_ids()[0] is None and 0 in pair.sequence_ids() and 1 in pair.sequence_ids()
    return tok


MAX_LEN, STRIDE = 64, 16


@pytest.fixture(scope="module")
def v2_examples():
    return read_squad(_load("v2.0-mini.json"))[0]


def test_training_labels_cover_exactly_the_gold_answer(tokenizer, v2_examples):
    train = features_for_training(v2_examples, tokenizer, MAX_LEN, STRIDE)
    evals = features_for_eval(v2_examples, tokenizer, MAX_LEN, STRIDE)
    n = len(train["example_id"])
    assert train["input_ids"].shape == (n, MAX_LEN) and train["attention_mask"].shape == (n, MAX_LEN)
    assert train["example_id"] == evals["example_id"]  # the same windows in the same order
    assert np.array_equal(train["input_ids"], evals["input_ids"])
    by_id = {e["id"]: e for e in v2_examples}
    labelled = set()
    for w in range(n):
        example = by_id[train["example_id"][w]]
        start, end = int(train["start_positions"][w]), int(train["end_positions"][w])
        offsets = evals["offset_mapping"][w]
        if example["is_impossible"]:
            assert (start, end) == (0, 0)
            continue
        # does this window hold the whole first answer?
        a0 = example["answer_starts"][0]
        a1 = a0 + len(example["answers"][0])
        context_offsets = [o for o in offsets if o is not None]
        holds = context_offsets[0][0] <= a0 and context_offsets[-1][1] >= a1
        if not holds:
            assert (start, end) == (0, 0)
            continue
        assert 0 < start <= end and offsets[start] is not None and offsets[end] is not None
        assert example["context"][offsets[start][0] : offsets[end][1]].lstrip() == example["answers"][0]
        labelled.add(example["id"])
    assert labelled == {e["id"] for e in v2_examples if not e["is_impossible"]}
    assert train["input_ids"][0, 0] == tokenizer.cls_token_id


def test_long_contexts_become_overlapping_windows(tokenizer, v2_examples):
    evals = features_for_eval(v2_examples, tokenizer, MAX_LEN, STRIDE)
    lighthouse = next(e for e in v2_examples if e["id"] == "lh-01")
    windows = [w for w, qid in enumerate(evals["example_id"]) if qid == "lh-01"]
    assert len(windows) >= 3
    spans = [[o for o in evals["offset_mapping"][w] if o is not None] for w in windows]
    assert spans[0][0][0] == 0 and spans[-1][-1][1] == len(lighthouse["context"].rstrip())
    for before, after in zip(spans, spans[1:]):
        assert before[-STRIDE:] == after[:STRIDE]  # doc_stride tokens shared by neighbouring windows
    for w in windows:  # the question and the special tokens carry no context offsets
        ids, offsets = evals["input_ids"][w], evals["offset_mapping"][w]
        assert offsets[0] is None and ids[0] == tokenizer.cls_token_id
        assert all(offsets[k] is None for k in range(len(ids)) if ids[k] == tokenizer.pad_token_id)
        assert len(ids) == MAX_LEN


def test_features_take_a_dict_of_columns_too(tokenizer, v2_examples):
    columns = {k: [e[k] for e in v2_examples[:3]] for k in v2_examples[0]}
    assert (
        features_for_eval(columns, tokenizer, MAX_LEN, STRIDE)["example_id"]
        == features_for_eval(v2_examples[:3], tokenizer, MAX_LEN, STRIDE)["example_id"]
    )
    empty = features_for_training([], tokenizer, MAX_LEN, STRIDE)
    assert empty["input_ids"].shape == (0, MAX_LEN) and empty["example_id"] == []


def test_answer_token_span_stays_inside_the_context():
    # <s> q </s> </s> c1 c2 </s> <pad>: the answer is the window's last context token
    offsets = [(0, 0), (0, 3), (0, 0), (0, 0), (0, 4), (5, 9), (0, 0), (0, 0)]
    sequence_ids = [None, 0, None, None, 1, 1, None, None]
    assert answer_token_span(offsets, sequence_ids, 5, 9) == (5, 5)
    assert answer_token_span(offsets, sequence_ids, 0, 9) == (4, 5)
    assert answer_token_span(offsets, sequence_ids, 6, 8) == (5, 5)  # inside one token
    assert answer_token_span(offsets, sequence_ids, 5, 12) is None  # runs past the window


# --- logits to text ------------------------------------------------------------------------------
def _noise_logits(evals, seed=0):
    rng = np.random.default_rng(seed)
    shape = (len(evals["example_id"]), MAX_LEN)
    return -100 - rng.random(shape), -100 - rng.random(shape)  # far below the raised logits, no ties


def _token_of(offsets, char):
    return next(k for k, o in enumerate(offsets) if o is not None and o[0] <= char < o[1])


def _put_answer(evals, starts, ends, example, window_no=0, text=None, score=10.0):
    """Raise the logits of `text` (default the first gold answer) in the window_no-th of the example's
    windows that hold it."""
    text = text or example["answers"][0]
    c0 = example["context"].index(text)
    holding = [
        k
        for k, qid in enumerate(evals["example_id"])
        if qid == example["id"]
        and [o for o in evals["offset_mapping"][k] if o is not None][0][0] <= c0
        and [o for o in evals["offset_mapping"][k] if o is not None][-1][1] >= c0 + len(text)
    ]
    w = holding[window_no]
    offsets = evals["offset_mapping"][w]
    s, e = _token_of(offsets, c0), _token_of(offsets, c0 + len(text) - 1)
    starts[w, s] = ends[w, e] = score
    return w, s, e


def test_best_answer_is_the_top_valid_span(tokenizer, v2_examples):
    answerable = [e for e in v2_examples if not e["is_impossible"]]
    evals = features_for_eval(answerable, tokenizer, MAX_LEN, STRIDE)
    starts, ends = _noise_logits(evals)
    for example in answerable:
        _put_answer(evals, starts, ends, example, window_no=-1)
    assert best_answers(answerable, evals, starts, ends) == {e["id"]: e["answers"][0] for e in answerable}

    wd02 = next(e for e in answerable if e["id"] == "wd-02")
    w, s, e = _put_answer(evals, starts, ends, wd02, window_no=0, text="how far away they are")
    offsets = evals["offset_mapping"][w]
    assert offsets[s - 1] is not None and offsets[e + 1] is not None
    # higher still, but invalid: end before start (any other pair with them scores far below 20) ...
    starts[w, e + 1], ends[w, s - 1] = 50.0, 50.0
    # ... and a span longer than max_answer_len
    assert best_answers([wd02], evals, starts, ends)[wd02["id"]] == "how far away they are"
    assert best_answers([wd02], evals, starts, ends, max_answer_len=e - s)[wd02["id"]] != "how far away they are"
    # the question's own tokens and CLS are never part of an answer
    starts[w, 1], ends[w, 2], starts[w, 0], ends[w, 0] = 90.0, 90.0, 99.0, 99.0
    assert best_answers([wd02], evals, starts, ends)[wd02["id"]] == "how far away they are"


def test_v2_null_rule_both_ways(tokenizer, v2_examples):
    lh01 = next(e for e in v2_examples if e["id"] == "lh-01")
    evals = features_for_eval([lh01], tokenizer, MAX_LEN, STRIDE)
    starts, ends = _noise_logits(evals)
    _put_answer(evals, starts, ends, lh01, score=10.0)  # span score 20
    starts[:, 0] = ends[:, 0] = 12.0  # null score 24 in every window
    assert best_answers([lh01], evals, starts, ends, version_2=True) == {"lh-01": ""}
    assert best_answers([lh01], evals, starts, ends, version_2=False) == {"lh-01": "1847"}
    assert best_answers([lh01], evals, starts, ends, version_2=True, null_threshold=4.5) == {"lh-01": "1847"}
    assert best_answers([lh01], evals, starts, ends, version_2=True, null_threshold=3.5) == {"lh-01": ""}
    # the null score is the lowest over the windows: one window that sees no "no answer" decides it
    starts[0, 0] = ends[0, 0] = 9.0  # 18 < 20, and later windows do not undo it
    assert best_answers([lh01], evals, starts, ends, version_2=True) == {"lh-01": "1847"}


def test_best_answers_checks_shapes_and_handles_no_windows(tokenizer, v2_examples):
    evals = features_for_eval(v2_examples[:1], tokenizer, MAX_LEN, STRIDE)
    starts, ends = _noise_logits(evals)
    with pytest.raises(ValueError, match="windows"):
        best_answers(v2_examples[:1], evals, starts[:-1], ends[:-1])
    assert best_answers(v2_examples[1:2], evals, starts, ends) == {v2_examples[1]["id"]: ""}


def test_post_processed_predictions_score_100_through_the_metric(tokenizer, v2_examples):
    evals = features_for_eval(v2_examples, tokenizer, MAX_LEN, STRIDE)
    starts, ends = _noise_logits(evals, seed=1)
    for example in v2_examples:
        if example["is_impossible"]:
            for w in (k for k, qid in enumerate(evals["example_id"]) if qid == example["id"]):
                starts[w, 0] = ends[w, 0] = 10.0
        else:
            _put_answer(evals, starts, ends, example)
    predictions = best_answers(v2_examples, evals, starts, ends, version_2=True)
    result = score_dataset(_load("v2.0-mini.json"), predictions)
    assert result["exact"] == 100.0 and result["f1"] == 100.0 and result["missing"] == 0


# --- a split by article (the dev set as the only real SQuAD here) ----------------------------------
def _articles(n: int) -> dict:
    return {
        "version": "1.1",
        "data": [
            {"title": f"art{a:02d}", "paragraphs": [{"context": "x", "qas": [{"id": f"q{a}", "question": "?"}]}]}
            for a in range(n)
        ],
    }


def test_article_split_is_seeded_disjoint_and_independent_of_file_order():
    data = _articles(10)
    split = article_split(data, 0.2, seed=0)
    assert len(split["held_out"]) == 2 and len(split["train"]) == 8
    assert sorted(split["train"] + split["held_out"]) == [f"art{a:02d}" for a in range(10)]
    reversed_file = {**data, "data": data["data"][::-1]}
    assert article_split(reversed_file, 0.2, seed=0) == split  # the split depends on titles, not order
    assert len({tuple(article_split(data, 0.2, seed=s)["held_out"]) for s in range(6)}) > 1  # the seed matters
    assert len(article_split(data, 0.01, seed=0)["held_out"]) == 1  # at least one article held out ...
    assert len(article_split(data, 0.99, seed=0)["train"]) == 1  # ... and at least one trained on
    kept = only_articles(data, split["held_out"])
    assert [a["title"] for a in kept["data"]] == [a["title"] for a in data["data"] if a["title"] in split["held_out"]]
    with pytest.raises(ValueError, match="at least two articles"):
        article_split(_articles(1), 0.2, seed=0)


def test_the_real_dev_set_splits_by_article_with_no_question_on_both_sides():
    from tests.conftest import shared_file

    dev = json.loads(shared_file("squad/dev-v1.1.json").read_text())
    split = article_split(dev, 0.2, seed=0)
    assert (len(split["train"]), len(split["held_out"])) == (38, 10)  # 48 articles, 20% held out
    held = only_articles(dev, split["held_out"])
    train = only_articles(dev, split["train"])
    qids = [{q["id"] for a in part["data"] for p in a["paragraphs"] for q in p["qas"]} for part in (train, held)]
    assert not qids[0] & qids[1] and len(qids[0]) + len(qids[1]) == 10_570
    assert len(qids[1]) >= 1_000, len(qids[1])  # enough held-out questions to score


def test_wordpiece_windows_label_real_dev_answers_with_bert_segments():
    """all-MiniLM-L6-v2's WordPiece tokenizer (lower-casing) on the real dev set, 384-token windows
    with stride 128: segments 0 for [CLS] question [SEP], 1 for the context and its [SEP]; every
    labelled span holds the gold answer, and almost always exactly."""
    from adapter.backbones.bert_family import load_tokenizer
    from pipelines.datasets.squad_metrics import normalize_answer
    from tests.conftest import minilm_folder, shared_file

    tok = load_tokenizer(minilm_folder())
    examples = read_squad(json.loads(shared_file("squad/dev-v1.1.json").read_text()))[0][:200]
    train = features_for_training(examples, tok, 384, 128)
    evals = features_for_eval(examples, tok, 384, 128)
    assert "token_type_ids" in train and np.array_equal(train["token_type_ids"], evals["token_type_ids"])
    by_id, exact, labelled = {e["id"]: e for e in examples}, 0, 0
    for w, qid in enumerate(train["example_id"]):
        ids, segments, mask = train["input_ids"][w], train["token_type_ids"][w], train["attention_mask"][w]
        sep = int(np.flatnonzero(ids == tok.sep_token_id)[0])
        assert ids[0] == tok.cls_token_id and not segments[: sep + 1].any() and segments[sep + 1 : mask.sum()].all()
        start, end = int(train["start_positions"][w]), int(train["end_positions"][w])
        if (start, end) == (0, 0):
            continue
        example, offsets = by_id[qid], evals["offset_mapping"][w]
        text = example["context"][offsets[start][0] : offsets[end][1]]
        a0 = example["answer_starts"][0]
        assert offsets[start][0] <= a0 and offsets[end][1] >= a0 + len(example["answers"][0])
        labelled += 1
        exact += normalize_answer(text) == normalize_answer(example["answers"][0])
    # the misses are gold answers inside a word ("gold" of "golden", "8" of "18"), which no word piece isolates
    assert labelled >= 200 and exact / labelled > 0.95, (exact, labelled)
