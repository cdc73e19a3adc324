"""What `malt eval` was asked for, and which of it names the evaluation.

`EvalSettings` holds the flags and checks them before anything is loaded or written. Only what
shapes a generation (model, sampling, seed, task, prompts) goes into the `identity` whose hash
is the eval run id, so re-running the same command resumes it, and a run with more votes,
samples or seeds reuses what is stored.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from malt_local.engines.base import SamplingParams, check_sampling
from malt_local.errors import MaltError
from malt_local.roles import ROLES
from malt_local.tasks import check_task

MODES = ("sa", "ma", "all")
# Upper bounds: each is a loop over passes, seeds or questions, so a typo (--votes 10**22)
# would otherwise run for ever instead of being one line; far above any published protocol.
MAX_VOTES = 1000
MAX_SEEDS = 1000
MAX_SAMPLES = 1_000_000
BASE = "base"


@dataclass(frozen=True)
class EvalSettings:
    """What `malt eval` was asked for.

    Temperature 0.3 is the paper's generation temperature; it does not state one for test time,
    and a positive temperature is what makes k votes differ at all.
    """

    mode: str = "all"
    votes: int = 3
    samples: int = 100
    seeds: int = 4
    temperature: float = 0.3
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 512
    seed: int = 0
    task: str | None = None

    def validate(self) -> None:
        if self.mode not in MODES:
            raise MaltError(f"--mode must be one of {', '.join(MODES)} (got {self.mode!r})")
        for flag, value, most in (("--votes", self.votes, MAX_VOTES),
                                  ("--samples", self.samples, MAX_SAMPLES),
                                  ("--seeds", self.seeds, MAX_SEEDS)):  # fmt: skip
            if not 1 <= value <= most:
                raise MaltError(f"{flag} must be in [1, {most}] (got {value!r})")
        check_sampling(
            temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
            max_tokens=self.max_tokens, seed=self.seed,
        )  # fmt: skip
        check_task(self.task)

    @property
    def roles(self) -> tuple[str, ...]:
        return ("generator",) if self.mode == "sa" else ROLES

    @property
    def with_sa(self) -> bool:
        return self.mode in ("sa", "all")

    @property
    def with_ma(self) -> bool:
        return self.mode in ("ma", "all")

    def params(self) -> SamplingParams:
        return SamplingParams(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            max_tokens=self.max_tokens,
        )


def identity(
    settings: EvalSettings, model_sha256: str, prompts_sha256: str, tasks: dict | None = None
) -> dict:
    """What shapes a generation; its hash is the eval run id.

    Mode, votes, samples and seeds are not in it: they only choose which generations are
    needed, and everything already stored under the same identity is reused.
    """
    return {
        "model_sha256": model_sha256,
        "temperature": settings.temperature,
        "top_p": settings.top_p,
        "top_k": settings.top_k,
        "max_tokens": settings.max_tokens,
        "seed": settings.seed,
        "task": settings.task,
        "prompts_sha256": prompts_sha256,
        # The graders (`Task.identity`): other graders make other grades, so another evaluation.
        "tasks": tasks or {},
    }


def eval_run_id(ident: dict) -> str:
    return "e" + hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]
