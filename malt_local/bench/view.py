"""`python -m malt_local.bench --part view`: every `malt view` page timed on a paper-size run.

    python -m malt_local.bench --part view [--questions 7500] [--n 3] [--db PATH] [--repeat 5]

The MALT paper expands about 7,500 GSM8K questions into 39 nodes each (n = 3): 292,500 nodes.
Generating that takes days, so this builds such a database synthetically, in the real schema
(`Store` runs the migrations, so every index a real run has is there) with direct inserts and
text of realistic size (a few hundred characters an output, the chat prompt as JSON), values and
labels computed the way credit assignment computes them (a node's value is the fraction of its
leaves that are correct). Then it starts the real `malt view` (a subprocess, as a user would)
and requests every page over HTTP several times, printing each page's first time and its median. The
server keeps a run's figures until its data changes: the run page's first request computes
them (the cold figure), every later one of it and of the runs page reuses them. The build is
skipped when `--db` names a file that exists (rebuild: delete it).

A database of the default size takes about a minute to build and ~0.6 GB of disk.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

RUN_ID = "rbench"
WORDS = (  # noqa: SIM905 (a sentence reads better than a list of 34 strings)
    "the apples each costs dollars total remaining so we subtract add multiply step first then "
    "therefore answer check verify correct wrong mistake calculation she he they buys sells has "
    "left more less twice half"
).split()
PAGE_REPEAT = 5  # requests per page; the median is reported


def _text(rng: random.Random, chars: int) -> str:
    words: list[str] = []
    size = 0
    while size < chars:
        w = rng.choice(WORDS) if rng.random() > 0.15 else str(rng.randint(1, 999))
        words.append(w)
        size += len(w) + 1
    return " ".join(words)


def build_database(path: Path, questions: int, n: int = 3, seed: int = 0) -> dict:
    """A complete run of `questions` trees at `n` in a new database at `path`: real schema,
    synthetic text. Returns what it built (for the report)."""
    from malt_local.db.store import Store, utcnow
    from malt_local.roles import tree_size
    from malt_local.run.settings import RunSpec

    rng = random.Random(seed)
    t0 = time.perf_counter()
    store = Store(path)
    spec = RunSpec(
        model="/models/bench-synthetic.gguf", model_sha256="0" * 64, n=n, temperature=0.3,
        top_p=1.0, top_k=0, max_tokens=256, seed=seed, theta=0.5, task="gsm8k",
        prompts_sha256="p" * 64, prompt_hashes={"generator.j2": "h" * 64},
    )  # fmt: skip
    store.insert_run(spec.row(RUN_ID))
    db = store.db.conn
    db.execute("BEGIN")
    now = utcnow()
    nodes = 0
    for qi in range(questions):
        qid = f"q{qi:012x}"
        qtext = f"Question {qi}: " + _text(rng, 250) + "?"
        truth = str(rng.randint(1, 500))
        db.execute(
            "INSERT INTO questions (id, task, question, ground_truth, options, source, metadata,"
            " created_at) VALUES (?, 'gsm8k', ?, ?, NULL, 'bench', NULL, ?)",
            [qid, qtext, truth, now],
        )
        db.execute(
            "INSERT INTO run_questions (run_id, question_id, position) VALUES (?, ?, ?)",
            [RUN_ID, qid, qi],
        )
        rows = _tree_rows(rng, qid, qtext, truth, n, spec.theta, seed, now)
        db.executemany(
            "INSERT INTO nodes (id, run_id, question_id, parent_id, role, depth, branch, path, "
            "messages, output, finish_reason, answer, correct, reward, value, label, "
            "prompt_tokens, completion_tokens, seed, duration_ms, created_at, builder) "
            "VALUES (" + ", ".join("?" * 22) + ")",
            rows,
        )
        nodes += len(rows)
        assert len(rows) == tree_size(n)
    db.execute("COMMIT")
    store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    store.close()
    return {"questions": questions, "nodes": nodes, "seconds": time.perf_counter() - t0}


def _tree_rows(
    rng: random.Random, qid: str, qtext: str, truth: str, n: int, theta: float, seed: int, now: str
) -> list[list]:
    """The `nodes` rows of one complete tree, in insertion order (G, its Vs, their Rs)."""
    from malt_local.db.store import node_id

    skill = rng.random()  # how often this question's answers are right
    leaves = {
        (a, b, c): int(rng.random() < skill) for a in range(n) for b in range(n) for c in range(n)
    }
    rows: list[list] = []

    def add(path: tuple[int, ...], prompt: str) -> str:
        depth = len(path)
        role = ("generator", "verifier", "refiner")[depth - 1]
        under = [v for k, v in leaves.items() if k[:depth] == path]
        value = sum(under) / len(under)
        length = rng.random() < 0.05
        output = _text(rng, rng.randint(200, 600))
        right = leaves[path] if depth == 3 else int(rng.random() < skill)
        answer = truth if right else str(rng.randint(1, 500))
        if depth != 2:
            output += f" Final Answer: {answer}"
        messages = json.dumps(
            [
                {"role": "system", "content": f"You are the {role}."},
                {"role": "user", "content": prompt},
            ]
        )
        rows.append(
            [
                node_id(RUN_ID, qid, path), RUN_ID, qid,
                node_id(RUN_ID, qid, path[:-1]) if depth > 1 else None, role, depth, path[-1],
                ".".join(map(str, path)), messages, output,
                "length" if length else "stop", None if depth == 2 else answer,
                None if depth == 2 else right, float(right) if depth == 3 else None,
                value, int(value > theta) if depth < 3 else right,
                len(messages) // 4, 256 if length else rng.randint(40, 200), seed,
                rng.randint(200, 4000), now, None,
            ]
        )  # fmt: skip
        return output

    for a in range(n):
        g = add((a,), qtext)
        for b in range(n):
            v = add((a, b), qtext + "\n" + g)
            for c in range(n):
                add((a, b, c), qtext + "\n" + g[:300] + "\n" + v[:300])
    return rows


def pages(base: str, questions: int) -> list[tuple[str, str]]:
    """(name, path) of every page, the paged lists on their first, a middle and their last
    page, the filters and a search."""
    r = f"/run/{RUN_ID}"
    mid = f"q{questions // 2:012x}"
    last = f"q{questions - 1:012x}"
    return [
        ("run", r),  # first: its first request computes the run's figures, which "runs" reuses
        ("runs", "/"),
        ("questions", f"{r}/questions"),
        ("questions, middle page", f"{r}/questions?start={questions // 2}"),
        ("questions, last page", f"{r}/questions?start={max(0, questions - 1)}"),
        ("questions, solved=no", f"{r}/questions?solved=no"),
        ("questions, truncated=yes&positives=no", f"{r}/questions?truncated=yes&positives=no"),
        ("questions, search text", f"{r}/questions?q=Question+{questions - 1}%3A"),
        ("questions, search id", f"{r}/questions?q={last}"),
        ("tree", f"{r}/tree/{mid}"),
        *[(f"pairs {role}", f"{r}/pairs?role={role}") for role in ("generator", "verifier")],
        ("pairs refiner", f"{r}/pairs?role=refiner"),
        ("pairs refiner, middle", f"{r}/pairs?role=refiner&after={mid}"),
        ("evaluations", "/evals"),
        ("training", "/training"),
    ]


def _get(url: str) -> tuple[int, int]:
    try:
        with urllib.request.urlopen(url, timeout=120) as resp:
            return resp.status, len(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, len(exc.read())


def time_pages(db: Path, questions: int, repeat: int = PAGE_REPEAT) -> list[dict]:
    """Each page's median time over `repeat` requests to a real `malt view` on `db`."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "malt_local", "view", "--db", str(db), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        base = proc.stdout.readline().strip().rstrip("/")
        if not base.startswith("http"):
            raise SystemExit(f"bench: malt view did not start (exit {proc.wait()})")
        results = []
        for name, path in pages(base, questions):
            times, status, size = [], 0, 0
            for _ in range(repeat):
                t0 = time.perf_counter()
                status, size = _get(base + path)
                times.append(time.perf_counter() - t0)
            results.append(
                {
                    "page": name,
                    "path": path,
                    "status": status,
                    "bytes": size,
                    "first_ms": 1000 * times[0],
                    "median_ms": 1000 * statistics.median(times),
                    "max_ms": 1000 * max(times),
                }
            )
        return results
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def report(built: dict | None, db: Path, results: list[dict]) -> str:
    lines = []
    if built:
        lines.append(
            f"built {built['questions']} questions, {built['nodes']} nodes in "
            f"{built['seconds']:.0f} s"
        )
    lines.append(f"database {db} ({db.stat().st_size / 2**20:.0f} MiB)")
    lines.append("")
    lines.append("| page | status | KiB | first ms | median ms | max ms |")
    lines.append("| --- | --- | --- | --- | --- | --- |")
    for r in results:
        lines.append(
            f"| {r['page']} | {r['status']} | {r['bytes'] / 1024:.0f} | {r['first_ms']:.0f} | "
            f"{r['median_ms']:.0f} | {r['max_ms']:.0f} |"
        )
    worst = max(results, key=lambda r: r["median_ms"])
    cold = max(results, key=lambda r: r["first_ms"])
    lines.append("")
    lines.append(
        f"slowest page: {worst['page']}, median {worst['median_ms']:.0f} ms; slowest first "
        f"request (nothing kept yet): {cold['page']}, {cold['first_ms']:.0f} ms"
    )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m malt_local.bench --part view")
    p.add_argument("--questions", type=int, default=7500)
    p.add_argument("--n", type=int, default=3)
    p.add_argument("--db", type=Path, default=None, help="kept (and reused) if given")
    p.add_argument("--repeat", type=int, default=PAGE_REPEAT)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        db = args.db or Path(tmp) / "view-bench.db"
        built = None
        if not db.exists():
            print(f"bench: building {db} ...", file=sys.stderr, flush=True)
            built = build_database(db, args.questions, args.n)
        else:
            from malt_local.db.store import Store

            Store(db).close()  # one built by an older malt gets the newer indexes
        print(report(built, db, time_pages(db, args.questions, args.repeat)))
    return 0
