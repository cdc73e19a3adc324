"""The pages of `malt view`: each turns a request's parameters into a template and its context.

A page function reads through `data` and draws through `plots`; it never writes HTML itself.
Templates are rendered with autoescaping on, so questions and model outputs are always text.
"""

from __future__ import annotations

import math
import re
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from malt_local.db.store import Store
from malt_local.errors import MaltError
from malt_local.roles import ROLES
from malt_local.view import data, plots

REFRESH_SECONDS = 5  # a run page reloads itself this often while its run is unfinished
PAIRS_PER_PAGE = 100  # a big run has thousands of pairs: a page shows whole trees, ~100 pairs
QUESTIONS_PER_PAGE = 100  # and thousands of questions: a page shows 100
MAX_START = 10**9  # an offset beyond any run; a bigger one is refused, not sent to SQLite
TRISTATE = {"": None, "yes": True, "no": False}


@dataclass(frozen=True)
class Page:
    template: str
    context: dict


class NotFound(MaltError):
    """A page or record that does not exist: a 404, not a server error."""


def _one(params: dict[str, list[str]], name: str, default: str = "") -> str:
    values = params.get(name) or [default]
    return values[0]


def _whole(params: dict[str, list[str]], name: str) -> int:
    """A page offset: ASCII digits only (`str.isdigit` accepts '²', which `int` refuses), at
    most MAX_START; anything else is the user's mistake (a 400), not the server's."""
    text = _one(params, name, "0")
    if not (text.isascii() and text.isdigit() and len(text) <= 10 and int(text) <= MAX_START):
        raise MaltError(f"{name} must be a whole number up to {MAX_START} (got {text[:40]!r})")
    return int(text)


def index(store: Store, params: dict, figures: data.FiguresCache | None = None) -> Page:
    evals = "eval_runs" in store.db.table_names()
    return Page("index.html", {"runs": data.runs(store, figures), "has_evals": evals})


def run(store: Store, run_id: str, params: dict, figures: data.FiguresCache | None = None) -> Page:
    page = data.run_page(store, run_id, figures)
    status = page["run"]
    roles = status["roles"]
    bins = [f"{i / data.VALUE_BINS:.1f}" for i in range(data.VALUE_BINS)]
    value_chart = plots.bar_chart(
        "Value distribution per role (nodes per value bin)",
        [(b, [(r, page["value_hist"][r][i], None) for r in ROLES]) for i, b in enumerate(bins)],
        ylabel="nodes",
    )
    rate_chart = plots.bar_chart(
        "Positive rate per role",
        [(r, [("", 100 * (roles[r]["positive_rate"] or 0), None)]) for r in ROLES],
        ymax=100,
        ylabel="%",
        unit="%",
    )
    cap = page["length_cap"]
    step = cap / data.LENGTH_BINS
    length_chart = plots.bar_chart(
        f"Output length per role (nodes per token bin, max {cap})",
        [
            (f"{int(i * step)}", [(r, page["length_hist"][r][i], None) for r in ROLES])
            for i in range(data.LENGTH_BINS)
        ],
        ylabel="nodes",
    )
    return Page(
        "run.html",
        {
            **page,
            "charts": [value_chart, rate_chart, length_chart],
            "refresh": None if page["complete"] else REFRESH_SECONDS,
        },
    )


def questions(store: Store, run_id: str, params: dict) -> Page:
    try:
        flt = data.QuestionFilter(
            search=_one(params, "q").strip(),
            task=_one(params, "task"),
            solved=TRISTATE[_one(params, "solved")],
            positives=TRISTATE[_one(params, "positives")],
            truncated=TRISTATE[_one(params, "truncated")],
        )
    except KeyError as exc:
        raise MaltError(f"filter values are yes, no or empty (got {exc})") from exc
    start = _whole(params, "start")
    rows = data.questions(store, run_id, flt, start, QUESTIONS_PER_PAGE)
    total = data.question_count(store, run_id, flt)
    shown = {k: _one(params, k) for k in ("q", "task", "solved", "positives", "truncated")}
    query = urllib.parse.urlencode({k: v for k, v in shown.items() if v})

    def link(to: int) -> str:
        return "?" + (query + "&" if query else "") + f"start={to}"

    return Page(
        "questions.html",
        {
            "run_id": run_id,
            "rows": rows,
            "filter": flt,
            "params": shown,
            "tasks": data.tasks(store, run_id),
            "start": start,
            "total": total,
            "next": link(start + QUESTIONS_PER_PAGE)
            if start + QUESTIONS_PER_PAGE < total
            else None,
            "prev": link(max(0, start - QUESTIONS_PER_PAGE)) if start else None,
        },
    )


def tree(store: Store, run_id: str, question_id: str, params: dict) -> Page:
    if store.question(question_id) is None:
        raise NotFound(f"no question '{question_id}'")
    return Page("tree.html", data.tree(store, run_id, question_id))


def pairs(store: Store, run_id: str, params: dict) -> Page:
    role = _one(params, "role", "verifier")
    theta_text = _one(params, "theta")
    try:
        theta = float(theta_text) if theta_text else None
    except ValueError as exc:
        raise MaltError(f"theta must be a number (got {theta_text[:40]!r})") from exc
    if theta is not None and not math.isfinite(theta):
        raise MaltError(f"theta must be a finite number (got {theta_text[:40]!r})")
    after = _one(params, "after")
    if after and not re.fullmatch(r"[A-Za-z0-9_.:-]{1,200}", after):
        raise MaltError(f"after must be a question id (got {after[:40]!r})")
    first = _whole(params, "from")  # pairs before this page: for the numbering only
    # `malt export --keep-length-stopped`: length-stopped positives may be chosen sides.
    keep_stopped = _one(params, "keep_length_stopped")
    if keep_stopped not in ("", "0", "1"):
        raise MaltError(f"keep_length_stopped must be 0 or 1 (got {keep_stopped[:40]!r})")
    result = data.pairs_page(
        store, run_id, role, theta, after, PAIRS_PER_PAGE, keep_length_stopped=keep_stopped == "1"
    )
    keep = {"role": role, **({"theta": theta_text} if theta_text else {})}
    if keep_stopped == "1":
        keep["keep_length_stopped"] = "1"
    nxt = result["next"]
    return Page(
        "pairs.html",
        {
            "run_id": run_id,
            "role": role,
            "roles": ROLES,
            **result,
            "first": first,
            "keep_length_stopped": keep_stopped == "1",
            "next_link": "?"
            + urllib.parse.urlencode({**keep, "after": nxt, "from": first + len(result["pairs"])})
            if nxt
            else None,
            "first_link": "?" + urllib.parse.urlencode(keep) if after else None,
        },
    )


def evaluations(store: Store, params: dict) -> Page:
    evals = data.evaluations(store)
    for ev in evals:
        for bench in ev["benchmarks"]:
            bench["charts"] = _eval_charts(bench) if "accuracy" in bench else []
    return Page("evals.html", {"evals": evals})


def _eval_charts(bench: dict) -> list[plots.Chart]:
    acc = bench["accuracy"]
    charts = [
        plots.bar_chart(
            f"{bench['benchmark']}: accuracy (mean ± std over {bench['seeds']} seeds)",
            [(col, [("", s["mean"], s["std"])]) for col, s in acc.items()],
            ymax=100,
            ylabel="%",
            unit="%",
        )
    ]
    turnwise = bench.get("turnwise") or {}
    if turnwise:
        turns = ("after_generator", "after_verifier", "after_refiner")
        charts.append(
            plots.line_chart(
                f"{bench['benchmark']}: turn-wise accuracy",
                [
                    (col, [(i, t[k]["mean"], t[k]["std"]) for i, k in enumerate(turns)])
                    for col, t in turnwise.items()
                ],
                xlabels=["after G", "after V", "after R"],
                ymax=100,
                ylabel="%",
            )
        )
    correction = bench.get("self_correction") or {}
    if correction:
        labels = {
            "wrong_to_right": "wrong→right",
            "right_to_right": "right→right",
            "wrong_to_wrong": "wrong→wrong",
            "right_to_wrong": "right→wrong",
        }
        charts.append(
            plots.bar_chart(
                f"{bench['benchmark']}: self-correction (G answer → R answer)",
                [
                    (lab, [(col, c["percent"][k], None) for col, c in correction.items()])
                    for k, lab in labels.items()
                ],
                ymax=100,
                ylabel="%",
                unit="%",
            )
        )
    return charts


def training(train: Path | None, params: dict) -> Page:
    result = data.training(train)
    charts = []
    if result:
        for role, stages in sorted(result["curves"].items()):
            charts.append(
                plots.line_chart(
                    f"{role}: training loss",
                    [
                        (stage, [(s, loss, None) for s, loss in pts])
                        for stage, pts in stages.items()
                    ],
                    ylabel="loss",
                )
            )
    return Page("training.html", {"training": result, "charts": charts})
