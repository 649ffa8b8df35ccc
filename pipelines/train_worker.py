"""The per-worker training loop that Ray Train runs on every worker (METHOD.md section 5).

Each worker: loads the frozen base, builds the adaption prompts, wraps them in a DeepSpeed ZeRO-2
engine with AdamW over the adapter parameters only, reads its shard of the tokenized data from
Ray Data, and trains. Rank 0 writes metrics, TensorBoard events and per-epoch samples.

Checkpoints hold DeepSpeed's state from every rank (each rank's ZeRO optimizer partition; the
frozen base is excluded), the adapter as safetensors, and `trainer_state.json` with the step:
the data position follows from the step, because the batch order depends only on (seed, epoch).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from adapter.adapter import AdaptedLlama, AdapterConfig, AdaptionPrompts
from adapter.adapter_file import ADAPTER_FILENAME, load_adapter, save_adapter
from adapter.checkpoint import load_base
from adapter.config import preset
from adapter.generation import SamplingParams, generate, prefixes_for
from adapter.model import Transformer
from adapter.prompts import format_prompt
from adapter.tokenizer import Tokenizer
from pipelines.batching import collate, epoch_order
from pipelines.config import TrainConfig

STATE_FILE = "trainer_state.json"
DS_DIR = "deepspeed"


class CheckpointError(RuntimeError):
    """A checkpoint folder that cannot be resumed from; the message names what is wrong."""


def lr_at(step: int, total_steps: int, warmup_steps: int, peak: float, floor: float = 0.0) -> float:
    """Linear warm-up per iteration, then half-cycle cosine down to `floor` (the authors' schedule)."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def peak_lr(cfg: TrainConfig, world_size: int) -> float:
    o = cfg.optim
    if o.recipe == "paper":
        return 9e-3
    if o.recipe == "custom":
        if o.lr is None:
            raise ValueError("optim.recipe 'custom' needs optim.lr")
        return o.lr
    return o.blr * o.micro_batch_size * o.grad_accum_steps * world_size / 256


def base_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype:
    """bf16 frozen weights on GPU (the adapter and its optimizer stay fp32), fp32 on CPU."""
    if cfg.model.dtype != "auto":
        return getattr(torch, cfg.model.dtype)
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def build_base(cfg: TrainConfig, dtype: torch.dtype, device: torch.device) -> tuple[Transformer, str]:
    m = cfg.model
    if m.base and Path(m.base).exists():
        return load_base(m.base, dtype=dtype, device=device), f"pretrained base from {m.base}"
    if m.preset:
        torch.manual_seed(1234)
        base = Transformer(preset(m.preset)).to(device=device, dtype=dtype).requires_grad_(False).eval()
        why = f"base {m.base} not found; " if m.base else ""
        return base, f"RANDOM-INITIALISED base of preset {m.preset!r} ({why}a last resort: outputs are noise)"
    raise FileNotFoundError(f"model.base {m.base} not found and no model.preset fallback given")


def deepspeed_config(cfg: TrainConfig, world_size: int) -> dict:
    o = cfg.optim
    return {
        "train_batch_size": o.micro_batch_size * o.grad_accum_steps * world_size,
        "train_micro_batch_size_per_gpu": o.micro_batch_size,
        "gradient_accumulation_steps": o.grad_accum_steps,
        "gradient_clipping": o.grad_clip,
        # Precision is ours: frozen weights already bf16 on GPU, adapter fp32. DeepSpeed's bf16
        # mode would cast the adapter to bf16 too.
        "zero_optimization": {"stage": 2, "contiguous_gradients": True, "overlap_comm": False},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def read_shard(name: str) -> dict[str, np.ndarray | list]:
    """This worker's whole share of a split, ordered by record index (so the order does not depend
    on which block arrived first). Alpaca on 8 workers is about 3 MB of token ids per worker."""
    import ray.train

    shard = ray.train.get_dataset_shard(name)
    idx, ids, labels = [], [], []
    for b in shard.iter_batches(batch_size=4096, batch_format="pyarrow"):
        idx += b.column("idx").to_pylist()
        ids += b.column("input_ids").to_pylist()
        labels += b.column("labels").to_pylist()
    order = np.argsort(np.asarray(idx, dtype=np.int64), kind="stable")
    return {"idx": np.asarray(idx)[order], "input_ids": [ids[i] for i in order],
            "labels": [labels[i] for i in order]}


def state_digest(module: torch.nn.Module) -> str:
    """sha256 over every tensor of a module: proof that frozen weights stayed bit-for-bit equal."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def all_reduce_sum(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
    return t.tolist()


@torch.no_grad()
def evaluate(model: AdaptedLlama, val: dict, micro_batch: int, device) -> float:
    loss_sum, n_sum = 0.0, 0
    model.eval()
    for i in range(0, len(val["input_ids"]), micro_batch):
        ids, lab = collate(val["input_ids"][i:i + micro_batch], val["labels"][i:i + micro_batch])
        loss, n = model.loss(ids.to(device), lab.to(device))
        loss_sum += loss.item() * n
        n_sum += n
    model.train()
    total_loss, total_n = all_reduce_sum([loss_sum, n_sum], device)
    return total_loss / total_n if total_n else float("nan")


@torch.no_grad()
def sample_responses(model: AdaptedLlama, tok: Tokenizer, cfg: TrainConfig) -> list[dict]:
    e = cfg.eval
    prompts = [tok.encode(format_prompt(instr)) for instr in e.instructions]
    pre = prefixes_for(model.base, model.adapter)
    outs = generate(model.base, prompts, SamplingParams(e.max_gen_len, temperature=e.temperature), tok.eos_id,
                    adapters=[pre] * len(prompts), generator=torch.Generator(device=model.base.output.weight.device).manual_seed(0))
    return [{"instruction": i, "response": tok.decode(o)} for i, o in zip(e.instructions, outs)]


def checkpoint_is_complete(folder: Path, world_size: int) -> dict:
    """Check a checkpoint before resuming from it; return its trainer state."""
    state_path = folder / STATE_FILE
    if not state_path.is_file():
        raise CheckpointError(f"{folder}: no {STATE_FILE}; not a finished checkpoint of this trainer")
    state = json.loads(state_path.read_text())
    if state.get("world_size") != world_size:
        raise CheckpointError(f"{folder}: saved by {state.get('world_size')} workers; this run has {world_size} "
                              "(ZeRO optimizer partitions are per rank)")
    tag_dir = folder / DS_DIR / state["ds_tag"]
    shards = list(tag_dir.glob("*optim_states.pt"))
    if len(shards) != world_size:
        raise CheckpointError(f"{folder}: {len(shards)} of {world_size} ZeRO optimizer shards present in {tag_dir}")
    if not (folder / ADAPTER_FILENAME).is_file():
        raise CheckpointError(f"{folder}: no {ADAPTER_FILENAME}")
    return state


class RankZeroLog:
    """metrics.jsonl, TensorBoard events and samples.jsonl, written by rank 0 only."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.enabled = enabled
        self.run_dir = run_dir
        self.tb = None
        if enabled:
            run_dir.mkdir(parents=True, exist_ok=True)
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(run_dir / "tensorboard"))

    def metrics(self, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        for k, v in row.items():
            if isinstance(v, (int, float)) and k not in ("step", "epoch"):
                self.tb.add_scalar(f"{row.get('kind', 'train')}/{k}", v, row["step"])
        self.tb.flush()

    def samples(self, step: int, epoch: float, rows: list[dict]) -> None:
        if not self.enabled:
            return
        with open(self.run_dir / "samples.jsonl", "a") as f:
            for r in rows:
                f.write(json.dumps({"step": step, "epoch": epoch, **r}) + "\n")


def train_loop_per_worker(config: dict) -> dict:
    import deepspeed
    import ray.train
    import ray.train.torch

    cfg = TrainConfig.model_validate(config["train"])
    timings = {"start": time.perf_counter()}
    run_dir = Path(config["run_dir"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    log = RankZeroLog(run_dir, rank == 0)
    o = cfg.optim

    dtype = base_dtype(cfg, device)
    base, base_note = build_base(cfg, dtype, device)
    tok = Tokenizer(cfg.data.tokenizer)
    torch.manual_seed(o.seed)  # identical initial prompts on every rank
    prompts = AdaptionPrompts(base.args, AdapterConfig(cfg.model.adapter_len, cfg.model.adapter_layers), device=device)
    model = AdaptedLlama(base, prompts)

    timings["model_ready"] = time.perf_counter()
    train = read_shard("train")
    timings["train_read"] = time.perf_counter()
    val = read_shard("val")
    timings["data_ready"] = time.perf_counter()
    lengths = np.array([len(x) for x in train["input_ids"]])
    micro_per_epoch = len(lengths) // o.micro_batch_size
    steps_per_epoch = micro_per_epoch // o.grad_accum_steps
    if steps_per_epoch == 0:
        raise ValueError(f"worker {rank} has {len(lengths)} training records: not one step of "
                         f"{o.micro_batch_size} x {o.grad_accum_steps}")
    total_steps = int(round(o.epochs * steps_per_epoch))
    warmup_steps = int(round(o.warmup_epochs * steps_per_epoch))
    lr = peak_lr(cfg, world)

    opt = torch.optim.AdamW(prompts.parameters(), lr=lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_at(s, total_steps, warmup_steps, lr, o.min_lr) / lr)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched,
                                           config=deepspeed_config(cfg, world), dist_init_required=False)
    timings["engine_ready"] = time.perf_counter()

    step = 0
    # A restart after a failure gets Ray's latest checkpoint; a new run may name one to start from.
    ckpt = ray.train.get_checkpoint()
    if ckpt is None and cfg.checkpoint.resume_from:
        ckpt = ray.train.Checkpoint(cfg.checkpoint.resume_from)
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = checkpoint_is_complete(Path(d), world)
            engine.load_checkpoint(str(Path(d) / DS_DIR), tag=state["ds_tag"], load_module_strict=False,
                                   load_optimizer_states=True, load_lr_scheduler_states=True)
            saved = load_adapter(Path(d), base.args, device=device)
            with torch.no_grad():
                prompts.prompt.copy_(saved.prompt)
                prompts.gate.copy_(saved.gate)
            step = state["step"]
    base_digest_start = state_digest(base)
    if step == 0:
        val_loss = evaluate(model, val, o.micro_batch_size, device)
        log.metrics({"kind": "val", "step": 0, "epoch": 0.0, "val_loss": val_loss})
    if rank == 0:
        print(f"[train] {base_note}; {world} workers, {len(lengths)} records on rank 0, {steps_per_epoch} "
              f"steps/epoch, {total_steps} steps, peak lr {lr:.3g} (recipe {o.recipe})"
              + (f", resumed at step {step}" if step else ""), flush=True)
        if step == 0:
            log.samples(0, 0.0, sample_responses(model, tok, cfg))

    stop_at = min(total_steps, cfg.stop_at_step or total_steps)
    fault_marker = run_dir / ".fault_injected"

    checkpoint_s = 0.0

    def save_and_report(metrics: dict) -> None:
        nonlocal checkpoint_s
        t_save = time.perf_counter()
        val_loss = evaluate(model, val, o.micro_batch_size, device)
        metrics = {**metrics, "val_loss": val_loss, "step": step}
        log.metrics({"kind": "val", "step": step, "epoch": step / steps_per_epoch, "val_loss": val_loss})
        with tempfile.TemporaryDirectory() as tmp:
            tag = f"step{step:08d}"
            engine.save_checkpoint(str(Path(tmp) / DS_DIR), tag=tag, exclude_frozen_parameters=True,
                                   save_latest=False)
            if rank == 0:
                save_adapter(prompts, base.args, Path(tmp), extra={"step": step})
                # Written last: its presence marks a complete checkpoint.
                (Path(tmp) / STATE_FILE).write_text(json.dumps(
                    {"step": step, "ds_tag": tag, "world_size": world, "steps_per_epoch": steps_per_epoch,
                     "total_steps": total_steps, "val_loss": val_loss, "seed": o.seed}))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        checkpoint_s += time.perf_counter() - t_save

    engine.train()
    timings["loop_start"] = time.perf_counter()
    while step < stop_at:
        epoch = step // steps_per_epoch
        batches = epoch_order(lengths, o.micro_batch_size, o.seed, epoch, o.group_by_length)
        first_micro = (step % steps_per_epoch) * o.grad_accum_steps
        batches = batches[first_micro: steps_per_epoch * o.grad_accum_steps]
        for k in range(0, len(batches), o.grad_accum_steps):
            if cfg.fail_at_step is not None and step == cfg.fail_at_step and rank == world - 1 \
                    and not fault_marker.exists():
                fault_marker.write_text(f"worker {rank} killed at step {step}\n")
                print(f"[train] fault injection: worker {rank} exits at step {step}", flush=True)
                os._exit(1)
            t0 = time.perf_counter()
            loss_sum, n_tok, n_lab = 0.0, 0, 0
            for rows in batches[k:k + o.grad_accum_steps]:
                ids, lab = collate([train["input_ids"][i] for i in rows], [train["labels"][i] for i in rows])
                loss, n = engine.module.loss(ids.to(device), lab.to(device))
                engine.backward(loss)
                engine.step()
                loss_sum += loss.item() * n
                n_lab += n
                n_tok += int(sum(len(train["input_ids"][i]) for i in rows))
            step += 1
            loss_sum, n_lab, n_tok = all_reduce_sum([loss_sum, n_lab, n_tok], device)
            dt = time.perf_counter() - t0
            row = {"kind": "train", "step": step, "epoch": step / steps_per_epoch, "loss": loss_sum / max(n_lab, 1),
                   "lr": sched.get_last_lr()[0], "grad_norm": float(engine.get_global_grad_norm() or 0.0),
                   "tokens_per_s": n_tok / dt, "step_time_s": dt, "gate_abs_mean": float(prompts.gate.abs().mean())}
            log.metrics(row)
            end_of_epoch = step % steps_per_epoch == 0
            every_n = cfg.checkpoint.every_n_steps and step % cfg.checkpoint.every_n_steps == 0
            if end_of_epoch or every_n or step == stop_at:
                if end_of_epoch and rank == 0:
                    log.samples(step, step / steps_per_epoch, sample_responses(model, tok, cfg))
                save_and_report({"loss": row["loss"], "epoch": row["epoch"]})
            if step >= stop_at:
                break
    end = time.perf_counter()
    seconds = {"load_model": timings["model_ready"] - timings["start"],
               "read_train": timings["train_read"] - timings["model_ready"],
               "read_val": timings["data_ready"] - timings["train_read"],
               "deepspeed_init": timings["engine_ready"] - timings["data_ready"],
               "before_loop": timings["loop_start"] - timings["engine_ready"],
               "loop": end - timings["loop_start"], "of_which_eval_and_checkpoint": checkpoint_s}
    return {"steps": step, "total_steps": total_steps, "steps_per_epoch": steps_per_epoch,
            "base_note": base_note, "peak_lr": lr, "world_size": world,
            "base_digest_start": base_digest_start, "base_digest_end": state_digest(base),
            "worker_seconds": {k: round(v, 2) for k, v in seconds.items()}}
