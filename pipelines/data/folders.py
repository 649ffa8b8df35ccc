"""Output folders swapped in whole: a reader sees the old folder or the new one, never half of
either, and a crash at any point loses neither."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def replace_dir(new: Path, target: Path) -> Path:
    """Move the finished folder `new` to `target`. An existing `target` is renamed aside first
    and deleted only once `new` is in place (a crash in between leaves both on disk)."""
    new, target = Path(new), Path(target)
    aside = target.with_name(f"{target.name}.old-{os.getpid()}")
    if target.exists():
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(target, aside)
    os.replace(new, target)
    shutil.rmtree(aside, ignore_errors=True)
    return target


def fresh_tmp(target: Path) -> Path:
    """An empty sibling folder of `target` to build into (same file system: the rename is atomic)."""
    tmp = Path(target).with_name(f"{Path(target).name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp
