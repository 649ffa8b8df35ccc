"""Ray Train + DeepSpeed ZeRO-2 fine-tuning on 2 CPU workers (gloo), real local Ray.

One uninterrupted run is the reference; a stopped-and-resumed run and a run whose worker dies
once must both end in the same adapter (fp32 on CPU, deterministic data order: atol 1e-6).
"""

import json

import pytest
import torch

from adapter.adapter_file import load_adapter
from adapter.checkpoint import load_base
from pipelines.config import TrainConfig
from pipelines.train import run
from pipelines.train_worker import lr_at, state_digest
from tests.conftest import shared_file

ATOL = 1e-6


def _cfg(tmp, name, **over) -> TrainConfig:
    stories = shared_file("stories260K/params.json").parent
    data = {"source": str(shared_file("alpaca_data_first200.json")), "tokenizer": str(stories / "tokenizer.model"),
            "out": str(tmp / "data"), "max_seq_len": 320, "val_fraction": 0.1}
    cfg = {
        "name": name, "output_dir": str(tmp / "runs"), "data": data,
        "model": {"base": str(stories), "adapter_len": 4, "adapter_layers": 3},
        "optim": {"recipe": "custom", "lr": 0.02, "epochs": 1, "warmup_epochs": 0.1, "micro_batch_size": 2,
                  "grad_accum_steps": 2},
        "scaling": {"num_workers": 2, "cpus_per_worker": 0.5},
        "checkpoint": {"every_n_steps": 8, "keep": 2},
        "eval": {"instructions": ["Tell me a story."], "max_gen_len": 8},
    }
    for key, value in over.items():
        section, _, leaf = key.partition("__")
        if leaf:
            cfg[section][leaf] = value
        else:
            cfg[section] = value
    return TrainConfig.model_validate(cfg)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("train")


@pytest.fixture(scope="module")
def reference(ray_cluster, workdir):
    summary = run(_cfg(workdir, "reference"))
    return summary


def _adapter(summary):
    base = load_base(shared_file("stories260K/params.json").parent)
    return load_adapter(summary["adapter"], base.args)


def _metrics(summary, kind):
    rows = [json.loads(x) for x in open(summary["metrics"])]
    return [r for r in rows if r["kind"] == kind]


def test_training_lowers_loss_keeps_base_frozen_and_moves_gates(reference):
    val = _metrics(reference, "val")
    assert val[0]["step"] == 0 and val[-1]["step"] == reference["steps"] == reference["total_steps"]
    assert val[-1]["val_loss"] < val[0]["val_loss"] - 0.05, val
    train = _metrics(reference, "train")
    assert len(train) == reference["steps"] and all(r["grad_norm"] > 0 for r in train)
    # The frozen base on the workers is bit-for-bit the checkpoint on disk, before and after.
    disk = state_digest(load_base(shared_file("stories260K/params.json").parent))
    assert reference["base_digest_start"] == reference["base_digest_end"] == disk
    adapter = _adapter(reference)
    assert adapter.gate.abs().min() > 0 and adapter.gate.abs().mean() > 1e-2
    # The run leaves its artefacts where it says.
    for key in ("loss_plot", "samples"):
        assert open(reference[key], "rb").read(4)
    assert (json.loads(open(reference["adapter"] + "/training.json").read())["steps"] == reference["steps"])
    samples = [json.loads(x) for x in open(reference["samples"])]
    assert {s["step"] for s in samples} == {0, reference["steps"]}


def test_stopped_then_resumed_run_ends_in_the_same_adapter(reference, workdir):
    first = run(_cfg(workdir, "stopped", stop_at_step=8))
    assert first["steps"] == 8
    resumed = run(_cfg(workdir, "resumed", checkpoint__resume_from=first["final_checkpoint"]))
    assert resumed["steps"] == reference["steps"]
    a, b = _adapter(reference), _adapter(resumed)
    assert torch.allclose(a.prompt, b.prompt, atol=ATOL) and torch.allclose(a.gate, b.gate, atol=ATOL)


def test_worker_killed_once_resumes_from_checkpoint_and_finishes(reference, workdir):
    summary = run(_cfg(workdir, "fault", fail_at_step=12))
    marker = workdir / "runs" / "fault" / ".fault_injected"
    assert marker.is_file(), "the fault was never injected"
    assert summary["steps"] == reference["steps"]
    a, b = _adapter(reference), _adapter(summary)
    assert torch.allclose(a.prompt, b.prompt, atol=ATOL) and torch.allclose(a.gate, b.gate, atol=ATOL)


def test_lr_schedule_warms_up_then_follows_half_cosine():
    lrs = [lr_at(s, 100, 10, 1.0) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[55] == pytest.approx(0.5, abs=0.02) and lrs[-1] < 0.01


def test_incomplete_or_foreign_checkpoints_are_refused_by_name(tmp_path):
    from pipelines.train_worker import CheckpointError, checkpoint_is_complete

    with pytest.raises(CheckpointError, match="no trainer_state.json"):
        checkpoint_is_complete(tmp_path, 2)
    (tmp_path / "trainer_state.json").write_text(json.dumps({"step": 4, "ds_tag": "step00000004", "world_size": 8}))
    with pytest.raises(CheckpointError, match="saved by 8 workers; this run has 2"):
        checkpoint_is_complete(tmp_path, 2)
    (tmp_path / "deepspeed" / "step00000004").mkdir(parents=True)
    (tmp_path / "deepspeed" / "step00000004" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="1 of 8 ZeRO optimizer shards"):
        checkpoint_is_complete(tmp_path, 8)
