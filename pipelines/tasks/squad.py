"""Extractive question answering (SQuAD v1.1 / v2.0) with zero-init prompts on a frozen
BERT-family encoder (BERT or RoBERTa, by the checkpoint's model_type; docs/encoders.md): one record
per token window (input_ids, attention_mask, token_type_ids, start_positions, end_positions;
pipelines/datasets/squad_format.py), held out by a seeded hash of the question id so every window
of a question lands on the same side; evaluation by exact match / F1 with the official
normalisation and v2.0 no-answer rule on `encoder.eval_source` (a dev file), the answers written as
the official `{qid: text}` predictions JSON beside the scores.

With `squad.held_out_articles` one file is split by article (the records hold only the training
articles' questions, the evaluation scores only the held-out articles'), the split recorded in
stats.json and metrics.json; `data.limit` takes a seeded sample (data.seed) of the questions.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray
import torch

from adapter.backbones.adapted import AdaptedBertFamily, adapt_bert_family, bert_family_spec, load_encoder_adapter
from adapter.backbones.bert_family import load_bert_family, load_tokenizer
from adapter.models import resolve_model
from adapter.settings import project_path
from pipelines.data.record_output import from_rows, sha256_file, write_output
from pipelines.data.splits import held_out
from pipelines.datasets.squad_format import (
    article_split,
    best_answers,
    features_for_eval,
    features_for_training,
    only_articles,
    question_fits,
    questions_for_eval,
    read_squad,
)
from pipelines.datasets.squad_metrics import is_version_2, score_dataset
from pipelines.evaluation.actor_pool import map_with_actor_pool
from pipelines.job_config import PreprocessConfig, TrainConfig
from pipelines.tasks.base import BackboneTask

# 2: the held-out split is the project's one hash rule (pipelines/data/splits.py); 3: token_type_ids,
# the split by article, data.limit a seeded sample
FORMAT_VERSION = 3
TOKEN_COLUMNS = ["input_ids", "attention_mask", "token_type_ids"]  # token_type_ids: BERT's segments, 0 for RoBERTa
SQUAD_COLUMNS = [*TOKEN_COLUMNS, "start_positions", "end_positions"]
SPLIT_NOTE = "a split of one SQuAD file by article (here the dev set), not the official train / dev protocol"
SQUAD_SCHEMA = pa.schema(
    [
        ("idx", pa.int64()),
        ("key", pa.string()),
        ("split", pa.string()),
        *[(c, pa.list_(pa.int32())) for c in TOKEN_COLUMNS],
        *[(c, pa.int64()) for c in SQUAD_COLUMNS[len(TOKEN_COLUMNS) :]],
        ("reject_reason", pa.string()),
        ("reject_detail", pa.string()),
    ]
)
WINDOWS_PER_QUESTION = 1000  # record idx = question index x this + window: unique, in reading order
SPAN_BATCH = 32  # windows per forward pass at evaluation


def encoder_folder(cfg: TrainConfig) -> Path:
    """The BERT-family checkpoint folder (weights, config.json, tokenizer) that `encoder.weights` names:
    a folder, or a catalogue model (fetched once, adapter/models.py)."""
    return resolve_model(cfg.encoder.weights)


def split_of(cfg: TrainConfig, dataset: dict) -> dict | None:
    """The split by article of `dataset` (the source file), with its settings; None without one."""
    s = cfg.squad
    if not s.held_out_articles:
        return None
    titles = article_split(dataset, s.held_out_articles, s.split_seed)
    return {"note": SPLIT_NOTE, "held_out_articles": s.held_out_articles, "split_seed": s.split_seed, **titles}


def squad_rows(cfg: TrainConfig) -> tuple[list[dict], dict]:
    """(rows for the windowing actors: questions, then rejects; what was kept and held out)."""
    dataset = json.loads(Path(cfg.data.source).read_text(encoding="utf-8"))
    examples, rejects = read_squad(dataset)
    kept = {"questions_read": len(examples)}
    split = split_of(cfg, dataset)
    if split:
        held = set(split["held_out"])  # no question of a held-out article is trained on (nor validated on)
        kept["held_out_article_questions"] = sum(e["title"] in held for e in examples)
        examples = [e for e in examples if e["title"] not in held]
        rejects = [r for r in rejects if r["title"] not in held]
        kept["article_split"] = split
    if cfg.data.limit and cfg.data.limit < len(examples):  # a seeded sample, spread over the file
        chosen = sorted(random.Random(cfg.data.seed).sample(range(len(examples)), cfg.data.limit))
        examples = [examples[i] for i in chosen]
    rows = [
        {
            "idx": i * WINDOWS_PER_QUESTION,
            "id": e["id"],
            "question": e["question"],
            "context": e["context"],
            "answers": e["answers"],
            "answer_starts": e["answer_starts"],
            "is_impossible": e["is_impossible"],
            "split": "val" if held_out((e["id"],), cfg.data.val_fraction, cfg.data.seed) else "train",
            "reason": "",
        }
        for i, e in enumerate(examples)
    ]
    n = len(rows)
    rows += [
        {
            "idx": (n + k) * WINDOWS_PER_QUESTION,
            "id": r["id"] or "",
            "question": "",
            "context": "",
            "answers": [],
            "answer_starts": [],
            "is_impossible": False,
            "split": "",
            "reason": r["reason"] + "\0" + r["detail"],
        }
        for k, r in enumerate(rejects)
    ]
    return rows, kept


class SquadWindows:
    """Questions -> token windows with span labels (a Ray Data actor: the tokenizer loads once)."""

    def __init__(self, tokenizer_folder: str, max_len: int, doc_stride: int):
        self.tok, self.max_len, self.doc_stride = load_tokenizer(tokenizer_folder), max_len, doc_stride

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = {name: [] for name in SQUAD_SCHEMA.names}
        for r in batch.to_pylist():
            if r["reason"]:
                reason, _, detail = r["reason"].partition("\0")
                self._append(out, r["idx"], r["id"], "", None, reason, detail)
                continue
            if not question_fits(r["question"], self.tok, self.max_len, self.doc_stride):
                self._append(
                    out,
                    r["idx"],
                    r["id"],
                    "",
                    None,
                    "question_too_long",
                    f"the question leaves no room for context in {self.max_len}-token windows "
                    f"(stride {self.doc_stride})",
                )
                continue
            f = with_segments(features_for_training([r], self.tok, self.max_len, self.doc_stride))
            if len(f["example_id"]) >= WINDOWS_PER_QUESTION:
                self._append(
                    out,
                    r["idx"],
                    r["id"],
                    "",
                    None,
                    "too_many_windows",
                    f"{len(f['example_id'])} windows of {self.max_len} tokens",
                )
                continue
            for w in range(len(f["example_id"])):
                self._append(out, r["idx"] + w, r["id"], r["split"], {c: f[c][w] for c in SQUAD_COLUMNS}, "", "")
        return pa.Table.from_pydict(out, schema=SQUAD_SCHEMA)

    @staticmethod
    def _append(out: dict, idx: int, key: str, split: str, window: dict | None, reason: str, detail: str) -> None:
        out["idx"].append(idx)
        out["key"].append(key)
        out["split"].append(split)
        for c in SQUAD_COLUMNS:
            v = None if window is None else window[c]
            out[c].append(v.tolist() if hasattr(v, "tolist") else v)
        out["reject_reason"].append(reason)
        out["reject_detail"].append(detail)


def with_segments(features: dict) -> dict:
    """token_type_ids of 0 where the tokenizer makes none (RoBERTa): every record has the same columns."""
    if "token_type_ids" not in features:
        features["token_type_ids"] = np.zeros_like(features["input_ids"])
    return features


class Answerer:
    """Ray Data actor: the frozen encoder + adapter (loaded once) cuts its questions into windows,
    runs them and picks each question's answer, so only the answers return to the driver."""

    def __init__(self, task: Squad, train_config: dict, adapter_path: str):
        self.cfg = TrainConfig.model_validate(train_config)
        self.device = torch.device("cuda" if ray.get_gpu_ids() else "cpu")  # the GPU Ray reserved, if any
        self.model = task.load_adapted(self.cfg, adapter_path, self.device)
        self.tok = load_tokenizer(encoder_folder(self.cfg))

    @torch.no_grad()
    def __call__(self, batch: dict) -> dict:
        e, max_len = self.cfg.encoder, self.cfg.data.max_seq_len
        examples = [
            {"id": q, "question": qu, "context": c}
            for q, qu, c in zip(batch["id"], batch["question"], batch["context"])
        ]
        # A question too long for a window is answered "" and listed (it would fail the whole batch).
        errors = [
            "" if question_fits(x["question"], self.tok, max_len, e.doc_stride) else "question_too_long"
            for x in examples
        ]
        asked = [x for x, err in zip(examples, errors) if not err]
        answers, windows = {}, {}
        if asked:
            features = with_segments(features_for_eval(asked, self.tok, max_len, e.doc_stride))
            tokens = [torch.as_tensor(features[c]) for c in TOKEN_COLUMNS]
            starts, ends = [], []
            for i in range(0, len(tokens[0]), SPAN_BATCH):
                rows = slice(i, i + SPAN_BATCH)
                s, t = self.model.span_logits(*(c[rows].to(self.device) for c in tokens))
                starts.append(s.float().cpu().numpy())
                ends.append(t.float().cpu().numpy())
            answers = best_answers(
                asked,
                features,
                np.concatenate(starts),
                np.concatenate(ends),
                max_answer_len=e.max_answer_len,
                null_threshold=e.null_threshold,
                version_2=bool(batch["version_2"][0]),
            )
            windows = {q: features["example_id"].count(q) for q in answers}
        return {
            "id": batch["id"],
            "prediction": np.array([answers.get(q, "") for q in batch["id"]], dtype=object),
            "windows": np.array([windows.get(q, 0) for q in batch["id"]]),
            "error": np.array(errors, dtype=object),
        }


def only_asked(dataset: dict, asked: set[str]) -> dict:
    """The dataset restricted to the questions asked (evaluation.limit): score only those."""
    articles = [
        {**a, "paragraphs": [{**p, "qas": [q for q in p["qas"] if q.get("id") in asked]} for p in a["paragraphs"]]}
        for a in dataset["data"]
    ]
    return {"version": dataset.get("version"), "data": articles}


class Squad(BackboneTask):
    name = "squad"
    description = "SQuAD extractive QA on a frozen BERT-family encoder (exact match / F1)"

    def check_config(self, cfg: PreprocessConfig) -> None:
        super().check_config(cfg)
        if cfg.encoder.doc_stride >= cfg.data.max_seq_len // 2:
            raise ValueError(
                f"encoder.doc_stride {cfg.encoder.doc_stride} must be below half of data.max_seq_len "
                f"{cfg.data.max_seq_len}: each window needs room for the question and new context"
            )
        split = getattr(cfg, "squad", None)  # a TrainConfig section
        if split and split.held_out_articles and project_path(cfg.encoder.eval_source) != project_path(cfg.data.source):
            raise ValueError(
                "squad.held_out_articles splits one file by article: set encoder.eval_source to data.source "
                f"({cfg.data.source}), not {cfg.encoder.eval_source}"
            )

    def fingerprint(self, cfg: TrainConfig) -> dict:
        d = cfg.data
        tokenizer = encoder_folder(cfg) / "tokenizer.json"
        return {
            "format": FORMAT_VERSION,
            "task": self.name,
            "val_fraction": d.val_fraction,
            "seed": d.seed,
            "limit": d.limit,
            "squad_sha256": sha256_file(Path(d.source)),
            "max_seq_len": d.max_seq_len,
            "doc_stride": cfg.encoder.doc_stride,
            "tokenizer_sha256": sha256_file(tokenizer) if tokenizer.is_file() else None,
            "held_out_articles": cfg.squad.held_out_articles,
            "split_seed": cfg.squad.split_seed,
        }

    def build_records(self, cfg: TrainConfig) -> dict:
        t0 = time.time()
        rows, kept = squad_rows(cfg)
        if not rows:
            raise ValueError(f"{cfg.data.source}: no records for task {self.name}")
        processed = from_rows(rows).map_batches(
            SquadWindows,
            fn_constructor_args=(str(encoder_folder(cfg)), cfg.data.max_seq_len, cfg.encoder.doc_stride),
            batch_format="pyarrow",
            batch_size=64,
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=2),
        )
        extra = {
            "task": self.name,
            "source": cfg.data.source,
            "questions": sum(1 for r in rows if not r["reason"]),
            **kept,
        }
        columns = ["idx", "key", *SQUAD_COLUMNS]
        return write_output(processed.materialize(), Path(cfg.data.out), cfg, self.fingerprint(cfg), extra, t0, columns)

    # --- the model ---------------------------------------------------------------------------------
    def build_model(self, cfg: TrainConfig, device, labels: list[str] | None = None):
        folder = encoder_folder(cfg)
        base = load_bert_family(folder, device=device)
        how = "fine-tuned" if cfg.encoder.adapter.gate == "full" else "frozen"
        note = f"{how} {base.config.model_type} from {folder.name}"
        return base, adapt_bert_family(base, cfg.encoder.adapter, folder), note

    def load_adapted(self, cfg: TrainConfig, adapter_path: str, device) -> AdaptedBertFamily:
        folder = encoder_folder(cfg)
        base = load_bert_family(folder, device=device)
        adapter = load_encoder_adapter(
            adapter_path, bert_family_spec(base, folder), device=device, backbone_module=base
        )
        return AdaptedBertFamily(base, adapter).eval()

    def inputs(self, cfg: TrainConfig, split: dict) -> dict[str, torch.Tensor]:
        return {k: torch.tensor(split.get(k, []), dtype=torch.long) for k in SQUAD_COLUMNS}

    def batch_loss(self, model, x: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-entropy over start and end positions; right = windows whose start and end both are."""
        start, end = model.span_logits(*(x[c] for c in TOKEN_COLUMNS))
        outside = start.shape[1]
        loss = (
            sum(
                torch.nn.functional.cross_entropy(lg, pos.clamp(0, outside), ignore_index=outside)
                for lg, pos in ((start, x["start_positions"]), (end, x["end_positions"]))
            )
            / 2
        )
        right = (start.argmax(-1) == x["start_positions"]) & (end.argmax(-1) == x["end_positions"])
        return loss, right.sum()

    # --- evaluation --------------------------------------------------------------------------------
    def evaluate(self, cfg: TrainConfig, adapter: str, out: Path) -> dict:
        t0 = time.time()
        if not cfg.encoder.eval_source:
            raise ValueError("task squad: set encoder.eval_source to the SQuAD dev file to score")
        dataset = json.loads(Path(cfg.encoder.eval_source).read_text(encoding="utf-8"))
        split = split_of(cfg, dataset)
        if split:  # only the held-out articles are asked and scored
            dataset = only_articles(dataset, split["held_out"])
        v2 = is_version_2(dataset)
        examples, rejects = questions_for_eval(dataset)
        examples = examples[: cfg.evaluation.limit] if cfg.evaluation.limit else examples
        rows = [{**x, "version_2": v2} for x in examples]
        t_pred = time.time()
        args = (self, cfg.model_dump(mode="json"), adapter)
        preds = map_with_actor_pool(pa.Table.from_pylist(rows), Answerer, args, cfg.evaluation)
        pred_s = time.time() - t_pred
        answers = {r["id"]: r["prediction"] for r in preds}
        if cfg.evaluation.limit:
            dataset = only_asked(dataset, set(answers))
        scores = score_dataset(dataset, answers, version_2=v2)
        result = {
            "task": self.name,
            "split": cfg.encoder.eval_source,
            "adapter": adapter,
            "gate": cfg.encoder.adapter.gate,
            "article_split": split,
            "version_2": v2,
            **scores,
            "questions": len(examples),
            "set_aside": rejects,
            "questions_per_s": round(len(examples) / pred_s, 2),
            "errors": [{"id": r["id"], "error": r["error"]} for r in preds if r["error"]],
            "seconds": round(time.time() - t0, 2),
            "out": str(out),
        }
        (out / "metrics.json").write_text(json.dumps(result, indent=2))
        # The official predictions format: any official evaluation script can rescore it.
        (out / "predictions.json").write_text(json.dumps(answers, indent=1, ensure_ascii=False))
        with open(out / "predictions.jsonl", "w") as f:
            for r in preds:
                line = {"id": r["id"], "prediction": r["prediction"], "windows": int(r["windows"])}
                f.write(json.dumps({**line, "error": r["error"] or None}) + "\n")
        result["report"] = (
            f"[evaluate] SQuAD {'v2.0' if v2 else 'v1.1'}: exact {result['exact']:.2f}, F1 {result['f1']:.2f} "
            f"on {result['total']} questions -> {out}"
        )
        if split:
            result["report"] += (
                f"\n[evaluate] held-out articles {len(split['held_out'])} of "
                f"{len(split['held_out']) + len(split['train'])} (seed {split['split_seed']}): {SPLIT_NOTE}"
            )
        return result
