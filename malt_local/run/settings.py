"""Which run a `malt run` continues, and what makes two runs the same.

A run is fixed by everything that shapes its nodes: model file (by sha256), n, sampling settings,
seed, θ, task and the prompt templates (by hash). Re-running continues the latest run; a flag the
user leaves out is taken from that run, a flag that contradicts it is an error that names the
difference. Mixing two configurations in one tree would corrupt its values silently, so
`--new-run` is the only way to change them.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import asdict, dataclass, field, fields

from malt_local import __version__
from malt_local.db.store import Store, utcnow
from malt_local.engines.base import check_sampling
from malt_local.errors import MaltError
from malt_local.tasks import check_task

# Settings that change the nodes, in the order a mismatch message lists them.
IDENTITY = (
    "model_sha256",
    "n",
    "temperature",
    "top_p",
    "top_k",
    "max_tokens",
    "seed",
    "theta",
    "task",
    "prompts_sha256",
    "ignore_eos",
    "role_models",
    "adapters",
    "tasks",
)


@dataclass
class RunSettings:
    """The settings a user can give; None means 'not given' (a resumed run keeps its own).

    `DEFAULTS` is what a new run takes for each one left out; `malt run --help` shows them.
    """

    n: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    max_tokens: int | None = None
    seed: int | None = None
    theta: float | None = None
    task: str | None = None
    ignore_eos: bool | None = None

    DEFAULTS = {
        "n": 3,
        "temperature": 0.3,
        "top_p": 1.0,
        "top_k": 0,
        "max_tokens": 512,
        "seed": 0,
        "theta": 0.5,
        "ignore_eos": False,
    }

    def validate(self) -> None:
        if self.n is not None and self.n < 1:
            raise MaltError(f"--n must be at least 1 (got {self.n})")
        if self.n is not None and self.n > 6:
            raise MaltError(f"--n {self.n} gives {self.n**3} leaves per question; use n <= 6")
        check_sampling(
            temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
            max_tokens=self.max_tokens, seed=self.seed,
        )  # fmt: skip
        if self.theta is not None and not 0 <= self.theta <= 1:  # NaN fails it too
            raise MaltError(f"--theta must be in [0, 1] (got {self.theta})")
        check_task(self.task)


@dataclass
class RunSpec:
    """A complete run configuration, as stored in `runs`."""

    model: str
    model_sha256: str
    n: int
    temperature: float
    top_p: float
    top_k: int
    max_tokens: int
    seed: int
    theta: float
    task: str | None
    prompts_sha256: str
    prompt_hashes: dict = field(default_factory=dict)
    ignore_eos: bool = False
    # How the nodes were made (not identity: any engine may continue a run of the same model).
    engine: str = "batched"
    # A served model (`--engine openai`): the name given, and per-role served names.
    served_model: str | None = None
    role_models: dict = field(default_factory=dict)
    # A declared revision of the weights behind a served model (`--model-revision`).
    model_revision: str | None = None
    # The engine's memory layout when the run began (`HasLayout`; the batched engine's KV
    # plan): not identity, but the texts follow it, so a resume on the same engine keeps it.
    layout: dict = field(default_factory=dict)
    # Per-role LoRA adapters (`--adapters`, `--adapter`): role -> [[sha256, scale], ...] in the
    # order applied. Identity: other adapters make other nodes. {} is the base model (and every
    # run made before malt run took adapters).
    adapters: dict = field(default_factory=dict)
    # Where those files were (not identity), for the export's record.
    adapter_files: dict = field(default_factory=dict)
    # The tasks grading its questions: name -> "name@version:source-sha256" (`Task.identity`).
    # Identity: stored rewards were given by these graders. {} in runs made before tasks had one.
    tasks: dict = field(default_factory=dict)

    def row(self, run_id: str) -> dict:
        cfg = asdict(self)
        return {
            "id": run_id,
            "created_at": utcnow(),
            "model": self.model,
            "model_sha256": self.model_sha256,
            "n": self.n,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "max_tokens": self.max_tokens,
            "seed": self.seed,
            "theta": self.theta,
            "task": self.task,
            "prompts_sha256": self.prompts_sha256,
            "prompt_hashes": json.dumps(self.prompt_hashes, sort_keys=True),
            "tool_version": __version__,
            "config": json.dumps(cfg, sort_keys=True),
        }


@dataclass(frozen=True)
class Run:
    """A stored run: its id and its configuration, typed (what `TreeRunner` works from)."""

    id: str
    spec: RunSpec

    @classmethod
    def from_row(cls, row: dict) -> Run:
        return cls(row["id"], stored_spec(row))


def prompts_digest(hashes: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest()


def new_run_id() -> str:
    return "r" + secrets.token_hex(4)


def stored_spec(run: dict) -> RunSpec:
    cfg = json.loads(run["config"])
    names = {f.name for f in fields(RunSpec)}
    return RunSpec(**{k: v for k, v in cfg.items() if k in names})


def settings_from_run(run: dict, given: RunSettings) -> RunSettings:
    """The user's settings with every unset one taken from the run being continued."""
    spec = stored_spec(run)
    merged = RunSettings()
    for f in fields(RunSettings):
        value = getattr(given, f.name)
        setattr(merged, f.name, getattr(spec, f.name) if value is None else value)
    return merged


def with_defaults(given: RunSettings) -> RunSettings:
    merged = RunSettings()
    for f in fields(RunSettings):
        value = getattr(given, f.name)
        setattr(merged, f.name, RunSettings.DEFAULTS.get(f.name) if value is None else value)
    return merged


def differences(old: RunSpec, new: RunSpec) -> list[str]:
    out = []
    for name in IDENTITY:
        a, b = getattr(old, name), getattr(new, name)
        if name == "tasks":
            # A task the run did not use yet is not a change; a run from before tasks had
            # identities ({}) is continued as it is.
            a = {k: v for k, v in a.items() if k in b}
            b = {k: v for k, v in b.items() if k in a}
        if a != b:
            label = {"model_sha256": "model", "prompts_sha256": "prompts"}.get(name, name)
            if name == "model_sha256":
                a, b = _model_label(old), _model_label(new)
            elif name == "prompts_sha256":
                a, b = "templates " + a[:8], "templates " + b[:8]
            elif name == "adapters":
                a, b = _adapters_label(a), _adapters_label(b)
            elif name == "tasks":
                label = "task grader"
                a, b = ", ".join(a.values()), ", ".join(b.values())
            out.append(f"{label} {a} (now {b})")
    return out


def _adapters_label(adapters: dict) -> str:
    """`{generator: [[sha, 1.0]]}` as "generator 1a2b3c4d"; "none" for the base model."""
    if not adapters:
        return "none"
    return ", ".join(
        f"{role} " + "+".join(sha[:8] + ("" if scale == 1 else f":{scale}") for sha, scale in stack)
        for role, stack in adapters.items()
    )


def _model_label(spec: RunSpec) -> str:
    if spec.served_model is None:
        return spec.model
    return spec.model + (f"@{spec.model_revision}" if spec.model_revision else "")


def choose_run(store: Store, run_id: str | None, new_run: bool) -> dict | None:
    """The run to continue, or None for a new one."""
    if run_id and new_run:
        raise MaltError("--run and --new-run exclude each other")
    if run_id:
        run = store.run(run_id)
        if run is None:
            known = ", ".join(r["id"] for r in store.runs()) or "none"
            raise MaltError(f"no run '{run_id}' in {store.path} (runs: {known})")
        return run
    if new_run:
        return None
    return store.latest_run()


def check_same(run: dict, spec: RunSpec, db_path: str) -> None:
    diffs = differences(stored_spec(run), spec)
    if diffs:
        raise MaltError(
            f"run {run['id']} in {db_path} was made with {', '.join(diffs)}; "
            "pass --new-run to start a new run, or leave the flag out to continue it"
        )


def layout_changes(run: dict, spec: RunSpec) -> list[str]:
    """How `spec`'s layout differs from the one `run` was last made with, as "name old (now
    new)" items; [] when they agree, when either is unknown, or on another engine (which
    continues a run with its own layout)."""
    recorded = stored_spec(run)
    if not recorded.layout or not spec.layout or recorded.engine != spec.engine:
        return []
    return [
        f"{k} {recorded.layout.get(k)} (now {spec.layout.get(k)})"
        for k in sorted(set(recorded.layout) | set(spec.layout))
        if recorded.layout.get(k) != spec.layout.get(k)
    ]


def start_run(store: Store, spec: RunSpec, *, join: bool) -> dict:
    """Insert a new run, or, with `join`, continue the latest run if it has these settings.

    Processes started together on a new database (one per GPU) all find no run when they start;
    the first to get the write lock creates it and the others join it instead of each making
    its own.
    """
    with store.immediate():
        latest = store.latest_run() if join else None
        if latest is not None and not differences(stored_spec(latest), spec):
            return latest
        run_id = new_run_id()
        store.insert_run(spec.row(run_id))
    run = store.run(run_id)
    assert run is not None
    return run
