"""The training tasks by name (``--task``): the one place that lists them.

Task modules define their classes and import nothing to register them; this module
imports each task module and lists its classes.  A task added at run time (a test, a
user's own subclass) goes through :func:`register_task`.
"""
from __future__ import annotations

from .avqa_task import AVQATask, SyntheticAVQATask
from .tasks import AVARTask, AVETask, SyntheticAVETask, Task

__all__ = ["TASKS", "register_task", "make_task", "task_names", "task_defaults"]

#: task name -> class, in ``--task`` choice order.
TASKS: dict[str, type[Task]] = {}


def register_task(cls: type[Task]) -> type[Task]:
    """Make ``cls`` available as ``--task cls.name`` (usable as a class decorator)."""
    if not cls.name:
        raise ValueError(f"register_task: {cls.__name__}.name is empty")
    TASKS[cls.name] = cls
    return cls


for _cls in (AVETask, AVARTask, SyntheticAVETask, AVQATask, SyntheticAVQATask):
    register_task(_cls)


def task_names() -> tuple:
    return tuple(TASKS)


def task_defaults(task: str) -> dict:
    """The TrainConfig values task ``task`` changes (``Task.defaults``)."""
    return dict(TASKS[task].defaults) if task in TASKS else {}


def make_task(cfg, classes: list | None = None) -> Task:
    """The task of TrainConfig ``cfg``; ``classes``: a trained model's (the task then
    evaluates it without reading data)."""
    if cfg.task not in TASKS:
        raise ValueError(f"task: expected one of {tuple(TASKS)}, got {cfg.task!r}")
    return TASKS[cfg.task](cfg, classes)
