"""The task registry: every task the jobs can run, in one plain list (docs/tasks.md).

Adding a task = one file beside these (a `LlamaTask` or `BackboneTask`, pipelines/tasks/base.py),
one line in TASKS, its config and its tests. Tasks never import each other.
"""

from __future__ import annotations

from pipelines.tasks.alpaca import Alpaca
from pipelines.tasks.base import BackboneTask, LlamaTask, Task
from pipelines.tasks.coco import Coco
from pipelines.tasks.image_classification import ImageClassification
from pipelines.tasks.scienceqa import ScienceQA
from pipelines.tasks.squad import Squad

TASKS: list[Task] = [
    Alpaca(),
    ScienceQA(),
    Coco(),
    ImageClassification(),
    Squad(),
]


class UnknownTask(ValueError):
    pass


def known_tasks() -> list[str]:
    return [t.name for t in TASKS]


def get_task(name: str) -> Task:
    for t in TASKS:
        if t.name == name:
            return t
    raise UnknownTask(f"unknown task {name!r}; known tasks: {', '.join(known_tasks())}")


def task_for(cfg) -> Task:
    """The config's task, checked against the config (each job calls this before any work)."""
    task = get_task(cfg.task)
    task.check_config(cfg)
    return task


def register(task: Task) -> Task:
    """Add a task from outside this package (a plugin or a test); its name must be new. Jobs hand the
    task object itself to Ray workers and actors, so it need not be registered in their processes."""
    if task.name in known_tasks():
        raise ValueError(f"a task named {task.name!r} is already registered")
    TASKS.append(task)
    return task


__all__ = [
    "TASKS",
    "BackboneTask",
    "LlamaTask",
    "Task",
    "UnknownTask",
    "get_task",
    "known_tasks",
    "register",
    "task_for",
]
