"""SQuAD exact match and F1, computed as the official evaluation scripts compute them.

Numbers comparable with published SQuAD results need the official arithmetic, so this is a
transcription of evaluate-v1.1.py and evaluate-v2.0.py, not a re-design:

- `normalize_answer`: lower case, drop every `string.punctuation` character, replace the whole
  words a / an / the by a space, collapse whitespace.
- F1 is over the normalized whitespace tokens, with `Counter` overlap (a repeated token counts as
  often as it appears in both).
- Each question scores the max over its gold answers.
- v2.0 only: gold answers that normalize to "" are dropped and a question left without one (an
  unanswerable question) has the single gold answer ""; there an empty prediction scores 1 for EM
  and F1 and any other prediction 0 (v1.1's F1 would give 0 to "" against "").
  HasAns / NoAns split by whether the question lists any `answers` (the script's `qid_to_has_ans`).

Missing predictions: v1.1's script warns and scores the question 0 within the total; v2.0's
script skips it (and then fails on the HasAns/NoAns split). Here both versions do what v1.1 does
-- a question without a prediction is wrong and stays in every total -- and `missing` says how
many there were, so a partial prediction file never inflates a score.

Scores are percentages (0..100), the scripts' scale. The v2.0 script's no-answer-probability
threshold search needs per-question no-answer probabilities and is not done here.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Iterable, Mapping

PUNCTUATION = frozenset(string.punctuation)
ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def normalize_answer(text: str) -> str:
    """The official normalization: lower, remove punctuation, remove articles, fix whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in PUNCTUATION)
    text = ARTICLES.sub(" ", text)
    return " ".join(text.split())


def answer_tokens(text: str) -> list[str]:
    """v2.0's `get_tokens`: normalized whitespace tokens ("" has none)."""
    return normalize_answer(text).split() if text else []


def exact_match(prediction: str, gold: str) -> int:
    """1 when both normalize to the same string."""
    return int(normalize_answer(prediction) == normalize_answer(gold))


def f1(prediction: str, gold: str, version_2: bool = True) -> float:
    """Token F1 of one prediction against one gold answer.

    v2.0 scores two empty token lists as 1 (an agreed no-answer) and one empty list as 0;
    v1.1 scores any prediction without a shared token as 0, including "" against ""."""
    pred_tokens, gold_tokens = answer_tokens(prediction), answer_tokens(gold)
    if version_2 and (not pred_tokens or not gold_tokens):
        return float(pred_tokens == gold_tokens)
    same = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if same == 0:
        return 0.0
    precision = same / len(pred_tokens)
    recall = same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def gold_texts(qa: Mapping, version_2: bool) -> list[str]:
    """The gold answers one question is scored against (v2.0: [""] for an unanswerable one)."""
    texts = [a["text"] for a in qa.get("answers") or []]
    if version_2:
        texts = [t for t in texts if normalize_answer(t)] or [""]
    return texts


def score_question(prediction: str, golds: Iterable[str], version_2: bool = True) -> tuple[int, float]:
    """(EM, F1) of one prediction: the max over the gold answers, each taken on its own."""
    golds = list(golds)
    if not golds:  # v1.1 with an empty answers list: max() in the script would fail; nothing matches
        return 0, 0.0
    return max(exact_match(prediction, g) for g in golds), max(f1(prediction, g, version_2) for g in golds)


def is_version_2(dataset: Mapping | list) -> bool:
    """v2.0 files say "version": "v2.0"; a file without a version counts as v2.0 when any
    question carries `is_impossible`."""
    if isinstance(dataset, Mapping) and str(dataset.get("version", "")).lstrip("v").startswith("2"):
        return True
    return any("is_impossible" in qa for qa in _questions(dataset))


def _questions(dataset: Mapping | list) -> Iterable[Mapping]:
    articles = dataset["data"] if isinstance(dataset, Mapping) else dataset
    for article in articles:
        for paragraph in article["paragraphs"]:
            yield from paragraph["qas"]


def _totals(scores: list[tuple[int, float]]) -> tuple[float, float, int]:
    n = len(scores)
    if n == 0:
        return 0.0, 0.0, 0
    return 100.0 * sum(s[0] for s in scores) / n, 100.0 * sum(s[1] for s in scores) / n, n


def score_dataset(dataset: Mapping | list, predictions: Mapping[str, str], version_2: bool | None = None) -> dict:
    """Score {question id: predicted text} against a SQuAD file (the parsed JSON, or its "data").

    Returns the official keys: "exact", "f1", "total" and, for v2.0, "HasAns_exact", "HasAns_f1",
    "HasAns_total", "NoAns_exact", "NoAns_f1", "NoAns_total" (a split with no questions is left
    out, as the script does); v1.1 also gets its own script's "exact_match" (= "exact"). Always
    "missing": questions without a prediction (scored 0), and "missing_ids": the first 20.
    Predictions for ids not in the file are ignored, as the scripts ignore them."""
    if version_2 is None:
        version_2 = is_version_2(dataset)
    has_answer: list[tuple[int, float]] = []
    no_answer: list[tuple[int, float]] = []
    missing: list[str] = []
    for qa in _questions(dataset):
        qid = qa["id"]
        if qid in predictions:
            score = score_question(predictions[qid], gold_texts(qa, version_2), version_2)
        else:
            missing.append(qid)
            score = (0, 0.0)
        (has_answer if qa.get("answers") else no_answer).append(score)
    exact, f1_score, total = _totals(has_answer + no_answer)
    result: dict = {"exact": exact, "f1": f1_score, "total": total}
    if version_2:
        for prefix, scores in (("HasAns", has_answer), ("NoAns", no_answer)):
            if scores:
                e, f, n = _totals(scores)
                result.update({f"{prefix}_exact": e, f"{prefix}_f1": f, f"{prefix}_total": n})
    else:
        result["exact_match"] = exact
    result["missing"] = len(missing)
    result["missing_ids"] = missing[:20]
    return result
