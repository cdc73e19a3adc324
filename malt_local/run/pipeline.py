"""One `malt run`, start to finish: choose the run, check the model, load it, build the trees.

Everything a user can get wrong is checked before the database is written: the questions were
read by the caller, the model is identified by its engine (a GGUF path or alias resolved and its
header checked; a server asked what it serves), the templates rendered once, the engine made and
every question's length measured against its context, all before the run row goes in.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from malt_local.datasets.fields import FieldMap
from malt_local.datasets.sources import load_source
from malt_local.db.store import Store
from malt_local.diskspace import disk_guard
from malt_local.engines import (
    Engine,
    EngineOptions,
    HasLayout,
    MeasuresPrompts,
    ModelIdentity,
    PerRequestAdapters,
    engine_kind,
    identify_model,
    make_engine,
)
from malt_local.errors import MaltError
from malt_local.progress import OnProgress
from malt_local.prompts import PromptSet
from malt_local.questions.loading import Question
from malt_local.role_adapters import check_values, identity_of, load_adapters, resolve_adapters
from malt_local.run import too_long
from malt_local.run.judge import (
    JudgeModel,
    JudgePlan,
    JudgeSummary,
    check_judge_model,
    plan_judge,
    run_judge,
)
from malt_local.run.settings import (
    Run,
    RunSettings,
    RunSpec,
    check_same,
    choose_run,
    layout_changes,
    prompts_digest,
    settings_from_run,
    start_run,
    with_defaults,
)
from malt_local.run.tree import TreeRunner
from malt_local.tasks import task_identities


@dataclass(frozen=True)
class RunSummary:
    """What one `malt run` did; `as_dict` is its `--json` output."""

    run_id: str
    db: str
    questions: int
    questions_complete: int
    too_long: list[too_long.Skipped]
    nodes_total: int
    nodes_expected: int
    nodes_generated: int
    completion_tokens: int
    seconds: float
    tokens_per_second: float
    config: dict
    judge: JudgeSummary | None
    # The run went on under another KV layout than it was last made with ("name old (now
    # new)"): its trees will not match a fresh run's under either.
    layout_changed: list[str] = dataclasses.field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def run_tree(
    questions_path: Path | str,
    given: RunSettings,
    *,
    db_path: Path,
    model_spec: str | None,
    prompts_dir: Path | None,
    options: EngineOptions | None = None,
    limit: int | None = None,
    run_id: str | None = None,
    new_run: bool = False,
    engine_kind_name: str = "batched",
    on_progress: OnProgress | None = None,
    judge: bool = False,
    judge_model: str | None = None,
    adapter_values: tuple[str, ...] | list[str] = (),
    adapters_dir: Path | None = None,
    allow_mismatch: bool = False,
    fields: FieldMap | None = None,
) -> RunSummary:
    """Build (or continue) the run's trees, then judge them if asked, and say what was done.
    `on_progress` hears every stored node, then every verdict.

    With adapters (`adapters_dir`, a malt train folder, and `adapter_values`, `--adapter`
    ROLE=PATH[:SCALE]) each role's nodes are made under that role's LoRA stack, and the stack is
    part of the run's identity: a resume under other adapters is refused. `questions_path` may
    be an ``hf:`` source (`malt_local.datasets.sources`); `fields` renames its columns."""
    if limit is not None and limit < 1:
        raise MaltError(f"--limit must be at least 1 (got {limit})")
    kind = engine_kind(engine_kind_name)
    run: dict | None = None
    if db_path.exists() or run_id:
        store = Store(db_path, create=False)
        try:
            run = choose_run(store, run_id, new_run)
        finally:
            store.close()
    if run is not None:
        settings = settings_from_run(run, given)
        previous = Run.from_row(run).spec
        if not model_spec and kind.local == (previous.served_model is None):
            # Continuing on the same kind of engine: the run's own model.
            model_spec = run["model"] if kind.local else previous.served_model
    else:
        settings = with_defaults(given)
    questions = load_source(questions_path, settings.task, fields)[:limit]
    prompts = PromptSet(prompts_dir)
    prompts.check(questions)
    hashes = prompts.hashes()
    base = options or EngineOptions(max_tokens=settings.max_tokens or 512)
    base = dataclasses.replace(base, max_tokens=settings.max_tokens)
    if run is not None and previous.engine == kind.name and previous.layout:
        base = dataclasses.replace(base, layout=previous.layout)  # the resume keeps it
    check_values(adapter_values)
    identity = identify_model(kind.name, model_spec, base)
    engine_options = base.for_model(kind.local, identity.served_model or identity.model)
    remote = engine_options.remote
    adapters = resolve_adapters(
        adapter_values,
        adapters_dir,
        local=kind.local,
        engine_name=kind.name,
        model=identity,
        prompts_sha256=prompts_digest(hashes),
        allow_mismatch=allow_mismatch,
    )
    spec = RunSpec(
        model=identity.model,
        model_sha256=identity.sha256,
        n=settings.n,
        temperature=settings.temperature,
        top_p=settings.top_p,
        top_k=settings.top_k,
        max_tokens=settings.max_tokens,
        seed=settings.seed,
        theta=settings.theta,
        task=settings.task,
        prompts_sha256=prompts_digest(hashes),
        prompt_hashes=hashes,
        ignore_eos=bool(settings.ignore_eos),
        engine=kind.name,
        served_model=identity.served_model,
        role_models=dict(remote.role_models) if remote is not None else {},
        model_revision=identity.revision,
        adapters=identity_of(adapters),
        adapter_files={r: [str(i.path) for i in infos] for r, infos in adapters.items()},
        tasks=task_identities(q.task for q in questions),
    )
    if run is not None:
        check_same(run, spec, str(db_path))

    def resolve_judge(target: str) -> tuple[JudgeModel, str]:
        found = identify_model(kind.name, target, base)
        return JudgeModel(_judge_name(found), found.sha256), found.served_model or found.model

    judge_plan = plan_judge(
        judge=judge,
        judge_model=judge_model,
        task=settings.task,
        prompts_dir=prompts_dir,
        run_model=JudgeModel(_judge_name(identity), identity.sha256),
        run_target=identity.served_model or identity.model,
        resolve=resolve_judge,
    )

    engine = make_engine(kind.name, engine_options)
    try:
        handles = load_adapters(engine, adapters)
        if handles and isinstance(engine, PerRequestAdapters):
            engine.adapters_by_role(handles)  # the server applies them: no waves needed
            handles = {}
        if isinstance(engine, HasLayout):
            spec = dataclasses.replace(spec, layout=engine.layout())
        # Measured before anything is written: a huge question costs its time here, not after
        # a run row that a failure or Ctrl-C would leave behind.
        measured = measure_fit(questions, prompts, engine, spec.max_tokens)
    except BaseException:
        engine.close()
        raise
    with disk_guard(db_path):
        store = Store(db_path)
        try:
            if run is None:
                run = start_run(store, spec, join=not new_run)
            # Flags left out, a resume keeps the run's layout (`base.layout` above); flags that
            # change it win, and the run records the new one so later resumes keep that.
            layout_changed = layout_changes(run, spec)
            if layout_changed:
                store.set_run_layout(run["id"], spec.layout)
            if judge_plan is not None:
                check_judge_model(store, run["id"], judge_plan.name, judge_plan.model.sha256)
            store.add_questions(run["id"], questions)
            skipped = record_fit(store, run["id"], questions, measured)
            too_long_ids = {s.question_id for s in skipped}
            fitting = [q for q in questions if q.id not in too_long_ids]
            runner = TreeRunner(
                store,
                Run(run["id"], spec),
                fitting,
                engine,
                prompts,
                on_progress,
                role_adapters=handles or None,
            )
            started = time.monotonic()
            final = runner.execute()
            elapsed = time.monotonic() - started
        finally:
            engine.close()
            store.close()
        judged = None
        if judge_plan is not None:
            judge_options = _judge_options(base, kind.local, judge_plan)
            judged = run_judge(
                judge_plan,
                db_path,
                Run(run["id"], spec),
                lambda: make_engine(kind.name, judge_options),
                on_progress=on_progress,
            )
    return RunSummary(
        run_id=run["id"],
        db=str(db_path),
        questions=len(questions),
        questions_complete=final.questions_complete,
        too_long=skipped,
        nodes_total=final.done,
        nodes_expected=final.total,
        nodes_generated=final.generated,
        completion_tokens=final.completion_tokens,
        seconds=round(elapsed, 3),
        tokens_per_second=final.completion_tokens / elapsed if elapsed > 0 else 0.0,
        config=asdict(spec),
        judge=judged,
        layout_changed=layout_changed,
    )


def _judge_name(identity: ModelIdentity) -> str:
    """A verdict records the judge by file name (local) or served model id."""
    return Path(identity.model).name if identity.served_model is None else identity.model


def _judge_options(base: EngineOptions, local: bool, plan: JudgePlan) -> EngineOptions:
    """The judge's engine: the run's kind, on the judge model, sized for the run's prompts
    (`--ctx` sizes the tree's shared cache, not one verdict's)."""
    options = dataclasses.replace(base, judge=True, ctx=None, parallel=None, layout=None)
    return options.for_model(local, plan.target)


def measure_fit(
    questions: list[Question], prompts: PromptSet, engine: Engine, max_tokens: int
) -> list[too_long.Skipped]:
    """The questions too long for one node's context (`too_long`), measured, nothing written."""
    if not isinstance(engine, MeasuresPrompts):  # a server enforces its own context
        return []
    return too_long.find_too_long(
        questions, prompts, engine.prompt_length, max_tokens=max_tokens, limit=engine.node_context()
    )


def record_fit(
    store: Store, run_id: str, questions: list[Question], measured: list[too_long.Skipped]
) -> list[too_long.Skipped]:
    """Record and return the measured questions that get no tree in the run.

    A tree already started (under a larger --ctx) is continued, not dropped: which ones are
    started is read now, in the run's own database, rather than when they were measured.
    """
    started = too_long.started_questions(store, run_id)
    skipped = [s for s in measured if s.question_id not in started]
    too_long.record_skipped(store, run_id, [q.id for q in questions], skipped)
    return skipped
