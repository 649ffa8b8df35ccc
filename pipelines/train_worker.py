"""The training recipe Ray Train runs on every worker (METHOD.md section 5), in named stages as
torchtune's recipes are: `setup` -> `resume` -> `train_epoch` (each step: `train_step`, then
`validate` / `sample` / `save` where due) -> summary.

Each worker loads the frozen base (`adapter.loader.load_model`), builds the adaption prompts, and
hands DeepSpeed ZeRO-2 only the prompts module: the frozen base never enters DeepSpeed, so it is
neither broadcast nor bucketed. AdamW runs over the adapter parameters only. Rank 0 writes
metrics (buffered, flushed every few seconds), TensorBoard events and per-epoch samples.

Checkpoints hold DeepSpeed's state from every rank (each rank's ZeRO optimizer partition, with a
manifest of sizes and hashes), the adapter as safetensors, and `trainer_state.json` with the step
and the settings that fix the data order and the learning-rate schedule: a resume with other
settings is refused by name, because the batch order depends only on (seed, epoch) and the step.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from adapter.adapter import AdaptedLlama, AdaptionPrompts
from adapter.adapter_file import ADAPTER_FILENAME, AdapterFileError, load_adapter, save_adapter
from adapter.decoding import generate, prefixes_for
from adapter.flops import peak_flops_per_device, training_flops_per_token
from adapter.image_encoder import ImageEncoder, features_for
from adapter.loader import load_model
from adapter.prompts import format_prompt
from pipelines.batching import collate, epoch_order
from pipelines.config import ENCODER_TASKS, SamplesConfig, TrainConfig
from pipelines.data_source import sha256_of

STATE_FILE = "trainer_state.json"
DS_DIR = "deepspeed"
METRICS_FLUSH_S = 2.0  # rank 0 writes metrics at most this often (shared storage, host syncs)


class CheckpointError(RuntimeError):
    """A checkpoint folder that cannot be resumed from; the message names what is wrong."""


def lr_at(step: int, total_steps: int, warmup_steps: int, peak: float, floor: float = 0.0) -> float:
    """Linear warm-up per iteration, then half-cycle cosine down to `floor` (the authors' schedule)."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def deepspeed_config(cfg: TrainConfig, world_size: int, n_trainable: int) -> dict:
    o = cfg.optim
    # ZeRO-2's default buckets hold 5e8 elements (2 GB fp32 per backward); the adapter has ~1.2M.
    bucket = max(n_trainable, 1 << 16)
    return {
        "train_batch_size": o.micro_batch_size * o.grad_accum_steps * world_size,
        "train_micro_batch_size_per_gpu": o.micro_batch_size,
        "gradient_accumulation_steps": o.grad_accum_steps,
        "gradient_clipping": o.grad_clip,
        # Precision is ours: frozen weights already bf16 on GPU, adapter fp32. DeepSpeed's bf16
        # mode would cast the adapter to bf16 too.
        "zero_optimization": {
            "stage": 2,
            "contiguous_gradients": True,
            "overlap_comm": False,
            "reduce_bucket_size": bucket,
            "allgather_bucket_size": bucket,
        },
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def read_shard(name: str, expected: tuple[str, ...] = ()) -> dict[str, np.ndarray | list]:
    """This worker's whole share of a split, every column, ordered by record index (so the order
    does not depend on which block arrived first). Alpaca on 8 workers is about 3 MB of token ids
    per worker; multimodal records add image bytes, encoder tasks their own columns."""
    import ray.train

    shard = ray.train.get_dataset_shard(name)
    columns: dict[str, list] = defaultdict(list)
    for b in shard.iter_batches(batch_size=4096, batch_format="pyarrow"):
        for c in b.column_names:
            columns[c] += b.column(c).to_pylist()
    order = np.argsort(np.asarray(columns["idx"], dtype=np.int64), kind="stable")
    out = {c: [v[i] for i in order] for c, v in columns.items() if c != "idx"}
    out["idx"] = np.asarray(columns["idx"], dtype=np.int64)[order]
    for c in expected:  # an empty shard (fewer held-out records than workers) still has its columns
        out.setdefault(c, [])
    return out


def state_digest(module: torch.nn.Module, sample: int = 4096) -> str:
    """sha256 over an evenly strided sample of every tensor (all of a small one): proof that frozen
    weights stayed bit-for-bit equal, without copying a 13 GB base to the host. Training that
    touched a weight would change most of its elements, so a sample sees it."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        flat = t.detach().reshape(-1)
        picked = flat[:: max(1, flat.numel() // sample)][:sample]
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(picked.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
    return t


def write_manifest(folder: Path, rank: int) -> None:
    """Sizes and hashes of the DeepSpeed files this rank wrote: a truncated shard is caught before
    DeepSpeed tries to unpickle it."""
    files = {
        str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": sha256_of(p)}
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }
    (folder / f"manifest-rank{rank}.json").write_text(json.dumps({"rank": rank, "files": files}))


def read_trainer_state(folder: Path, settings: dict, adapter_file: str = ADAPTER_FILENAME) -> dict:
    """Check a checkpoint before resuming from it; return its trainer state. Every way it can be
    unusable (incomplete, corrupt, truncated, saved with other settings) is refused by name."""
    state_path = folder / STATE_FILE
    if not state_path.is_file():
        raise CheckpointError(f"{folder}: no {STATE_FILE}; not a finished checkpoint of this trainer")
    try:
        state = json.loads(state_path.read_text())
        int(state["step"])  # present and a number: resume reads it
        tag, saved = str(state["ds_tag"]), dict(state["settings"])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{state_path} is corrupt (not JSON: {e})") from None
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{state_path} is corrupt (missing or bad field {e})") from None
    if saved.get("world_size") != settings["world_size"]:
        raise CheckpointError(
            f"{folder}: saved by {saved.get('world_size')} workers; this run has "
            f"{settings['world_size']} (ZeRO optimizer partitions are per rank)"
        )
    changed = [f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in settings.items() if saved.get(k) != v]
    if changed:
        raise CheckpointError(
            f"{folder}: saved with other settings, so the data position and learning rate "
            f"would be wrong ({'; '.join(changed)}); resume with the same settings or start "
            "a new run (--set name=NEW)"
        )
    ds_dir = folder / DS_DIR
    manifests = sorted(ds_dir.glob("manifest-rank*.json"))
    if len(manifests) != settings["world_size"]:
        raise CheckpointError(
            f"{folder}: {len(manifests)} of {settings['world_size']} ranks' DeepSpeed manifests present in {ds_dir}"
        )
    for m in manifests:
        try:
            files = json.loads(m.read_text())["files"]
        except (json.JSONDecodeError, KeyError, UnicodeDecodeError):
            raise CheckpointError(f"{m} is corrupt") from None
        for rel, want in files.items():
            p = ds_dir / rel
            if not p.is_file():
                raise CheckpointError(f"{folder}: {rel} is missing")
            if p.stat().st_size != want["bytes"] or sha256_of(p) != want["sha256"]:
                raise CheckpointError(
                    f"{folder}: {rel} is truncated or corrupt ({p.stat().st_size} bytes, {want['bytes']} written)"
                )
    if not (ds_dir / tag).is_dir():
        raise CheckpointError(f"{folder}: no DeepSpeed state for tag {tag}")
    if not (folder / adapter_file).is_file():
        raise CheckpointError(f"{folder}: no {adapter_file}")
    return state


class FaultInjector:
    """`fail_at_step`: the last worker exits once at that step (a marker file makes it once per run)."""

    def __init__(self, at_step: int | None, marker: Path, is_victim: bool):
        self.at_step, self.marker, self.armed = at_step, marker, is_victim and at_step is not None

    def maybe_fail(self, step: int) -> None:
        if self.armed and step == self.at_step and not self.marker.exists():
            self.marker.write_text(f"worker killed at step {step}\n")
            print(f"[train] fault injection: a worker exits at step {step}", flush=True)
            os._exit(1)


class StageTimer:
    """Seconds spent per named stage, summed over the run."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, stage: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] += time.perf_counter() - t0


class MetricsLog:
    """metrics.jsonl, TensorBoard events and samples.jsonl, written by rank 0 only. Rows may hold
    device tensors; they are read (one host sync) and written when flushed."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.enabled, self.run_dir = enabled, run_dir
        self.pending: list[dict] = []
        self.last_flush = time.monotonic()
        self.tb = None
        if enabled:
            run_dir.mkdir(parents=True, exist_ok=True)
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))

    def add(self, row: dict, flush: bool = False) -> None:
        if not self.enabled:
            return
        self.pending.append(row)
        if flush or time.monotonic() - self.last_flush >= METRICS_FLUSH_S:
            self.flush()

    def flush(self) -> None:
        if not self.enabled or not self.pending:
            return
        rows = [{k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in r.items()} for r in self.pending]
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
                for k, v in row.items():
                    if row["kind"] in ("train", "val") and isinstance(v, (int, float)) and k not in ("step", "epoch"):
                        self.tb.add_scalar(f"{row.get('kind', 'train')}/{k}", v, row["step"])
        self.tb.flush()
        self.pending, self.last_flush = [], time.monotonic()

    def samples(self, step: int, epoch: float, rows: list[dict]) -> None:
        if not self.enabled:
            return
        with open(self.run_dir / "samples.jsonl", "a") as f:
            for r in rows:
                f.write(json.dumps({"step": step, "epoch": epoch, **r}) + "\n")


class AdapterRecipe:
    ADAPTER_FILE = ADAPTER_FILENAME  # the adapter inside each checkpoint (and the exported folder)
    SHARD_COLUMNS = ("input_ids", "labels")  # present even in an empty shard

    def __init__(self, cfg: TrainConfig, run_dir: Path, data_fingerprint: dict):
        self.cfg, self.run_dir, self.data_fingerprint = cfg, run_dir, data_fingerprint
        self.timer = StageTimer()
        self.step = 0
        self.val_loss: float | None = None

    # --- setup ----------------------------------------------------------------------------------
    def setup(self) -> None:
        import ray.train
        import ray.train.torch

        cfg = self.cfg
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.log = MetricsLog(self.run_dir, self.rank == 0)
        self.fault = FaultInjector(cfg.fail_at_step, self.run_dir / ".fault_injected", self.rank == self.world - 1)
        self.build_model()
        with self.timer("read_data"):
            self.train, self.val = (read_shard(split, self.SHARD_COLUMNS) for split in ("train", "val"))
        self.prepare_data()
        self.setup_optimizer()

    def build_model(self) -> None:
        """The frozen base, the trainable module (`self.prompts`, the only thing DeepSpeed sees) and
        the model that computes the loss."""
        cfg = self.cfg
        with self.timer("load_model"):
            loaded = load_model(cfg.model, device=self.device)
        self.base, self.tok, self.base_note = loaded.base, loaded.tokenizer, loaded.note
        self.encoder, projection = None, None
        if cfg.vision is not None:
            with self.timer("load_encoder"):
                self.encoder = ImageEncoder(cfg.vision, device=self.device, dtype=loaded.dtype)
        torch.manual_seed(cfg.optim.seed)  # identical initial prompts (and projection) on every rank
        if self.encoder is not None:
            projection = self.encoder.projection(cfg.vision.proj_hidden, self.base.args.dim, device=self.device)
        self.prompts = AdaptionPrompts(self.base.args, cfg.model.adapter, device=self.device, projection=projection)
        self.model = AdaptedLlama(self.base, self.prompts)
        self.n_adapted = cfg.model.adapter.layers_for(self.base.args)

    def prepare_data(self) -> None:
        """Per-record lengths (for length-grouped batches) and anything computed once per run."""
        with self.timer("encode_images"):
            self.train_images, self.val_images = self.encode_images(self.train), self.encode_images(self.val)
        self.lengths = np.array([len(x) for x in self.train["input_ids"]])

    def adapter_settings(self) -> dict:
        """What a checkpoint's adapter must share with the run that resumes from it."""
        out = {"adapter": self.cfg.model.adapter.to_dict()}
        if self.encoder is not None:
            out["vision"] = self.encoder.identity
        return out

    def device_peak_flops(self) -> float | None:
        if self.cfg.workers.peak_tflops:
            return self.cfg.workers.peak_tflops * 1e12
        if self.device.type != "cuda":
            return None
        return peak_flops_per_device(torch.cuda.get_device_name(self.device), self.base.tok_embeddings.weight.dtype)

    def setup_optimizer(self) -> None:
        import deepspeed

        cfg, o = self.cfg, self.cfg.optim
        self.steps_per_epoch = len(self.lengths) // o.micro_batch_size // o.grad_accum_steps
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"worker {self.rank} has {len(self.lengths)} training records: not one step of "
                f"{o.micro_batch_size} x {o.grad_accum_steps}"
            )
        self.total_steps = int(round(o.epochs * self.steps_per_epoch))
        self.stop_at = min(self.total_steps, cfg.stop_at_step or self.total_steps)
        warmup = int(round(o.warmup_epochs * self.steps_per_epoch))
        self.lr = o.peak_lr(self.world)
        trainable = [p for p in self.prompts.parameters() if p.requires_grad]  # a gate fixed at 1 is not
        opt = torch.optim.AdamW(trainable, lr=self.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_at(s, self.total_steps, warmup, self.lr, o.min_lr) / self.lr
        )
        n_trainable = sum(p.numel() for p in trainable)
        with self.timer("deepspeed_init"):
            # Only the adapter goes in: DeepSpeed would otherwise broadcast the frozen base.
            self.engine, _, _, self.sched = deepspeed.initialize(
                model=self.prompts,
                optimizer=opt,
                lr_scheduler=sched,
                config=deepspeed_config(cfg, self.world, n_trainable),
                dist_init_required=False,
            )
        # The settings a checkpoint must share with the run that resumes from it.
        self.settings = {
            "world_size": self.world,
            "micro_batch_size": o.micro_batch_size,
            "grad_accum_steps": o.grad_accum_steps,
            "epochs": o.epochs,
            "warmup_epochs": o.warmup_epochs,
            "seed": o.seed,
            "group_by_length": o.group_by_length,
            "peak_lr": self.lr,
            "min_lr": o.min_lr,
            "data_fingerprint": self.data_fingerprint,
            **self.adapter_settings(),
        }
        peak = self.device_peak_flops()
        self.peak_flops = peak * self.world if peak else None

    # --- resume ---------------------------------------------------------------------------------
    def resume(self) -> None:
        """A restart after a failure gets Ray's latest checkpoint; a new run may name one."""
        import ray.train

        from adapter.settings import project_path

        ckpt = ray.train.get_checkpoint()
        if ckpt is None and self.cfg.checkpoint.resume_from:
            ckpt = ray.train.Checkpoint(project_path(self.cfg.checkpoint.resume_from))
        if ckpt is None:
            return
        with self.timer("resume"), ckpt.as_directory() as d:
            state = read_trainer_state(Path(d), self.settings, self.ADAPTER_FILE)
            self.engine.load_checkpoint(
                str(Path(d) / DS_DIR),
                tag=state["ds_tag"],
                load_module_strict=True,
                load_optimizer_states=True,
                load_lr_scheduler_states=True,
            )
            try:
                saved = self.read_adapter(Path(d))
            except AdapterFileError as e:
                raise CheckpointError(str(e)) from None
            try:
                with torch.no_grad():
                    self.prompts.load_state_dict(saved)  # prompts, gates (and projection / head)
            except RuntimeError as e:
                raise CheckpointError(f"{d}: adapter does not fit this run ({e})") from None
            self.step = int(state["step"])

    def read_adapter(self, folder: Path) -> dict[str, torch.Tensor]:
        return load_adapter(folder / self.ADAPTER_FILE, self.base.args, device=self.device).state_dict()

    def write_adapter(self, folder: Path) -> None:
        save_adapter(
            self.prompts, self.base.args, folder / self.ADAPTER_FILE, extra={"step": self.step, "task": self.cfg.task}
        )

    # --- images (multimodal runs) ---------------------------------------------------------------
    def encode_images(self, split: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The encoder is frozen: each image's features are computed once per run, not every epoch."""
        if self.encoder is None:
            return None
        images = split.get("image") or [None] * len(split["input_ids"])
        parts = [features_for(self.encoder, images[i : i + 64], device="cpu") for i in range(0, len(images), 64)]
        if not parts:
            return torch.zeros(0, self.encoder.out_features), torch.zeros(0, dtype=torch.bool)
        return torch.cat([f for f, _ in parts]), torch.cat([p for _, p in parts])

    def image_inputs(self, encoded, rows) -> dict:
        """The loss's image arguments for these rows (nothing for a text-only run)."""
        if encoded is None:
            return {}
        feats, present = encoded
        return {"image_features": feats[rows].to(self.device), "image_present": present[rows].to(self.device)}

    # --- stages ---------------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self) -> float:
        with self.timer("validate"):
            sums = torch.zeros(2, dtype=torch.float64, device=self.device)
            mb = self.cfg.optim.micro_batch_size
            for i in range(0, len(self.val["input_ids"]), mb):
                ids, lab = collate(self.val["input_ids"][i : i + mb], self.val["labels"][i : i + mb])
                images = self.image_inputs(self.val_images, slice(i, i + mb))
                loss, n = self.model.loss(self.to_device(ids), self.to_device(lab), **images)
                sums += torch.stack([loss.double() * n, n.double()])
            total_loss, total_n = all_reduce_sum(sums).tolist()
            self.val_loss = total_loss / total_n if total_n else float("nan")
        self.log.add(
            {"kind": "val", "step": self.step, "epoch": self.step / self.steps_per_epoch, "val_loss": self.val_loss},
            flush=True,
        )
        return self.val_loss

    @torch.no_grad()
    def sample(self) -> None:
        """Rank 0 answers the fixed instructions (greedy by default): the run's before/after."""
        if self.rank != 0:
            return
        s: SamplesConfig = self.cfg.samples
        with self.timer("sample"):
            # ScienceQA trains on its own question/context/options text, not the Alpaca template.
            raw = self.cfg.task == "scienceqa"
            prompts = [self.tok.encode(i if raw else format_prompt(i)) for i in s.instructions]
            pre = prefixes_for(self.base, self.prompts)
            outs = generate(
                self.base,
                prompts,
                s.sampling,
                self.tok.eos_id,
                adapters=[pre] * len(prompts),
                generator=torch.Generator(device=self.device).manual_seed(0),
            )
        self.log.samples(
            self.step,
            self.step / self.steps_per_epoch,
            [{"instruction": i, "response": self.tok.decode(o)} for i, o in zip(s.instructions, outs)],
        )

    def save(self, metrics: dict) -> None:
        import ray.train

        val_loss = self.validate()
        with self.timer("checkpoint"), tempfile.TemporaryDirectory() as tmp:
            tag = f"step{self.step:08d}"
            ds_dir = Path(tmp) / DS_DIR
            self.engine.save_checkpoint(str(ds_dir), tag=tag, save_latest=False)
            write_manifest(ds_dir, self.rank)
            if self.rank == 0:
                self.write_adapter(Path(tmp))
                # Written last: its presence marks a complete checkpoint.
                (Path(tmp) / STATE_FILE).write_text(
                    json.dumps({"step": self.step, "ds_tag": tag, "val_loss": val_loss, "settings": self.settings})
                )
            ray.train.report(
                {**metrics, "val_loss": val_loss, "step": self.step},
                checkpoint=ray.train.Checkpoint.from_directory(tmp),
            )

    def to_device(self, t: torch.Tensor) -> torch.Tensor:
        """Host to GPU without a sync (pinned, non-blocking): a plain copy waits for the stream."""
        if self.device.type != "cuda":
            return t
        return t.pin_memory().to(self.device, non_blocking=True)

    def train_step(self, micro_batches: list[np.ndarray]) -> dict:
        """One optimizer step over grad_accum micro-batches. Nothing here reads a device value
        (the row's tensors are read when the log flushes); what still waits for the GPU is the
        loss's selection of response positions (a boolean index) and DeepSpeed's own overflow
        check of the gradient norm, once per step."""
        t0 = time.perf_counter()
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss x n, labelled, real tokens
        padded, flops = 0, 0.0
        for rows in micro_batches:
            ids, lab = collate([self.train["input_ids"][i] for i in rows], [self.train["labels"][i] for i in rows])
            real = torch.tensor(float(self.lengths[rows].sum()), dtype=torch.float64)
            images = self.image_inputs(self.train_images, torch.as_tensor(rows))
            loss, n = self.model.loss(self.to_device(ids), self.to_device(lab), **images)
            self.engine.backward(loss)
            self.engine.step()
            sums += torch.stack([loss.detach().double() * n, n.double(), self.to_device(real)])
            padded += ids.numel()
            # Logits at about half the positions (response tokens only): counted as half.
            flops += ids.numel() * training_flops_per_token(
                self.base.args, self.n_adapted, self.cfg.model.adapter.adapter_len, ids.shape[1], 0.5
            )
        self.step += 1
        loss_sum, n_lab, n_tok = all_reduce_sum(sums)
        dt = time.perf_counter() - t0
        flops_all = flops * self.world  # every rank does about the same work (length-grouped batches)
        return {
            "kind": "train",
            "step": self.step,
            "epoch": self.step / self.steps_per_epoch,
            "loss": loss_sum / n_lab.clamp(min=1),
            "lr": self.sched.get_last_lr()[0],
            "grad_norm": self.engine.get_global_grad_norm(),
            "tokens_per_s": n_tok / dt,
            "padded_tokens": padded * self.world,
            "step_time_s": dt,
            "tflops": flops_all / dt / 1e12,
            "mfu": flops_all / dt / self.peak_flops if self.peak_flops else None,
            "gate_abs_mean": self.prompts.gate.detach().abs().mean(),
        }

    def train_epoch(self) -> None:
        o, cfg = self.cfg.optim, self.cfg
        epoch = self.step // self.steps_per_epoch
        batches = epoch_order(self.lengths, o.micro_batch_size, o.seed, epoch, o.group_by_length)
        first = (self.step % self.steps_per_epoch) * o.grad_accum_steps
        batches = batches[first : self.steps_per_epoch * o.grad_accum_steps]
        for k in range(0, len(batches), o.grad_accum_steps):
            self.fault.maybe_fail(self.step)
            with self.timer("train"):
                row = self.train_step(batches[k : k + o.grad_accum_steps])
            self.log.add(row)
            end_of_epoch = self.step % self.steps_per_epoch == 0
            every_n = cfg.checkpoint.every_n_steps and self.step % cfg.checkpoint.every_n_steps == 0
            if end_of_epoch or every_n or self.step == self.stop_at:
                self.log.flush()
                if end_of_epoch:
                    self.sample()
                self.save({"loss": float(row["loss"]), "epoch": row["epoch"]})
            if self.step >= self.stop_at:
                return

    def run(self) -> dict:
        with self.timer("setup"):
            self.setup()
        self.resume()
        digest_start = state_digest(self.base) if self.rank == 0 else None
        self.log.add(
            {
                "kind": "start",
                "step": self.step,
                "total_steps": self.stop_at,
                "steps_per_epoch": self.steps_per_epoch,
                "world_size": self.world,
                "peak_lr": self.lr,
                "base_note": self.base_note,
            },
            flush=True,
        )
        if self.step == 0:
            self.validate()
            self.sample()
        if self.rank == 0:
            print(
                f"[train] {self.base_note}; {self.world} workers, {len(self.lengths)} records on rank 0, "
                f"{self.steps_per_epoch} steps/epoch, {self.total_steps} steps, peak lr {self.lr:.3g} "
                f"(recipe {self.cfg.optim.recipe})" + (f", resumed at step {self.step}" if self.step else ""),
                flush=True,
            )
        self.engine.train()
        while self.step < self.stop_at:
            self.train_epoch()
        self.log.flush()
        return {
            "steps": self.step,
            "total_steps": self.total_steps,
            "steps_per_epoch": self.steps_per_epoch,
            "base_note": self.base_note,
            "peak_lr": self.lr,
            "world_size": self.world,
            "base_digest_start": digest_start,
            "base_digest_end": state_digest(self.base) if self.rank == 0 else None,
            "worker_seconds": {k: round(v, 2) for k, v in self.timer.seconds.items()},
        }


def train_loop_per_worker(config: dict) -> dict:
    cfg = TrainConfig.model_validate(config["train"])
    recipe = AdapterRecipe
    if cfg.task in ENCODER_TASKS:  # ViT / RoBERTa (METHOD.md section 8): the same stages, another model
        from pipelines.encoder_recipe import EncoderRecipe as recipe
    return recipe(cfg, Path(config["run_dir"]), config["data_fingerprint"]).run()
