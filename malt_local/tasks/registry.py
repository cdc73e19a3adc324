"""Finding tasks by name: the built-in ones, packages' entry points, and `module:NAME`.

A package adds tasks by declaring entry points in the `malt.tasks` group, each naming a `Task`
subclass (or instance); `--task package.module:NAME` names one directly, with no packaging at all
(the current folder is searched too, so `--task mytask:Regex` finds `./mytask.py`). Plugins are
imported only when a task is looked up or listed, and a plugin that fails to import is an error
naming it, not a traceback.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from malt_local.errors import MaltError
from malt_local.tasks.base import Task
from malt_local.tasks.builtin import BUILTIN
from malt_local.tasks.code import Code

ENTRY_POINT_GROUP = "malt.tasks"

_BUILTIN: dict[str, type[Task]] = {cls.name: cls for cls in (*BUILTIN, Code)}
_cache: dict[str, Task] = {}


@dataclass(frozen=True)
class TaskInfo:
    """One task as `malt tasks` lists it."""

    name: str
    source: str
    version: str
    identity: str
    description: str


def _instance(obj: Any, where: str) -> Task:
    task = obj() if isinstance(obj, type) and issubclass(obj, Task) else obj
    if not isinstance(task, Task):
        raise MaltError(f"{where} is not a malt task (expected a malt_local.tasks.Task subclass)")
    if not task.name or not isinstance(task.name, str):
        raise MaltError(f"{where}: the task has no name")
    return task


def _import(spec: str) -> Task:
    """`package.module:NAME` -> the task it names."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise MaltError(f"task {spec!r}: expected a task name or package.module:NAME")
    try:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name.split(".")[0] or os.getcwd() in sys.path:
                raise
            sys.path.append(os.getcwd())  # `malt` is a console script: cwd is not on the path
            module = importlib.import_module(module_name)
    except Exception as exc:
        raise MaltError(f"task {spec!r}: cannot import {module_name}: {exc}") from exc
    try:
        obj = getattr(module, attr)
    except AttributeError:
        raise MaltError(f"task {spec!r}: {module_name} has no {attr}") from None
    return _instance(obj, f"task {spec!r}")


def _entry_points() -> list[metadata.EntryPoint]:
    return sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name)


def _load_entry_point(ep: metadata.EntryPoint) -> Task:
    where = f"task plugin {ep.name!r} ({ep.value})"
    try:
        obj = ep.load()
    except Exception as exc:
        raise MaltError(f"{where} failed to load: {exc}") from exc
    return _instance(obj, where)


def get_task(name: str) -> Task:
    """The task a question names: built-in, an entry point's, or `package.module:NAME`."""
    if name in _cache:
        return _cache[name]
    if name in _BUILTIN:
        task = _BUILTIN[name]()
    elif ":" in name:
        task = _import(name)
    else:
        found = [ep for ep in _entry_points() if ep.name == name]
        if not found:
            raise MaltError(f"unknown task {name!r}: choose one of {', '.join(task_names())}")
        task = _load_entry_point(found[0])
    _cache[name] = task
    return task


def check_task(name: str | None) -> None:
    """Fail now (one line) on a task that cannot be found, before anything is written."""
    if name is not None:
        get_task(name)


def task_names() -> list[str]:
    """Every task name `--task` accepts (without `module:NAME` ones), built-ins first."""
    names = list(_BUILTIN)
    names += [ep.name for ep in _entry_points() if ep.name not in _BUILTIN]
    return names


def known_tasks() -> list[TaskInfo]:
    """Built-ins, then each entry point's task; a broken plugin is listed with its error."""
    out = []
    for name, cls in _BUILTIN.items():
        task = cls()
        out.append(TaskInfo(name, "built-in", task.version, task.identity(), task.description))
    for ep in _entry_points():
        dist = getattr(ep, "dist", None)
        origin = f"{dist.name} {dist.version}" if dist is not None else "entry point"
        source = f"{origin} ({ep.value})"
        if ep.name in _BUILTIN:
            out.append(
                TaskInfo(ep.name, source, "-", "-", "ignored: a built-in task has this name")
            )
            continue
        try:
            task = get_task(ep.name)
        except MaltError as exc:
            out.append(TaskInfo(ep.name, source, "-", "-", f"broken: {exc}"))
            continue
        out.append(TaskInfo(ep.name, source, task.version, task.identity(), task.description))
    return out


def task_identities(names: Iterable[str]) -> dict[str, str]:
    """name -> `Task.identity()` for every task named (what a run or evaluation records)."""
    return {name: get_task(name).identity() for name in sorted(set(names))}
