"""One `malt run`, start to finish: choose the run, check the model, load it, build the trees.

Everything a user can get wrong is checked before the database is written: the questions were
read by the caller, the model path or alias is resolved and its header checked, the templates
rendered once, and the model loaded, all before the run row goes in.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

from malt_local.batched_engine import make_engine
from malt_local.diskspace import disk_guard
from malt_local.errors import MaltError
from malt_local.hashing import cached_sha256
from malt_local.judge import check_judge_model, plan_judge, run_judge
from malt_local.llama_engine import check_gguf
from malt_local.prompts import PromptSet
from malt_local.questions import load_questions
from malt_local.runs import (
    RunSettings,
    RunSpec,
    check_same,
    choose_run,
    prompts_digest,
    settings_from_run,
    start_run,
    with_defaults,
)
from malt_local.store import Store
from malt_local.tree import TreeRunner, tree_size


def resolve_model_path(spec: str) -> tuple[Path, str | None]:
    """A GGUF path and its known sha256 (None: hash it) from a path or a pulled alias."""
    from malt_local.registry import resolve_model

    resolved = resolve_model(spec)
    check_gguf(Path(resolved.path))
    return Path(resolved.path), resolved.sha256


def context_size(max_tokens: int, requested: int | None) -> int:
    """Room for the refiner's prompt: question, answer, critique, and its own output."""
    if requested is not None:
        if requested < 256:
            raise MaltError(f"--ctx {requested} is too small (at least 256)")
        return requested
    return 3 * max_tokens + 2048


def run_tree(
    questions_path: Path,
    given: RunSettings,
    *,
    db_path: Path,
    model_spec: str | None,
    prompts_dir: Path | None,
    limit: int | None = None,
    run_id: str | None = None,
    new_run: bool = False,
    ctx: int | None = None,
    threads: int | None = None,
    gpu_layers: int | None = None,
    engine_kind: str = "batched",
    parallel: int | None = None,
    show_progress: bool = False,
    judge: bool = False,
    judge_model: str | None = None,
) -> dict:
    run: dict | None = None
    if db_path.exists() or run_id:
        store = Store(db_path, create=False)
        try:
            run = choose_run(store, run_id, new_run)
        finally:
            store.close()
    if run is not None:
        settings = settings_from_run(run, given)
        model_spec = model_spec or run["model"]
    else:
        settings = with_defaults(given)
    questions = load_questions(questions_path, settings.task)[:limit]
    prompts = PromptSet(prompts_dir)
    prompts.check(questions)
    hashes = prompts.hashes()
    if not model_spec:
        raise MaltError(
            "no model: pass --model PATH.gguf or a pulled alias "
            "(`malt pull smollm2-135m`), or set MALT_MODEL"
        )
    model_path, known_sha = resolve_model_path(model_spec)
    spec = RunSpec(
        model=str(model_path),
        model_sha256=known_sha or cached_sha256(model_path),
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
    )
    if run is not None:
        check_same(run, spec, str(db_path))
    judge_plan = plan_judge(
        judge=judge,
        judge_model=judge_model,
        task=settings.task,
        prompts_dir=prompts_dir,
        run_model_path=model_path,
        run_model_sha256=spec.model_sha256,
    )

    engine = make_engine(
        engine_kind,
        model_path,
        max_tokens=spec.max_tokens,
        seq_ctx=context_size(spec.max_tokens, ctx),
        ctx=ctx,
        threads=threads,
        gpu_layers=gpu_layers,
        parallel=parallel,
    )
    with disk_guard(db_path):
        store = Store(db_path)
        try:
            if run is None:
                run = start_run(store, spec, join=not new_run)
            if judge_plan is not None:
                check_judge_model(store, run["id"], judge_plan.name, judge_plan.sha256)
            store.add_questions(run["id"], questions)
            total = len(questions) * tree_size(spec.n)
            with progress_display(show_progress, total) as on_progress:
                runner = TreeRunner(store, run, questions, engine, prompts, on_progress)
                started = time.monotonic()
                final = runner.execute()
            elapsed = time.monotonic() - started
        finally:
            engine.close()
            store.close()
        judged = None
        if judge_plan is not None:
            with progress_display(show_progress, 0) as on_progress:
                judged = run_judge(
                    judge_plan,
                    db_path,
                    run,
                    n_ctx=context_size(spec.max_tokens, None),
                    threads=threads,
                    gpu_layers=gpu_layers,
                    on_progress=on_progress,
                )
    return {
        "run_id": run["id"],
        "db": str(db_path),
        "questions": len(questions),
        "questions_complete": final.questions_complete,
        "nodes_total": final.done,
        "nodes_expected": final.total,
        "nodes_generated": final.generated_nodes,
        "completion_tokens": final.completion_tokens,
        "seconds": round(elapsed, 3),
        "tokens_per_second": final.completion_tokens / elapsed if elapsed > 0 else 0.0,
        "config": asdict(spec),
        "judge": asdict(judged) if judged is not None else None,
    }


class progress_display:  # noqa: N801 - used as a context manager
    """A rich bar on stderr (done/total, tok/s, ETA), only on a terminal.

    `total` may be None until the first update (`malt eval` learns it when it starts).
    """

    def __init__(
        self, enabled: bool, total: int | None, label: str = "malt run", unit: str = "nodes"
    ) -> None:
        self.enabled = enabled
        self.total = total
        self.label = label
        self.unit = unit
        self._progress = None
        self._task = None

    def __enter__(self):
        if not self.enabled:
            return None
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.progress import (
            Progress as Bar,
        )

        self._progress = Bar(
            TextColumn(f"[bold]{self.label}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn(self.unit),
            TextColumn("{task.fields[tps]:.1f} tok/s"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
        )
        self._progress.start()
        self._task = self._progress.add_task(self.label, total=self.total, tps=0.0)
        return self.update

    def update(self, p) -> None:
        """Takes any progress record with done, total and tokens_per_second."""
        assert self._progress is not None
        self._progress.update(self._task, completed=p.done, total=p.total, tps=p.tokens_per_second)

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()
