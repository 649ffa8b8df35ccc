"""Training checkpoints (not base weights: those are adapter/base_weights.py): what a checkpoint
folder holds, and the checks that refuse an unusable one by name before resuming from it.

A checkpoint holds DeepSpeed's state from every rank (each rank's ZeRO optimizer partition, with a
manifest of sizes and hashes), the adapter file, and `trainer_state.json` with the step and the
settings that fix the data order and the learning-rate schedule: a resume with other settings is
refused by name, because the batch order depends only on (seed, epoch) and the step.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from adapter.adapter_file import ADAPTER_FILENAME
from adapter.hashing import sha256_of

STATE_FILE = "trainer_state.json"  # written last: its presence marks a complete checkpoint
DS_DIR = "deepspeed"


class CheckpointError(RuntimeError):
    """A checkpoint folder that cannot be resumed from; the message names what is wrong."""


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
