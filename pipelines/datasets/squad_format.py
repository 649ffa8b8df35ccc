"""SQuAD v1.1 / v2.0 for extractive QA (docs/encoders.md): the official JSON read into flat
examples, the windowed token features a span-prediction head trains and evaluates on, and the
post-processing that turns start / end logits back into answer text.

Official layout: {"version", "data": [{"title", "paragraphs": [{"context", "qas": [{"id",
"question", "answers": [{"text", "answer_start"}], "is_impossible" (v2.0), "plausible_answers"
(v2.0, unanswerable questions)}]}]}]}. `answer_start` is a character offset into the context.

The features follow Hugging Face's run_qa.py (the recipe RoBERTa SQuAD results are produced with)
for a fast tokenizer with offsets: question first, the context truncated into windows of
`max_len` tokens that overlap by `doc_stride` tokens, every window padded to `max_len`. A training
window is labelled with the token span of the first gold answer, or with the CLS token when the
answer is not wholly inside it or the question has none. Evaluation keeps each window's example
id and the character offsets of its context tokens, so `best_answers` can cut the answer out of
the context. Functions here take and return plain Python / numpy: Ray Data jobs call them per batch.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

Example = dict[str, Any]
Reject = dict[str, Any]
PASSED_TOKENIZER_KEYS = ("input_ids", "attention_mask", "token_type_ids")


# --- reading the official JSON -------------------------------------------------------------------
def _reject(reason: str, detail: str, qid: Any = None, title: Any = None) -> Reject:
    return {
        "id": qid if isinstance(qid, str) else None,
        "title": title if isinstance(title, str) else None,
        "reason": reason,
        "detail": detail,
    }


def _check_answers(answers: Any, context: str, field: str) -> tuple[list[str], list[int], str, str]:
    """(texts, starts, reason, detail): reason "" when every answer is well-formed and found in the
    context at its `answer_start` (one bad gold answer rejects the question: which of its answers
    the file meant cannot be told)."""
    if not isinstance(answers, list):
        return [], [], "missing_field", f"{field} is not a list"
    texts, starts = [], []
    for n, answer in enumerate(answers):
        if not isinstance(answer, Mapping) or "text" not in answer or "answer_start" not in answer:
            return [], [], "missing_field", f"{field}[{n}] needs text and answer_start"
        text, start = answer["text"], answer["answer_start"]
        if not isinstance(text, str):
            return [], [], "non_string_text", f"{field}[{n}].text is {type(text).__name__}"
        if not text.strip():
            return [], [], "empty_answer", f"{field}[{n}].text is empty"
        if isinstance(start, bool) or not isinstance(start, int):
            return [], [], "missing_field", f"{field}[{n}].answer_start is {type(start).__name__}, not an int"
        if not 0 <= start <= len(context) - len(text):
            return (
                [],
                [],
                "answer_start_out_of_range",
                (f"{field}[{n}]: {len(text)} characters at {start} do not fit a {len(context)}-character context"),
            )
        if context[start : start + len(text)] != text:
            return (
                [],
                [],
                "answer_text_mismatch",
                (f"{field}[{n}]: context at {start} reads {context[start : start + len(text)]!r}, not {text!r}"),
            )
        texts.append(text)
        starts.append(start)
    return texts, starts, "", ""


def _read_question(qa: Any, context: str, title: Any, seen: set[str]) -> tuple[Example | None, Reject | None]:
    if not isinstance(qa, Mapping):
        return None, _reject("missing_field", f"question is {type(qa).__name__}, not an object", title=title)
    qid = qa.get("id")
    if not isinstance(qid, str) or not qid:
        return None, _reject("missing_field", "id missing or not a non-empty string", title=title)
    if qid in seen:
        return None, _reject("duplicate_id", "an earlier question has this id", qid, title)
    seen.add(qid)
    question = qa.get("question")
    if question is None:
        return None, _reject("missing_field", "question missing", qid, title)
    if not isinstance(question, str):
        return None, _reject("non_string_text", f"question is {type(question).__name__}", qid, title)
    if not question.strip():
        return None, _reject("empty_question", "question is empty", qid, title)
    impossible = qa.get("is_impossible", False)
    if not isinstance(impossible, bool):
        return None, _reject("missing_field", f"is_impossible is {type(impossible).__name__}, not a bool", qid, title)
    if "answers" not in qa:
        return None, _reject("missing_field", "answers missing", qid, title)
    texts, starts, reason, detail = _check_answers(qa["answers"], context, "answers")
    if reason:
        return None, _reject(reason, detail, qid, title)
    if impossible and texts:
        return None, _reject(
            "impossible_with_answers", f"is_impossible is true but {len(texts)} answers are given", qid, title
        )
    if not impossible and not texts:
        return None, _reject("no_answers", "an answerable question without answers", qid, title)
    plausible: list[str] = []
    if "plausible_answers" in qa:  # only carried along: no score uses them
        plausible, _, reason, detail = _check_answers(qa["plausible_answers"], context, "plausible_answers")
        if reason:
            return None, _reject(reason, detail, qid, title)
    return {
        "id": qid,
        "title": title if isinstance(title, str) else "",
        "question": question,
        "context": context,
        "answers": texts,
        "answer_starts": starts,
        "is_impossible": impossible,
        "plausible_answers": plausible,
    }, None


def read_squad(dataset: Mapping | list) -> tuple[list[Example], list[Reject]]:
    """Flatten a parsed SQuAD file (or its "data" list) into one example per question.

    Example: id, title, question, context, answers (texts), answer_starts, is_impossible,
    plausible_answers (texts). A record that cannot be used is a reject {id, title, reason,
    detail} -- never an exception; the first of two questions with one id is kept. Reasons:
    missing_field, non_string_text, empty_question, empty_answer, answer_start_out_of_range,
    answer_text_mismatch, duplicate_id, impossible_with_answers, no_answers, and
    missing_context (every question of a paragraph without a usable context)."""
    examples: list[Example] = []
    rejects: list[Reject] = []
    articles = dataset.get("data") if isinstance(dataset, Mapping) else dataset
    if not isinstance(articles, list):
        return [], [_reject("missing_field", 'no "data" list')]
    seen: set[str] = set()
    for a, article in enumerate(articles):
        paragraphs = article.get("paragraphs") if isinstance(article, Mapping) else None
        if not isinstance(paragraphs, list):
            rejects.append(_reject("missing_field", f"data[{a}] has no paragraphs list"))
            continue
        title = article.get("title")
        for p, paragraph in enumerate(paragraphs):
            qas = paragraph.get("qas") if isinstance(paragraph, Mapping) else None
            if not isinstance(qas, list):
                rejects.append(_reject("missing_field", f"data[{a}].paragraphs[{p}] has no qas list", title=title))
                continue
            context = paragraph.get("context")
            if not isinstance(context, str) or not context.strip():
                for qa in qas:
                    qid = qa.get("id") if isinstance(qa, Mapping) else None
                    rejects.append(
                        _reject(
                            "missing_context",
                            f"data[{a}].paragraphs[{p}].context missing, empty or not a string",
                            qid,
                            title,
                        )
                    )
                continue
            for qa in qas:
                example, reject = _read_question(qa, context, title, seen)
                if example is not None:
                    examples.append(example)
                else:
                    rejects.append(reject)
    return examples, rejects


def questions_for_eval(dataset: Mapping | list) -> tuple[list[Example], list[Reject]]:
    """Every question the official script scores, as {id, question, context}: only the id, the
    question and its paragraph's context must be usable (the script never reads answer_start, so a
    dev question with a misplaced one is still asked). The rest are set aside with a reason."""
    rows: list[Example] = []
    aside: list[Reject] = []
    seen: set[str] = set()
    articles = dataset.get("data") if isinstance(dataset, Mapping) else dataset
    for article in articles if isinstance(articles, list) else []:
        paragraphs = article.get("paragraphs") if isinstance(article, Mapping) else None
        for paragraph in paragraphs if isinstance(paragraphs, list) else []:
            if not isinstance(paragraph, Mapping):
                continue
            context, qas = paragraph.get("context"), paragraph.get("qas")
            for qa in qas if isinstance(qas, list) else []:
                qid = qa.get("id") if isinstance(qa, Mapping) else None
                question = qa.get("question") if isinstance(qa, Mapping) else None
                if not isinstance(qid, str) or qid in seen:
                    aside.append(_reject("duplicate_id" if qid in seen else "missing_field", "id", qid))
                elif not isinstance(question, str) or not question.strip():
                    aside.append(_reject("empty_question", "question missing, empty or not a string", qid))
                elif not isinstance(context, str) or not context.strip():
                    aside.append(_reject("missing_context", "context missing, empty or not a string", qid))
                else:
                    rows.append({"id": qid, "question": question, "context": context})
                if isinstance(qid, str):
                    seen.add(qid)
    return rows, aside


def question_fits(question: str, tokenizer, max_len: int, doc_stride: int) -> bool:
    """Whether windows of max_len tokens can hold this question and still move through the context
    (<s> q </s></s> context </s>, and more new context per window than the stride re-reads). The
    tokenizer raises on a longer question, or panics outright, for the whole batch."""
    n = len(tokenizer(str(question).lstrip(), add_special_tokens=False)["input_ids"])
    return n + 4 + doc_stride < max_len


# --- token features ------------------------------------------------------------------------------
def _rows(examples: Sequence[Example] | Mapping[str, Sequence]) -> list[Example]:
    """Examples as a list of dicts; a dict of columns (a Ray Data / HF batch) is turned into rows."""
    if isinstance(examples, Mapping):
        keys = list(examples)
        n = len(examples[keys[0]]) if keys else 0
        return [{k: examples[k][i] for k in keys} for i in range(n)]
    return list(examples)


def _windows(rows: list[Example], tokenizer, max_len: int, doc_stride: int):
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("the SQuAD features need a fast tokenizer (offset mappings)")
    if tokenizer.padding_side != "right":
        raise ValueError("question first, context second: the tokenizer must pad on the right")
    # run_qa.py strips the question's leading whitespace: some questions have a lot, and it would eat the window
    return tokenizer(
        [str(r["question"]).lstrip() for r in rows],
        [r["context"] for r in rows],
        truncation="only_second",
        max_length=max_len,
        stride=doc_stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
        padding="max_length",
    )


def _columns(encoded) -> dict[str, Any]:
    return {k: np.asarray(encoded[k], dtype=np.int64) for k in PASSED_TOKENIZER_KEYS if k in encoded}


def _context_range(sequence_ids: list[int | None]) -> tuple[int, int]:
    """First and last token index of the context (sequence 1) in one window."""
    first = sequence_ids.index(1)
    last = len(sequence_ids) - 1 - sequence_ids[::-1].index(1)
    return first, last


def answer_token_span(
    offsets: Sequence[Sequence[int]], sequence_ids: list[int | None], start_char: int, end_char: int
) -> tuple[int, int] | None:
    """Token indices (start, end) of the characters start_char..end_char of the context in one
    window, or None when the window does not hold all of them.

    Start is the last context token starting at or before start_char, end the first one ending at
    or after end_char -- run_qa.py's rule, kept inside the context tokens (run_qa.py's scan can run
    on into the padding when the answer starts in the window's last token)."""
    first, last = _context_range(sequence_ids)
    if not (offsets[first][0] <= start_char and offsets[last][1] >= end_char):
        return None
    start = first
    while start + 1 <= last and offsets[start + 1][0] <= start_char:
        start += 1
    end = last
    while end - 1 >= first and offsets[end - 1][1] >= end_char:
        end -= 1
    return start, end


def features_for_training(
    examples: Sequence[Example] | Mapping[str, Sequence], tokenizer, max_len: int, doc_stride: int
) -> dict[str, Any]:
    """Training windows: input_ids, attention_mask (and token_type_ids when the tokenizer makes
    them) as int64 arrays [windows, max_len], start_positions / end_positions [windows], and
    example_id (list) naming each window's question. Windows without the whole first gold answer,
    and every window of an unanswerable question, point both labels at the CLS token."""
    rows = _rows(examples)
    if not rows:
        return {
            "input_ids": np.zeros((0, max_len), np.int64),
            "attention_mask": np.zeros((0, max_len), np.int64),
            "start_positions": np.zeros(0, np.int64),
            "end_positions": np.zeros(0, np.int64),
            "example_id": [],
        }
    encoded = _windows(rows, tokenizer, max_len, doc_stride)
    starts, ends, example_ids = [], [], []
    for i, offsets in enumerate(encoded["offset_mapping"]):
        row = rows[encoded["overflow_to_sample_mapping"][i]]
        input_ids = encoded["input_ids"][i]
        if tokenizer.cls_token_id is not None and tokenizer.cls_token_id in input_ids:
            cls_index = input_ids.index(tokenizer.cls_token_id)
        elif tokenizer.bos_token_id is not None and tokenizer.bos_token_id in input_ids:
            cls_index = input_ids.index(tokenizer.bos_token_id)
        else:
            cls_index = 0
        span = None
        if row["answers"] and not row.get("is_impossible", False):
            start_char = row["answer_starts"][0]
            span = answer_token_span(offsets, encoded.sequence_ids(i), start_char, start_char + len(row["answers"][0]))
        start, end = span if span is not None else (cls_index, cls_index)
        starts.append(start)
        ends.append(end)
        example_ids.append(row["id"])
    return {
        **_columns(encoded),
        "start_positions": np.asarray(starts, np.int64),
        "end_positions": np.asarray(ends, np.int64),
        "example_id": example_ids,
    }


def features_for_eval(
    examples: Sequence[Example] | Mapping[str, Sequence], tokenizer, max_len: int, doc_stride: int
) -> dict[str, Any]:
    """Evaluation windows: the same token columns as training (the same windows, in the same
    order), example_id per window, and offset_mapping per window: (start, end) character offsets
    into the context for context tokens, None for question, special and padding tokens."""
    rows = _rows(examples)
    if not rows:
        return {
            "input_ids": np.zeros((0, max_len), np.int64),
            "attention_mask": np.zeros((0, max_len), np.int64),
            "example_id": [],
            "offset_mapping": [],
        }
    encoded = _windows(rows, tokenizer, max_len, doc_stride)
    example_ids, offset_mapping = [], []
    for i, offsets in enumerate(encoded["offset_mapping"]):
        sequence_ids = encoded.sequence_ids(i)
        example_ids.append(rows[encoded["overflow_to_sample_mapping"][i]]["id"])
        offset_mapping.append([tuple(o) if sequence_ids[k] == 1 else None for k, o in enumerate(offsets)])
    return {**_columns(encoded), "example_id": example_ids, "offset_mapping": offset_mapping}


# --- logits back to text -------------------------------------------------------------------------
def best_answers(
    examples: Sequence[Example] | Mapping[str, Sequence],
    features: Mapping[str, Any],
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    n_best: int = 20,
    max_answer_len: int = 30,
    null_threshold: float = 0.0,
    version_2: bool = False,
) -> dict[str, str]:
    """{question id: answer text} from per-window logits [windows, max_len] (rows in the order of
    `features_for_eval`), as run_qa.py's post-processing chooses it.

    Candidates are the n_best highest start and n_best highest end tokens of each window; a pair
    counts when both are context tokens, start <= end and it spans at most max_answer_len tokens;
    the best pair over all windows by start + end logit gives the text. v2.0: the null score is
    token 0's (CLS) start + end logit, the lowest over the windows; the answer is "" when
    null score - best span score > null_threshold. A question with no valid span answers ""."""
    start_logits = np.asarray(start_logits, dtype=np.float64)
    end_logits = np.asarray(end_logits, dtype=np.float64)
    n_windows = len(features["example_id"])
    if start_logits.shape[0] != n_windows or end_logits.shape != start_logits.shape:
        raise ValueError(f"{n_windows} windows but logits shaped {start_logits.shape} and {end_logits.shape}")
    windows_of: dict[str, list[int]] = defaultdict(list)
    for w, qid in enumerate(features["example_id"]):
        windows_of[qid].append(w)
    answers: dict[str, str] = {}
    for row in _rows(examples):
        best_score, best_offsets, null_score = -np.inf, None, np.inf
        for w in windows_of.get(row["id"], []):
            offsets = features["offset_mapping"][w]
            starts, ends = start_logits[w], end_logits[w]
            null_score = min(null_score, starts[0] + ends[0])
            top_starts = np.argsort(starts)[::-1][:n_best]
            top_ends = np.argsort(ends)[::-1][:n_best]
            for s in top_starts:
                if s >= len(offsets) or offsets[s] is None:
                    continue
                for e in top_ends:
                    if e >= len(offsets) or offsets[e] is None or e < s or e - s + 1 > max_answer_len:
                        continue
                    score = starts[s] + ends[e]
                    if score > best_score:
                        best_score, best_offsets = score, (offsets[s][0], offsets[e][1])
        if best_offsets is None:
            answers[row["id"]] = ""
        elif version_2 and null_score - best_score > null_threshold:
            answers[row["id"]] = ""
        else:
            answers[row["id"]] = row["context"][best_offsets[0] : best_offsets[1]]
    return answers


# --- a split by article --------------------------------------------------------------------------
def _article_name(a: int, article: Any) -> str:
    """An article's title; one without a string title is named by its position, `data[a]`."""
    title = article.get("title") if isinstance(article, Mapping) else None
    return title if isinstance(title, str) else f"data[{a}]"


def _articles(dataset: Mapping | list) -> list:
    articles = dataset.get("data") if isinstance(dataset, Mapping) else dataset
    return articles if isinstance(articles, list) else []


def article_split(dataset: Mapping | list, held_out_fraction: float, seed: int) -> dict[str, list[str]]:
    """{"train": titles, "held_out": titles}, each sorted: round(fraction x articles) articles, at
    least one and never all, drawn by a seeded shuffle of the sorted titles (the same split on every
    machine, whatever the file's article order). Two articles with one title are one article."""
    titles = sorted({_article_name(a, article) for a, article in enumerate(_articles(dataset))})
    if len(titles) < 2:
        raise ValueError(f"a split by article needs at least two articles, the file has {len(titles)}")
    n_held = min(max(round(held_out_fraction * len(titles)), 1), len(titles) - 1)
    order = list(titles)
    random.Random(seed).shuffle(order)
    held = set(order[:n_held])
    return {"train": [t for t in titles if t not in held], "held_out": [t for t in titles if t in held]}


def only_articles(dataset: Mapping | list, titles: Sequence[str]) -> dict:
    """The dataset with only the articles named (titles as `article_split` gives them), in file order."""
    keep = set(titles)
    kept = [article for a, article in enumerate(_articles(dataset)) if _article_name(a, article) in keep]
    return {**(dataset if isinstance(dataset, Mapping) else {}), "data": kept}
