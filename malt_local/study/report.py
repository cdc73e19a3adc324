"""`study/REPORT.md` and its figures, rendered from `study/results.json` alone.

The report is a pure function of the results dict, so a study can be re-rendered (or diffed)
without rerunning anything, and whatever the report claims is in the JSON next to it. Optional
parts that are absent (no training yet, no ablations, no conclusion) are left out, never
guessed. Text that came from users or models (paths, names, labels, details) goes through
`_cell`, so a ``|`` cannot break a table row and no Markdown or HTML markup survives; the one
piece of verbatim text, the command that reproduces the study, sits in a fenced code block.

The results dict:

================  =========================================================================
key               contents
================  =========================================================================
study             name, out, command (the one that reproduces it), created_at, finished_at
                  (str or None while the study runs), changes ([{at, settings: [str]}]:
                  settings of a stage not yet begun that changed after the study began)
config            flat settings: n, max_tokens, temperature, seed, votes, seeds, prompts,
                  task, the training settings …
environment       malt, python, llama_cpp_python, torch, transformers, peft, trl (str or
                  None: not installed), machine (str), cores (int)
model             path, sha256
prompts           dir, sha256 (the digest of the prompt files)
data              train and test: path, sha256, questions (int)
stages            [{name: trees|export|train|eval|report, seconds: float, detail: str}]
export            {role: {sft: int rows, dpo: int pairs, dropped: {reason: int}}}
training          {role: {sft|dpo: {steps, loss_first, loss_last, margin_first, margin_last
                  (float or None; DPO's reward margin), curve: [[step, loss], …]}}}
eval              questions, seeds, votes (ints), configs and comparisons:
eval.configs      {name: {label, accuracy: {sa, sa_mv, ma, ma_mv} in percent,
                  correct: {measure: [k, n]}, turnwise: {after_generator, after_verifier,
                  after_refiner} in percent, flips: {wrong_to_right, right_to_wrong, n}}};
                  names base (always), malt (all roles, SFT+DPO), sft (all roles, SFT only),
                  generator, verifier, refiner (only that role trained)
eval.comparisons  [{config, measure (sa|sa_mv|ma|ma_mv), **stats.Comparison.as_dict()}]
conclusion        optional Markdown written by the person who ran the study
================  =========================================================================
"""

from __future__ import annotations

import json
import math
import re

from malt_local.study.stats import wilson
from malt_local.study.svg import Bar, bar_chart, line_chart

MEASURES = {"sa": "SA", "sa_mv": "SA+MV", "ma": "MA", "ma_mv": "MA+MV"}
TURNS = {"after_generator": "after G", "after_verifier": "after V", "after_refiner": "after R"}
LIBRARIES = {
    "malt": "malt",
    "python": "Python",
    "llama_cpp_python": "llama-cpp-python",
    "torch": "torch",
    "transformers": "transformers",
    "peft": "peft",
    "trl": "trl",
}
CONFIG_ORDER = ("base", "malt", "sft", "generator", "verifier", "refiner")
HEADLINE = ("malt", "ma_mv")
LN2 = math.log(2.0)

# Markdown's inline punctuation, HTML's angle brackets and the table's pipe: backslash-escaped
# (CommonMark lets any ASCII punctuation be escaped), the backslash itself first.
_MARKUP = re.compile(r"([\\`*_\[\]<>|~])")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


def _cell(value: object) -> str:
    """User or model text, safe in a table cell or a sentence: on one line, markup escaped.

    ``|`` becomes ``\\|`` (GFM's escaped pipe); backslashes are doubled first, or a text
    ending in a backslash would escape the pipe that closes its cell.
    """
    if value is None:
        return "—"
    text = _CONTROL.sub(" ", str(value)).strip()
    return _MARKUP.sub(r"\\\1", text) if text else "—"


def _fence(text: str) -> str:
    """A fenced code block around `text`, its fence longer than any run of backticks in it."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}sh\n{text}\n{fence}"


def _num(value: object, digits: int = 1, signed: bool = False) -> str:
    """A number with fixed decimals ('—' when absent or not a number)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return "—"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _p(value: object) -> str:
    """A p-value: three decimals, or scientific below 0.001 so a small one does not read 0."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return "—"
    return f"{value:.3f}" if value >= 0.001 else f"{value:.1e}"


def _count(value: object, noun: str) -> str:
    """'1 seed', '2 seeds'; an absent count reads '—'."""
    if not isinstance(value, int) or isinstance(value, bool):
        return f"— {noun}s"
    return f"{value} {noun}" + ("" if value == 1 else "s")


def _duration(seconds: object) -> str:
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool):
        return "—"
    s = round(seconds)
    h, rest = divmod(s, 3600)
    m, sec = divmod(rest, 60)
    return f"{h}h {m:02d}m {sec:02d}s" if h else f"{m}m {sec:02d}s" if m else f"{seconds:.1f}s"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A GFM table; every cell is already escaped or formatted by its caller."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines + [""]


def _configs(results: dict) -> list[tuple[str, dict]]:
    """The evaluated configurations, base first, then the known ones, then any others."""
    configs = (results.get("eval") or {}).get("configs") or {}
    known = [name for name in CONFIG_ORDER if name in configs]
    return [(name, configs[name]) for name in known + [n for n in configs if n not in known]]


def _label(name: str, config: dict | None) -> str:
    return str((config or {}).get("label") or name)


def _measures(results: dict) -> list[str]:
    """The measures some configuration has, in the paper's column order."""
    present = {m for _, c in _configs(results) for m in (c.get("accuracy") or {})}
    return [m for m in MEASURES if m in present]


def _interval(config: dict, measure: str) -> tuple[float, float] | None:
    pair = (config.get("correct") or {}).get(measure)
    if not isinstance(pair, (list, tuple)) or len(pair) != 2:
        return None
    k, n = pair
    if not (isinstance(k, int) and isinstance(n, int)) or not 0 <= k <= n:
        return None
    return wilson(k, n)


def _headline(results: dict) -> dict | None:
    """The comparison the summary leads with: MALT's MA+MV if there is one, else the first."""
    comparisons = (results.get("eval") or {}).get("comparisons") or []
    for c in comparisons:
        if (c.get("config"), c.get("measure")) == HEADLINE:
            return c
    return comparisons[0] if comparisons else None


def _summary(results: dict) -> str:
    c = _headline(results)
    if c is None:
        return "No configuration was compared with the base model."
    configs = dict(_configs(results))
    name = str(c.get("config"))
    measure = MEASURES.get(str(c.get("measure")), _cell(c.get("measure")))
    lo, hi = (list(c.get("ci") or []) + [None, None])[:2]
    level = c.get("level") or 0.95
    verdict = "excludes" if c.get("excludes_zero") else "includes"
    return (
        f"{_cell(_label(name, configs.get(name)))}'s {measure} vs the base's {measure}: "
        f"{_num(c.get('diff'), signed=True)} points "
        f"({_num(c.get('base'))}% → {_num(c.get('other'))}%), "
        f"{_num(100 * level, 0)}% CI [{_num(lo, signed=True)}, {_num(hi, signed=True)}], "
        f"McNemar p={_p(c.get('p_mcnemar'))}, n={c.get('n', '—')} question-seeds "
        f"({c.get('questions', '—')} questions); the interval {verdict} zero."
    )


def _setup(results: dict) -> list[str]:
    study, env = results.get("study") or {}, results.get("environment") or {}
    model, prompts = results.get("model") or {}, results.get("prompts") or {}
    out = ["## Setup", ""]
    out += _table(
        ["", "path", "sha256"],
        [
            ["model", _cell(model.get("path")), _cell(model.get("sha256"))],
            ["prompts", _cell(prompts.get("dir")), _cell(prompts.get("sha256"))],
        ],
    )
    data = results.get("data") or {}
    if data:
        rows = [
            [_cell(split), _cell(d.get("path")), _cell(d.get("sha256")), _cell(d.get("questions"))]
            for split, d in data.items()
        ]
        out += _table(["split", "path", "sha256", "questions"], rows)
    config = results.get("config") or {}
    if config:
        out += ["Settings:", ""]
        rows = [
            [_cell(k), _cell(v if isinstance(v, str) else json.dumps(v, sort_keys=True))]
            for k, v in config.items()
        ]
        out += _table(["setting", "value"], rows)
    if env:
        rows = [
            [name, _cell(env[key]) if env.get(key) else "not installed"]
            for key, name in LIBRARIES.items()
        ]
        rows += [["machine", _cell(env.get("machine"))], ["cores", _cell(env.get("cores"))]]
        out += _table(["library / machine", "version"], rows)
    when = [f"started {_cell(study.get('created_at'))}"]
    if study.get("finished_at"):
        when.append(f"finished {_cell(study['finished_at'])}")
    out += [f"Study {_cell(study.get('name'))} in {_cell(study.get('out'))}, {', '.join(when)}."]
    if study.get("command"):
        out += ["", "Reproduce it with:", "", _fence(str(study["command"]))]
    for change in study.get("changes") or []:
        settings = "; ".join(_cell(s) for s in change.get("settings") or [])
        out += ["", f"Changed at {_cell(change.get('at'))}, before its stage began: {settings}."]
    return out + [""]


def _stages(results: dict) -> list[str]:
    stages = results.get("stages") or []
    if not stages:
        return []
    rows = [
        [_cell(s.get("name")), _duration(s.get("seconds")), _cell(s.get("detail"))] for s in stages
    ]
    total = sum(s.get("seconds") or 0 for s in stages if isinstance(s.get("seconds"), (int, float)))
    rows.append(["**total**", _duration(total), ""])
    return ["## Stages", "", *_table(["stage", "time", "what it did"], rows)]


def _export(results: dict) -> list[str]:
    export = results.get("export") or {}
    if not export:
        return []
    rows = []
    for role, e in export.items():
        dropped = e.get("dropped") or {}
        why = ", ".join(f"{_cell(k)}: {_cell(v)}" for k, v in dropped.items()) or "none"
        rows.append([_cell(role), _cell(e.get("sft")), _cell(e.get("dpo")), why])
    return ["## Export", "", *_table(["role", "SFT rows", "DPO pairs", "dropped"], rows)]


def _curves(results: dict) -> list[tuple[str, list[tuple[float, float]]]]:
    """The loss curves, one series per role and stage ("generator SFT"), empty ones left out."""
    series = []
    for role, stages in (results.get("training") or {}).items():
        for stage, t in (stages or {}).items():
            points = [
                (float(p[0]), float(p[1]))
                for p in (t.get("curve") or [])
                if isinstance(p, (list, tuple)) and len(p) == 2
            ]
            if points:
                series.append((f"{role} {str(stage).upper()}", points))
    return series


def _training(results: dict) -> list[str]:
    training = results.get("training") or {}
    rows = []
    for role, stages in training.items():
        for stage, t in (stages or {}).items():
            rows.append(
                [
                    _cell(role),
                    _cell(stage.upper() if stage in ("sft", "dpo") else stage),
                    _cell(t.get("steps")),
                    _num(t.get("loss_first"), 3),
                    _num(t.get("loss_last"), 3),
                    _num(t.get("margin_first"), 3),
                    _num(t.get("margin_last"), 3),
                ]
            )
    if not rows:
        return []
    header = ["role", "stage", "steps", "loss first", "loss last", "margin first", "margin last"]
    out = ["## Training", "", *_table(header, rows)]
    out += [
        "The margin is DPO's reward margin (chosen − rejected implicit reward); DPO's loss "
        f"starts at ln 2 ≈ {LN2:.3f}, whatever the data.",
        "",
    ]
    if _curves(results):
        out += ["![Training loss by step](figures/training.svg)", ""]
    return out


def _results(results: dict) -> list[str]:
    configs, measures = _configs(results), _measures(results)
    if not configs:
        return []
    ev = results.get("eval") or {}
    out = [
        "## Results",
        "",
        f"{_count(ev.get('questions'), 'test question')} × {_count(ev.get('seeds'), 'seed')}, "
        f"{_count(ev.get('votes'), 'vote')} for the majority-vote (MV) columns; "
        "accuracy in percent with its Wilson 95% interval.",
        "",
    ]
    rows = []
    for name, c in configs:
        row = [_cell(_label(name, c))]
        for m in measures:
            value, ci = (c.get("accuracy") or {}).get(m), _interval(c, m)
            cell = _num(value)
            if ci and cell != "—":
                cell += f" [{ci[0]:.1f}, {ci[1]:.1f}]"
            row.append(cell)
        rows.append(row)
    out += _table(["config", *(MEASURES[m] for m in measures)], rows)
    if measures:
        out += ["![Accuracy by measure and configuration](figures/accuracy.svg)", ""]
    turn_rows = [
        [_cell(_label(name, c)), *(_num((c.get("turnwise") or {}).get(t)) for t in TURNS)]
        for name, c in configs
        if c.get("turnwise")
    ]
    if turn_rows:
        out += ["Turn-wise accuracy (MA): the answer standing after each turn.", ""]
        out += _table(["config", *TURNS.values()], turn_rows)
        out += ["![Turn-wise accuracy](figures/turns.svg)", ""]
    flip_rows = []
    for name, c in configs:
        f = c.get("flips")
        if not f:
            continue
        w2r, r2w = f.get("wrong_to_right"), f.get("right_to_wrong")
        net = w2r - r2w if isinstance(w2r, int) and isinstance(r2w, int) else None
        net_cell = f"{net:+d}" if net is not None else "—"
        flip_rows.append(
            [_cell(_label(name, c)), _cell(w2r), _cell(r2w), net_cell, _cell(f.get("n"))]
        )
    if flip_rows:
        out += ["Self-correction: the refiner's answer against the generator's.", ""]
        out += _table(["config", "wrong→right", "right→wrong", "net", "n"], flip_rows)
    return out


def _comparisons(results: dict) -> list[str]:
    comparisons = (results.get("eval") or {}).get("comparisons") or []
    if not comparisons:
        return []
    configs = dict(_configs(results))
    rows = []
    for c in comparisons:
        name = str(c.get("config"))
        lo, hi = (list(c.get("ci") or []) + [None, None])[:2]
        rows.append(
            [
                _cell(_label(name, configs.get(name))),
                MEASURES.get(str(c.get("measure")), _cell(c.get("measure"))),
                _num(c.get("base")),
                _num(c.get("other")),
                _num(c.get("diff"), signed=True),
                f"[{_num(lo, signed=True)}, {_num(hi, signed=True)}]",
                f"{_cell(c.get('base_only'))} / {_cell(c.get('other_only'))}",
                _p(c.get("p_mcnemar")),
                "yes" if c.get("excludes_zero") else "no",
            ]
        )
    header = [
        "config",
        "measure",
        "base",
        "other",
        "diff",
        f"{_num(100 * (comparisons[0].get('level') or 0.95), 0)}% CI",
        "base only / other only",
        "McNemar p",
        "excludes zero",
    ]
    first = comparisons[0]
    note = (
        f"Each configuration against the base on the same question-seeds; the interval is a "
        f"question-level paired bootstrap ({_cell(first.get('resamples', '—'))} resamples, "
        f"seed {_cell(first.get('seed', '—'))}): the seeds of one question move together, so "
        "questions, not question-seeds, are resampled. McNemar's exact test uses the "
        "discordant question-seeds (only one side right)."
    )
    return ["## Comparisons", "", note, "", *_table(header, rows)]


def render_report(results: dict) -> str:
    """REPORT.md: summary, setup, stages, export, training, results, comparisons, conclusion."""
    study = results.get("study") or {}
    out = [f"# Study: {_cell(study.get('name') or 'malt study')}", "", _summary(results), ""]
    out += _setup(results)
    out += _stages(results)
    out += _export(results)
    out += _training(results)
    out += _results(results)
    out += _comparisons(results)
    conclusion = results.get("conclusion")
    if isinstance(conclusion, str) and conclusion.strip():
        # The author's own Markdown, kept as written, but never raw HTML.
        out += ["## What it means", "", conclusion.strip().replace("<", "&lt;"), ""]
    return "\n".join(out).rstrip("\n") + "\n"


def figures(results: dict) -> dict[str, str]:
    """The report's figures by file name: accuracy.svg, turns.svg and training.svg, each only
    when the results have its data (the report links exactly these)."""
    out: dict[str, str] = {}
    configs, measures = _configs(results), _measures(results)
    if configs and measures:
        groups = []
        for m in measures:
            bars = []
            for name, c in configs:
                value = (c.get("accuracy") or {}).get(m)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    ci = _interval(c, m)
                    low, high = ci if ci else (None, None)
                    bars.append(Bar(_label(name, c), float(value), low, high))
            groups.append((MEASURES[m], bars))
        out["accuracy.svg"] = bar_chart(
            groups,
            title="Test accuracy (Wilson 95% intervals)",
            y_label="accuracy (%)",
            y_max=100.0,
        )
    with_turns = [(name, c) for name, c in configs if c.get("turnwise")]
    if with_turns:
        groups = [
            (
                label,
                [
                    Bar(_label(name, c), float(c["turnwise"][t]))
                    for name, c in with_turns
                    if isinstance(c["turnwise"].get(t), (int, float))
                ],
            )
            for t, label in TURNS.items()
        ]
        out["turns.svg"] = bar_chart(
            groups, title="Turn-wise accuracy (MA)", y_label="accuracy (%)", y_max=100.0
        )
    series = _curves(results)
    has_dpo = any(
        ((stages or {}).get("dpo") or {}).get("curve")
        for stages in (results.get("training") or {}).values()
    )
    if series:
        out["training.svg"] = line_chart(
            series,
            title="Training loss by step",
            x_label="step",
            y_label="loss",
            hline=LN2 if has_dpo else None,
            hline_label="ln 2: DPO's starting loss" if has_dpo else None,
        )
    return out
