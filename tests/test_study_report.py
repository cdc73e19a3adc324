"""`malt study`'s figures (svg.py) and REPORT.md (report.py), from results dicts alone.

The full fixture is shaped like a real study's results.json (built through
`Comparison.as_dict`, so the report reads what the study writes); the minimal one is what a
study has after evaluating only the base model.
"""

from __future__ import annotations

import copy
import json
import re
import xml.etree.ElementTree as ET

import pytest

from malt_local.study.report import _cell, figures, render_report
from malt_local.study.stats import Unit, paired_comparison
from malt_local.study.svg import Bar, bar_chart, line_chart

SVG = "{http://www.w3.org/2000/svg}"
HOSTILE = "<script>alert(1)</script>"


# --- svg.py ----------------------------------------------------------------------------------


def accuracy_groups(label: str = "MALT") -> list[tuple[str, list[Bar]]]:
    return [
        ("SA", [Bar("base", 40.0, 31.0, 49.5), Bar(label, 47.5, 38.0, 57.0)]),
        ("MA+MV", [Bar("base", 44.0), Bar(label, 55.0, 45.2, 64.4)]),
    ]


def curves() -> list[tuple[str, list[tuple[float, float]]]]:
    return [
        ("generator SFT", [(s, 2.0 / (1 + 0.1 * s)) for s in range(0, 60, 5)]),
        ("generator DPO", [(s, 0.693 - 0.004 * s) for s in range(0, 60, 5)]),
        ("verifier DPO", [(10.0, 0.6)]),
    ]


def test_bar_chart_is_svg_with_title_axis_legend_and_error_bars() -> None:
    text = bar_chart(accuracy_groups(), title="Accuracy", y_label="accuracy (%)", y_max=100)
    root = ET.fromstring(text)
    assert root.tag == f"{SVG}svg"
    assert root.get("width") and root.get("height") and root.get("viewBox")
    assert root.find(f"{SVG}title").text == "Accuracy"
    groups = {g.get("class"): g for g in root.iter(f"{SVG}g")}
    assert {"y-axis", "legend", "bars"} <= groups.keys()
    assert len(groups["bars"].findall(f"{SVG}rect")) == 4
    # Three bars carry an interval; the base's MA+MV bar has none.
    assert len([g for g in root.iter(f"{SVG}g") if g.get("class") == "error-bar"]) == 3
    ticks = [t.text for t in groups["y-axis"].iter(f"{SVG}text")]
    assert "0" in ticks and "100" in ticks
    legend = [t.text for t in groups["legend"].iter(f"{SVG}text")]
    assert legend == ["base", "MALT"]
    # A label keeps its colour across groups.
    fills = [r.get("fill") for r in groups["bars"].findall(f"{SVG}rect")]
    assert fills[0] == fills[2] != fills[1] == fills[3]


def test_no_error_bars_without_intervals() -> None:
    text = bar_chart([("SA", [Bar("base", 40.0)])], title="t", y_label="y")
    assert "error-bar" not in text
    ET.fromstring(text)


@pytest.mark.parametrize("chart", ["bar", "line"])
def test_labels_are_escaped_never_elements(chart: str) -> None:
    if chart == "bar":
        text = bar_chart(accuracy_groups(HOSTILE), title=HOSTILE, y_label=HOSTILE)
    else:
        series = [(HOSTILE, [(0.0, 1.0), (1.0, 0.5)])]
        text = line_chart(series, title=HOSTILE, x_label=HOSTILE, y_label="a\x00b'\"&")
    root = ET.fromstring(text)
    assert not [e for e in root.iter() if e.tag.endswith("script")]
    assert "<script" not in text
    assert "&lt;script&gt;" in text
    assert any(HOSTILE in (e.text or "") for e in root.iter())  # shown, as text


def test_same_input_same_bytes() -> None:
    def both() -> tuple[str, str]:
        return (
            bar_chart(accuracy_groups(), title="A", y_label="y", y_max=100),
            line_chart(curves(), title="L", x_label="step", y_label="loss", hline=0.6931),
        )

    assert both() == both()


def test_line_chart_has_series_and_labelled_dashed_hline() -> None:
    text = line_chart(
        curves(), title="Loss", x_label="step", y_label="loss", hline=0.6931, hline_label="ln 2"
    )
    root = ET.fromstring(text)
    assert len(list(root.iter(f"{SVG}polyline"))) == 2
    assert len(list(root.iter(f"{SVG}circle"))) == 1  # the one-point series
    (hline,) = [g for g in root.iter(f"{SVG}g") if g.get("class") == "hline"]
    assert hline.find(f"{SVG}line").get("stroke-dasharray")
    assert hline.find(f"{SVG}text").text == "ln 2"
    assert root.find(f"{SVG}title").text == "Loss"
    assert "hline" not in line_chart(curves(), title="L", x_label="x", y_label="y")


def test_empty_charts_are_still_valid_svg() -> None:
    for text in (
        bar_chart([], title="t", y_label="y"),
        line_chart([], title="t", x_label="x", y_label="y"),
        line_chart([("nan", [(float("nan"), 1.0)])], title="t", x_label="x", y_label="y"),
    ):
        assert "no data" in text
        ET.fromstring(text)


# --- report.py -------------------------------------------------------------------------------

PIPE_PATH = "/data/my|models/SmolLM2-135M.gguf"


def comparison(config: str, measure: str, flags: list[tuple[bool, bool]]) -> dict:
    units = [Unit(f"q{i}", s, b, o) for i, (b, o) in enumerate(flags) for s in range(2)]
    return {"config": config, "measure": measure, **paired_comparison(units).as_dict()}


def full_results() -> dict:
    flags = [(False, True)] * 12 + [(True, False)] * 3 + [(True, True)] * 40 + [(False, False)] * 45
    return {
        "study": {
            "name": "smol-gsm8k",
            "out": "/runs/smol",
            "command": "malt study --model smol --train train.jsonl --test test.jsonl",
            "created_at": "2026-12-04T20:00:00Z",
            "finished_at": "2026-12-04T22:30:00Z",
            "changes": [
                {"at": "2026-12-04T21:00:00Z", "settings": ["[train] dpo_lr 5e-06 (now 0.0001)"]}
            ],
        },
        "config": {
            "n": 4,
            "max_tokens": 512,
            "temperature": 0.7,
            "seed": 0,
            "votes": 5,
            "seeds": 2,
            "prompts": "default",
            "task": "gsm8k",
            "lora_rank": 16,
            "targets": ["q_proj", "v_proj"],
        },
        "environment": {
            "malt": "0.1.0",
            "python": "3.12.3",
            "llama_cpp_python": "0.3.36",
            "torch": "2.5.1",
            "transformers": "5.0.0",
            "peft": "0.17.0",
            "trl": None,
            "machine": "x86_64 Linux",
            "cores": 2,
        },
        "model": {"path": PIPE_PATH, "sha256": "ab" * 32},
        "prompts": {"dir": "prompts/default", "sha256": "cd" * 32},
        "data": {
            "train": {"path": "data/train.jsonl", "sha256": "ef" * 32, "questions": 500},
            "test": {"path": "data/test.jsonl", "sha256": "01" * 32, "questions": 100},
        },
        "stages": [
            {"name": "trees", "seconds": 3601.5, "detail": "500 trees, 13500 turns"},
            {"name": "export", "seconds": 2.25, "detail": "3 roles"},
            {"name": "train", "seconds": 1800.0, "detail": "6 adapters"},
            {"name": "eval", "seconds": 2400.0, "detail": "3 configs × 2 seeds"},
            {"name": "report", "seconds": 0.5, "detail": "line one\nline | two"},
        ],
        "export": {
            "generator": {"sft": 310, "dpo": 120, "dropped": {"no_pair": 40, "too_long": 3}},
            "verifier": {"sft": 280, "dpo": 95, "dropped": {}},
            "refiner": {"sft": 295, "dpo": 101, "dropped": {"no_pair": 12}},
        },
        "training": {
            "generator": {
                "sft": {
                    "steps": 40,
                    "loss_first": 1.9,
                    "loss_last": 0.8123,
                    "margin_first": None,
                    "margin_last": None,
                    "curve": [[s, 1.9 - 0.027 * s] for s in range(0, 41, 4)],
                },
                "dpo": {
                    "steps": 20,
                    "loss_first": 0.6931,
                    "loss_last": 0.41,
                    "margin_first": 0.0,
                    "margin_last": 1.234,
                    "curve": [[s, 0.6931 - 0.014 * s] for s in range(0, 21, 2)],
                },
            }
        },
        "eval": {
            "questions": 100,
            "seeds": 2,
            "votes": 5,
            "configs": {
                "base": {
                    "label": "base",
                    "accuracy": {"sa": 38.0, "sa_mv": 41.5, "ma": 40.0, "ma_mv": 43.0},
                    "correct": {
                        "sa": [76, 200],
                        "sa_mv": [83, 200],
                        "ma": [80, 200],
                        "ma_mv": [86, 200],
                    },
                    "turnwise": {
                        "after_generator": 38.0,
                        "after_verifier": 39.0,
                        "after_refiner": 40.0,
                    },
                    "flips": {"wrong_to_right": 10, "right_to_wrong": 6, "n": 200},
                },
                "malt": {
                    "label": "MALT",
                    "accuracy": {"sa": 41.0, "sa_mv": 45.0, "ma": 46.0, "ma_mv": 52.0},
                    "correct": {
                        "sa": [82, 200],
                        "sa_mv": [90, 200],
                        "ma": [92, 200],
                        "ma_mv": [104, 200],
                    },
                    "turnwise": {
                        "after_generator": 41.0,
                        "after_verifier": 44.0,
                        "after_refiner": 46.0,
                    },
                    "flips": {"wrong_to_right": 14, "right_to_wrong": 4, "n": 200},
                },
                "generator": {
                    "label": "generator | only",
                    "accuracy": {"sa": 40.0, "sa_mv": 44.0, "ma": 42.0, "ma_mv": 45.0},
                    "correct": {"sa": [80, 200]},
                },
            },
            "comparisons": [
                comparison("malt", "ma_mv", flags),
                comparison("malt", "sa", flags[:5] + [(True, True)] * 40 + [(False, False)] * 55),
                comparison("generator", "ma_mv", [(True, True)] * 100),
            ],
        },
        "conclusion": "MALT helps here; see **MA+MV**. <b>not html</b>",
    }


def minimal_results() -> dict:
    """A study that has only evaluated the base model, SA only, nothing compared yet."""
    return {
        "study": {"name": "first", "out": "out", "command": "malt study", "created_at": "now"},
        "config": {"n": 1},
        "environment": {"malt": "0.1.0", "python": "3.12", "machine": "m", "cores": 1},
        "model": {"path": "m.gguf", "sha256": "00" * 32},
        "prompts": {"dir": "prompts", "sha256": "11" * 32},
        "data": {"test": {"path": "t.jsonl", "sha256": "22" * 32, "questions": 10}},
        "stages": [{"name": "eval", "seconds": 12.0, "detail": "base"}],
        "eval": {
            "questions": 10,
            "seeds": 1,
            "votes": 1,
            "configs": {
                "base": {"label": "base", "accuracy": {"sa": 30.0}, "correct": {"sa": [3, 10]}}
            },
            "comparisons": [],
        },
    }


def cells(row: str) -> list[str]:
    """A GFM table row's cells, splitting only on pipes no backslash escapes."""
    assert row.startswith("|") and row.endswith("|"), row
    parts, cell, i = [], "", 1
    while i < len(row) - 1:
        if row[i] == "\\":
            cell += row[i : i + 2]
            i += 2
            continue
        if row[i] == "|":
            parts.append(cell.strip())
            cell = ""
        else:
            cell += row[i]
        i += 1
    return parts + [cell.strip()]


def tables(text: str) -> list[list[str]]:
    """Every table in `text` as its lines (header, rule, rows)."""
    out, current = [], []
    for line in text.splitlines():
        if line.startswith("|"):
            current.append(line)
        elif current:
            out.append(current)
            current = []
    return out + ([current] if current else [])


def test_full_report_has_the_headline_and_every_section() -> None:
    results = full_results()
    text = render_report(results)
    head = results["eval"]["comparisons"][0]
    lo, hi = head["ci"]
    summary = text.split("\n\n")[1]
    assert summary.startswith("MALT's MA+MV vs the base's MA+MV: ")
    assert head["diff"] == 9.0 and "+9.0 points (43.0% → 52.0%)" in summary
    assert f"95% CI [{lo:+.1f}, {hi:+.1f}]" in summary
    assert f"McNemar p={head['p_mcnemar']:.3f}" in summary
    assert "n=200 question-seeds" in summary
    assert ("excludes zero" if head["excludes_zero"] else "includes zero") in summary
    for section in (
        "## Setup",
        "## Stages",
        "## Export",
        "## Training",
        "## Results",
        "## Comparisons",
        "## What it means",
    ):
        assert section in text
    assert "ab" * 32 in text and "ef" * 32 in text
    assert "| trl | not installed |" in text and "| llama-cpp-python | 0.3.36 |" in text
    assert "```sh\nmalt study --model smol" in text
    # A setting changed before its stage began is said, with when.
    assert "Changed at 2026-12-04T21:00:00Z, before its stage began: \\[train\\] dpo\\_lr" in text
    assert "52.0 [" in text  # MALT's MA+MV with its Wilson interval
    assert "1h 00m 02s" in text  # the trees stage
    assert "no\\_pair: 40" in text
    assert "0.812" in text and "1.234" in text
    assert "<b>" not in text and "&lt;b>" in text  # the conclusion's HTML is defused


def test_every_table_row_has_its_headers_cell_count() -> None:
    text = render_report(full_results())
    found = tables(text)
    assert len(found) >= 9
    for table in found:
        width = len(cells(table[0]))
        assert re.fullmatch(r"\|(---\|)+", table[1]), table[1]
        for row in table[2:]:
            assert len(cells(row)) == width, row
    (model_row,) = [r for t in found for r in t if r.startswith("| model |")]
    assert cells(model_row)[1] == _cell(PIPE_PATH) == "/data/my\\|models/SmolLM2-135M.gguf"


def test_images_link_exactly_the_figures() -> None:
    results = full_results()
    text = render_report(results)
    linked = re.findall(r"!\[[^\]]+\]\(figures/([a-z]+\.svg)\)", text)
    figs = figures(results)
    assert sorted(linked) == sorted(figs) == ["accuracy.svg", "training.svg", "turns.svg"]
    for svg in figs.values():
        ET.fromstring(svg)
    assert "ln 2" in figs["training.svg"]
    assert "generator \\| only" in text
    assert figs == figures(copy.deepcopy(results))  # reproducible


def test_minimal_report_skips_what_is_missing() -> None:
    results = minimal_results()
    text = render_report(results)
    assert "No configuration was compared with the base model." in text
    for absent in ("## Training", "## Export", "## Comparisons", "## What it means"):
        assert absent not in text
    assert "30.0 [10.8, 60.3]" in text  # Wilson 3 of 10
    assert "10 test questions × 1 seed, 1 vote " in text
    assert list(figures(results)) == ["accuracy.svg"]
    assert re.findall(r"figures/([a-z]+\.svg)", text) == ["accuracy.svg"]
    for table in tables(text):
        for row in table[2:]:
            assert len(cells(row)) == len(cells(table[0]))


def test_report_survives_json_round_trip_and_hostile_text() -> None:
    results = json.loads(json.dumps(full_results()))
    results["study"]["name"] = HOSTILE + "\nsecond line"
    results["eval"]["configs"]["malt"]["label"] = "a|b\\"
    text = render_report(results)
    assert "<script>" not in text
    assert "second line" in text.splitlines()[0]  # still the title's one line
    assert "a\\|b\\\\" in text  # the trailing backslash cannot escape the cell's pipe
    for svg in figures(results).values():
        assert "<script" not in svg
        ET.fromstring(svg)


def test_cell_escapes_markup() -> None:
    assert _cell("a|b") == "a\\|b"
    assert _cell("x\ny\r\nz") == "x y z"
    assert _cell("*bold* _it_ [l](u) `c`") == "\\*bold\\* \\_it\\_ \\[l\\](u) \\`c\\`"
    assert _cell(None) == "—" and _cell("") == "—"
    assert _cell(3) == "3"
