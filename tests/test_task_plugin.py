"""Adding a task is one task file + one registry line: proven by a task written here, in the test
file, registered at run time and run through the generic jobs (Ray Data records, Ray Train +
DeepSpeed on 2 workers, the evaluation job's actor pool) without touching pipelines/."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow as pa
import pytest

from adapter.adapter_file import ADAPTER_FILENAME, read_metadata
from adapter.prompts import render_prompt
from adapter.tokenizer import Tokenizer
from pipelines.data.record_output import OUTPUT_SCHEMA, from_rows, new_rows, set_record, write_output
from pipelines.evaluation.llama_predictor import predict
from pipelines.job_config import TrainConfig
from pipelines.tasks import TASKS, LlamaTask, UnknownTask, get_task, register
from tests.conftest import shared_file

WORDS = ["cat", "dog", "sun", "tree", "fish", "bird", "ball", "cake", "moon", "boat"]


class EncodeEcho:
    """Ray Data callable: each (instruction, word) row -> a tokenized record."""

    def __init__(self, tokenizer: str, prompt_template: str, max_seq_len: int):
        self.tok, self.template, self.max_seq_len = Tokenizer(tokenizer), prompt_template, max_seq_len

    def __call__(self, batch):
        rows = new_rows(batch.num_rows)
        rows["idx"], rows["key"] = batch.column("idx").to_pylist(), batch.column("key").to_pylist()
        for i, (split, word) in enumerate(zip(batch.column("split").to_pylist(), batch.column("word").to_pylist())):
            set_record(
                rows, i, self.tok, render_prompt(self.template, f"Say {word}."), word, self.max_seq_len, split, None
            )
        return pa.Table.from_pydict(rows, schema=OUTPUT_SCHEMA)


class Echo(LlamaTask):
    """A toy task: "Say <word>." -> "<word>"; scored by exact match of the greedy answer."""

    name = "echo-plugin-test"
    prompt_template = "alpaca"

    def fingerprint(self, cfg: TrainConfig) -> dict:
        return {"task": self.name, "words": WORDS, "limit": cfg.data.limit}

    def build_records(self, cfg: TrainConfig) -> dict:
        t0 = time.time()
        rows = [
            {"idx": i, "key": f"{w}-{i}", "split": "val" if i % 5 == 0 else "train", "word": w}
            for i, w in enumerate(WORDS * 6)
        ]
        processed = from_rows(rows).map_batches(
            EncodeEcho,
            fn_constructor_args=(cfg.model.tokenizer, self.prompt_template, cfg.data.max_seq_len),
            batch_format="pyarrow",
            concurrency=1,
        )
        stats = write_output(processed.materialize(), Path(cfg.data.out), cfg, self.fingerprint(cfg), {}, t0)
        assert stats["records_rejected"] == 0, stats["rejected_by_reason"]
        return stats

    def evaluate(self, cfg: TrainConfig, adapter: str, out: Path) -> dict:
        rows = [{"key": w, "prompt": self.prompt(f"Say {w}."), "image": None} for w in WORDS]
        preds = predict(cfg, adapter, rows)
        right = sum(1 for r in preds if r["generation"].strip().startswith(r["key"]))
        result = {"exact": 100 * right / len(preds), "answers": {r["key"]: r["generation"] for r in preds}}
        (out / "metrics.json").write_text(json.dumps(result))
        return {**result, "report": f"echo: {result['exact']}%"}


@pytest.fixture(scope="module")
def echo_task():
    task = register(Echo())
    yield task
    TASKS.remove(task)


def test_unknown_tasks_are_refused_with_the_known_names():
    with pytest.raises(UnknownTask, match="known tasks: alpaca, scienceqa, coco, image-classification, squad"):
        get_task("alpacca")


def test_a_task_registered_from_a_test_file_runs_through_training_and_evaluation(
    echo_task, ray_cluster, tmp_path_factory
):
    from pipelines.evaluate import run as evaluate
    from pipelines.train import run as train

    with pytest.raises(ValueError, match="already registered"):
        register(Echo())
    tmp = tmp_path_factory.mktemp("plugin")
    stories = shared_file("stories260K/params.json").parent
    cfg = TrainConfig.model_validate(
        {
            "task": echo_task.name,
            "name": "echo",
            "output_dir": str(tmp / "runs"),
            "model": {
                "base": str(stories),
                "tokenizer": str(stories / "tokenizer.model"),
                "adapter": {"adapter_len": 4, "adapter_layers": 2},
            },
            "data": {"source": "generated-in-the-test", "out": str(tmp / "data"), "max_seq_len": 160},
            "optim": {"recipe": "custom", "lr": 0.05, "epochs": 2, "warmup_epochs": 0.5, "micro_batch_size": 4},
            "workers": {"num_workers": 2, "cpus_per_worker": 0.5},
            "samples": {"instructions": ["Say cat."], "sampling": {"max_gen_len": 4, "temperature": 0}},
            "evaluation": {"max_gen_len": 4, "batch_size": 10},
        }
    )
    summary = train(cfg)
    assert summary["task"] == echo_task.name and summary["train_records"] == 48
    # The task's template travels with the adapter: serving reads it from the file.
    extra = read_metadata(Path(summary["adapter"]) / ADAPTER_FILENAME)["extra"]
    assert extra["task"] == echo_task.name and extra["prompt_template"] == "alpaca"
    losses = [json.loads(x) for x in open(summary["metrics"])]
    val = [r["val_loss"] for r in losses if r["kind"] == "val"]
    assert val[-1] < val[0], "the held-out loss of the plugin task fell"
    result = evaluate(cfg)
    assert set(result["answers"]) == set(WORDS) and 0 <= result["exact"] <= 100
    assert Path(tmp / "runs" / "echo" / f"eval-{echo_task.name}-test" / "metrics.json").is_file()
    print(f"\n[measured] echo plugin task: val loss {val[0]:.3f} -> {val[-1]:.3f}, exact {result['exact']}%")
