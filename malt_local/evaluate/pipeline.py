"""`malt eval`: the three roles at test time, with majority voting, against the paper's baselines.

One evaluation, end to end: check every flag and file, load the model once, generate what is
missing and report the measures. The parts live in their own modules: `settings` (what was
asked for, and the eval run's identity), `benchmarks` (the protocol: samples, passes, seeds,
configurations, columns), `tables` (storage), `runner` (generating the missing turns),
`results` and `scores` (the measures) and `voting` (majority voting).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

from malt_local import __version__
from malt_local.datasets.fields import FieldMap
from malt_local.db.store import Store, utcnow
from malt_local.diskspace import disk_guard
from malt_local.engines.registry import EngineOptions, engine_kind, identify_model, make_engine
from malt_local.errors import MaltError
from malt_local.evaluate.benchmarks import (
    AdapterSet,
    adapter_set_id,
    column_names,
    load_benchmarks,
)
from malt_local.evaluate.runner import EvalRunner
from malt_local.evaluate.settings import BASE, EvalSettings, eval_run_id, identity
from malt_local.evaluate.tables import ensure_eval_run
from malt_local.progress import Progress
from malt_local.prompts import PromptSet
from malt_local.tasks import task_identities


def run_eval(
    paths: Sequence[Path | str],
    settings: EvalSettings,
    *,
    db_path: Path,
    model_spec: str | None,
    adapter_values: Sequence[str] = (),
    adapters_dir: Path | None = None,
    allow_mismatch: bool = False,
    prompts_dir: Path | None = None,
    options: EngineOptions | None = None,
    engine_kind_name: str = "batched",
    on_progress: Callable[[Progress], None] | None = None,
    fields: FieldMap | None = None,
) -> dict:
    """Check everything a user can get wrong, load the model once, evaluate, report.

    Every check (settings, adapters, questions, templates, model, adapter files) happens before
    the database is written, so a bad flag leaves nothing half-made. `adapters_dir` (a malt
    train folder) adds its roles' adapters before `adapter_values`, and must have been trained
    on this model and these prompts unless `allow_mismatch`.
    """
    from malt_local.role_adapters import check_values, load_adapters, resolve_adapters
    from malt_local.run.settings import prompts_digest

    settings.validate()
    if not paths:
        raise MaltError("no questions file given")
    benchmarks = load_benchmarks(paths, settings.task, fields)
    prompts = PromptSet(prompts_dir)
    prompts.check([q for b in benchmarks for q in b.questions])
    hashes = prompts.hashes()
    base = dataclasses.replace(
        options or EngineOptions(max_tokens=settings.max_tokens), max_tokens=settings.max_tokens
    )
    kind = engine_kind(engine_kind_name)
    check_values(adapter_values)
    model = identify_model(kind.name, model_spec, base)
    infos = resolve_adapters(
        adapter_values,
        adapters_dir,
        local=kind.local,
        engine_name=kind.name,
        model=model,
        prompts_sha256=prompts_digest(hashes),
        allow_mismatch=allow_mismatch,
    )
    engine_options = base.for_model(kind.local, model.served_model or model.model)
    model_sha = model.sha256
    remote = engine_options.remote
    role_models = dict(remote.role_models) if remote is not None else {}
    if role_models:
        # Other served names for some roles are other weights: another evaluation.
        model_sha += "|roles:" + json.dumps(role_models, sort_keys=True)
    tasks = task_identities(q.task for b in benchmarks for q in b.questions)
    ident = identity(settings, model_sha, prompts_digest(hashes), tasks)
    run_id = eval_run_id(ident)

    engine = make_engine(kind.name, engine_options)
    try:
        records = {role: [i.record() for i in role_infos] for role, role_infos in infos.items()}
        handles = load_adapters(engine, infos)
        adapter_sets = [AdapterSet(BASE)]
        if records:
            adapter_sets.append(AdapterSet(adapter_set_id(records), records, handles))
        with disk_guard(db_path):
            store = Store(db_path)
            try:
                row = {
                    "id": run_id,
                    "created_at": utcnow(),
                    "model": model.model,
                    # The graders are in `config` (and so in the id), not a column of their own.
                    **{k: v for k, v in ident.items() if k != "tasks"},
                    "prompt_hashes": json.dumps(hashes, sort_keys=True),
                    "tool_version": __version__,
                    "config": json.dumps(ident, sort_keys=True),
                }
                ensure_eval_run(store, row)
                runner = EvalRunner(
                    store, run_id, benchmarks, settings, engine, prompts, adapter_sets, on_progress
                )
                started = time.monotonic()
                progress = runner.execute()
                elapsed = time.monotonic() - started
                results = runner.results()
            finally:
                store.close()
    finally:
        engine.close()
    columns: list[str] = []
    for aset in adapter_sets:
        columns += list(column_names(settings, aset).values())
    return {
        "eval_run": run_id,
        "db": str(db_path),
        "model": model.model,
        "model_sha256": model_sha,
        "settings": asdict(settings),
        "adapter_set": adapter_sets[-1].id if records else None,
        "adapters": records,
        "columns": columns,
        "generations_total": progress.total,
        "generations_new": progress.generated,
        "completion_tokens": progress.completion_tokens,
        "seconds": round(elapsed, 3),
        **results,
    }
