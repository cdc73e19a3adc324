"""`malt eval`: the protocol and its arithmetic without a model, then end to end with the real
small model on slices of GSM8K, MATH-500 and CSQA, recomputed by hand from the database."""

from __future__ import annotations

import json
import re
import sqlite3
import statistics
from collections import defaultdict
from pathlib import Path

import pytest

from malt_local.db.store import Store
from malt_local.engines.base import GenRequest
from malt_local.evaluate.benchmarks import (
    AdapterSet,
    Benchmark,
    column_names,
    load_benchmarks,
    sample_indices,
)
from malt_local.evaluate.runner import EvalRunner
from malt_local.evaluate.scores import Chain, Turn, mean_std, score_question, summarize
from malt_local.evaluate.settings import BASE, EvalSettings
from malt_local.grading import answers_equal, grade
from malt_local.prompts import PromptSet
from malt_local.questions.loading import Question
from tests.conftest import TEST_DATA, malt
from tests.fakes import FakeEngine

# --------------------------------------------------------------------------- protocol


def test_samples_are_seeded_prefix_stable_and_capped():
    a = sample_indices(50, 10, seed=0, seed_index=0)
    assert a == sample_indices(50, 10, seed=0, seed_index=0)
    assert len(set(a)) == 10 and all(0 <= i < 50 for i in a)
    # A larger --samples extends the same sample, so stored generations are reused.
    assert sample_indices(50, 20, seed=0, seed_index=0)[:10] == a
    assert sample_indices(50, 10, seed=0, seed_index=1) != a
    assert sample_indices(50, 10, seed=1, seed_index=0) != a
    assert sorted(sample_indices(5, 100, seed=0, seed_index=0)) == [0, 1, 2, 3, 4]


def test_std_is_the_population_std_the_paper_reports():
    # MATH SA in the paper: 49.50 ± 2.06 over 4 seeds of 100 questions.
    mean, std = mean_std([46.0, 50.0, 51.0, 51.0])
    assert mean == 49.5 and round(std, 2) == 2.06
    assert mean_std([80.0]) == (80.0, 0.0)


def q(gt: str = "5", task: str = "gsm8k") -> Question:
    return Question(f"What is {gt}?", gt, task)


def T(answer, correct):  # noqa: N802 - reads like a constructor
    return Turn(answer, correct)


def test_after_verifier_is_the_stated_answer_else_the_generators():
    g = T("4", False)
    assert Chain(g, T("5", True), T("5", True)).after_verifier == T("5", True)
    assert Chain(g, T(None, False), T("5", True)).after_verifier == g


def test_question_score_single_pass_and_votes():
    question = q("5")
    chains = [
        Chain(T("4", False), T("5", True), T("6", False)),  # pass 0
        Chain(T("5", True), T(None, False), T("5", True)),
        Chain(T("5.0", True), T("7", False), T("8", False)),
    ]
    s = score_question(chains, question)
    assert (s.sa, s.sa_mv) == (False, True)  # pass 0 wrong; 5 and 5.0 outvote 4
    assert s.turns["ma"] == (False, True, False)
    # after V: [5 (V), 5 (G carried), 7 (V)] -> 5; refiners 6, 5, 8 tie -> pass 0's 6.
    assert s.turns["ma_mv"] == (True, True, False)
    assert s.ma is False and s.ma_mv is False
    assert s.verifier_states == pytest.approx(2 / 3)


def test_summarize_accuracy_turnwise_and_self_correction_identities():
    settings = EvalSettings(mode="all", votes=1)
    right, wrong = T("5", True), T("1", False)
    seed0 = [  # G -> R: wrong->right, right->right, right->wrong, wrong->wrong
        score_question([Chain(wrong, T(None, False), right)], q()),
        score_question([Chain(right, right, right)], q()),
        score_question([Chain(right, wrong, wrong)], q()),
        score_question([Chain(wrong, wrong, wrong)], q()),
    ]
    seed1 = [score_question([Chain(wrong, right, right)], q()) for _ in range(4)]
    out = summarize([seed0, seed1], settings)
    acc = out["accuracy"]
    assert acc["sa"]["per_seed"] == [50.0, 0.0] and acc["sa"]["mean"] == 25.0
    assert acc["sa"]["std"] == 25.0
    assert acc["ma"]["per_seed"] == [50.0, 100.0]
    tw = out["turnwise"]["ma"]
    assert tw["after_generator"] == acc["sa"] and tw["after_refiner"] == acc["ma"]
    assert tw["after_verifier"]["per_seed"] == [25.0, 100.0]
    assert tw["verifier_states_answer"] == pytest.approx(100 * 7 / 8)
    sc = out["self_correction"]["ma"]
    assert sc["counts"] == {
        "wrong_to_right": 5,
        "right_to_right": 1,
        "wrong_to_wrong": 1,
        "right_to_wrong": 1,
    }
    assert sc["questions"] == 8 and sc["percent"]["wrong_to_right"] == 62.5
    pct = sc["percent"]
    # The paper's identities: W->R + R->R is MA, R->R + R->W is SA (pooled over seeds).
    assert pct["wrong_to_right"] + pct["right_to_right"] == acc["ma"]["mean"]
    assert pct["right_to_right"] + pct["right_to_wrong"] == acc["sa"]["mean"]


def test_column_names_follow_mode_votes_and_adapters():
    lora = AdapterSet("lora-x", {"refiner": [{"sha256": "0", "scale": 1.0}]})
    assert list(column_names(EvalSettings(mode="all"), AdapterSet(BASE)).values()) == [
        "SA",
        "SA+MV",
        "MA",
        "MA+MV",
    ]
    assert list(column_names(EvalSettings(mode="ma", votes=1), lora).values()) == ["MA+LoRA"]
    assert list(column_names(EvalSettings(mode="sa"), lora).values()) == ["SA+LoRA", "SA+LoRA+MV"]


# --------------------------------------------------------------------------- runner, fake model

KEY_RE = re.compile(
    r"^(?P<run>[^/]+)/(?P<aset>[^/]+)/(?P<s>\d+)/(?P<q>[^/]+)/(?P<p>\d+)/(?P<role>\w+)$"
)


def role_of(request: GenRequest) -> str:
    last = request.messages[-1]["content"]
    return (
        "refiner"
        if "now the refiner" in last
        else "verifier"
        if "now the verifier" in last
        else "generator"
    )


def scripted(request: GenRequest, key: str, seed: int) -> str:
    """Answers by role and pass, so every measure is known in advance.

    Ground truth g is in the question. Generator: pass 0 says g+1 unless g is odd, passes 1, 2
    say g. Verifier: pass 0 states g, pass 1 states nothing, pass 2 states g+2. Refiner: g+1,
    g+3, g+4 (a three-way tie, which the first pass wins).
    """
    m = KEY_RE.match(key)
    assert m, key
    role, p = m["role"], int(m["p"])
    assert role == role_of(request)
    g = int(re.search(r"What is (\d+)\?", request.messages[1]["content"]).group(1))
    if role == "generator":
        ans = g if (p > 0 or g % 2) else g + 1
    elif role == "verifier":
        if p == 1:
            return "Looks fine to me."
        ans = g if p == 0 else g + 2
    else:
        ans = g + (1, 3, 4)[p]
    return f"Work.\nFinal Answer: {ans}"


@pytest.fixture
def gsm_file(tmp_path) -> Path:
    path = tmp_path / "bench" / "toy.jsonl"
    path.parent.mkdir()
    rows = [{"question": f"What is {g}?", "answer": f"It is.\n#### {g}"} for g in range(10, 22)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_runner(tmp_path, path, settings, engine, adapter_sets=None, db="e.db"):
    store = Store(tmp_path / db)
    store.db.execute(
        "INSERT OR IGNORE INTO eval_runs (id, created_at, model, model_sha256, temperature, "
        "top_p, top_k, max_tokens, seed, task, prompts_sha256, prompt_hashes, tool_version, "
        "config) VALUES ('etest', '', 'fake', '0', 0.3, 1, 0, 16, 0, NULL, '0', '{}', '0', '{}')"
    )
    benchmarks = load_benchmarks([path], None)
    return store, EvalRunner(
        store,
        "etest",
        benchmarks,
        settings,
        engine,
        PromptSet(),
        list(adapter_sets or [AdapterSet(BASE)]),
    )


def expected_sa(gts: list[int]) -> float:
    return 100.0 * sum(1 for g in gts if g % 2) / len(gts)


def test_runner_measures_match_the_script(tmp_path, gsm_file):
    settings = EvalSettings(mode="all", votes=3, samples=4, seeds=3)
    engine = FakeEngine(scripted)
    store, runner = make_runner(tmp_path, gsm_file, settings, engine)
    progress = runner.execute()
    assert progress.total == progress.generated == 3 * 4 * 3 * 3
    res = runner.results()["benchmarks"][0]
    bench = runner.benchmarks[0]
    gts = [[int(x.ground_truth) for x in qs] for qs in runner.samples(bench)]
    assert res["accuracy"]["SA"]["per_seed"] == [expected_sa(g) for g in gts]
    assert res["accuracy"]["SA+MV"]["per_seed"] == [100.0] * 3
    assert res["accuracy"]["MA"]["per_seed"] == [0.0] * 3
    assert res["accuracy"]["MA+MV"]["per_seed"] == [0.0] * 3
    tw = res["turnwise"]["MA"]
    assert tw["after_verifier"]["mean"] == 100.0 and tw["after_generator"] == res["accuracy"]["SA"]
    assert tw["verifier_states_answer"] == pytest.approx(200 / 3, abs=1e-3)
    assert res["turnwise"]["MA+MV"]["after_generator"]["mean"] == 100.0
    sc = res["self_correction"]
    assert sc["MA+MV"]["counts"]["right_to_wrong"] == 12
    n_odd = sum(g % 2 for seed in gts for g in seed)
    assert sc["MA"]["counts"] == {
        "wrong_to_right": 0,
        "right_to_right": 0,
        "right_to_wrong": n_odd,
        "wrong_to_wrong": 12 - n_odd,
    }
    # SA+MV and MA+MV stdev 0; SA's is the population std of the per-seed values.
    assert res["accuracy"]["SA"]["std"] == pytest.approx(
        statistics.pstdev([expected_sa(g) for g in gts]), abs=1e-3
    )
    # The generator's passes of one question share one request (one prompt, several seeds).
    gen_requests = [r for r in engine.requests if role_of(r) == "generator"]
    assert all(len(r.keys) > 1 for r in gen_requests)
    # Stored rows: ids are places, chains link, critiques stating nothing have no grade.
    rows = list(store.db.query("SELECT * FROM eval_generations"))
    by_id = {r["id"]: r for r in rows}
    for r in rows:
        m = KEY_RE.match(r["id"])
        assert (m["aset"], int(m["s"]), m["q"], int(m["p"]), m["role"]) == (
            r["adapter_set"],
            r["seed_index"],
            r["question_id"],
            r["pass_index"],
            r["role"],
        )
        if r["role"] != "generator":
            parent = by_id[r["parent_id"]]
            pm, cm = json.loads(parent["messages"]), json.loads(r["messages"])
            assert cm[: len(pm)] == pm and cm[len(pm)]["content"] == parent["output"]
        if r["role"] == "verifier" and r["pass_index"] == 1:
            assert r["answer"] is None and r["correct"] is None
    assert len({r["seed"] for r in rows}) == len(rows)
    samples = list(store.db.query("SELECT * FROM eval_samples ORDER BY seed_index, position"))
    assert [[r["question_id"] for r in samples if r["seed_index"] == s] for s in range(3)] == res[
        "sampled"
    ]
    store.close()


def test_resume_after_interrupt_generates_only_what_is_missing(tmp_path, gsm_file):
    settings = EvalSettings(mode="all", votes=2, samples=3, seeds=2)
    store, runner = make_runner(tmp_path, gsm_file, settings, FakeEngine(scripted, fail_after=7))
    with pytest.raises(KeyboardInterrupt):
        runner.execute()
    assert store.db.execute("SELECT COUNT(*) FROM eval_generations").fetchone()[0] == 7
    store.close()
    store, runner = make_runner(tmp_path, gsm_file, settings, FakeEngine(scripted))
    progress = runner.execute()
    assert progress.total == 2 * 3 * 2 * 3 and progress.generated == progress.total - 7
    resumed = runner.results()
    store.close()
    again = FakeEngine(scripted)
    store, runner = make_runner(tmp_path, gsm_file, settings, again)
    assert runner.execute().generated == 0 and again.requests == []
    store.close()
    store, runner = make_runner(tmp_path, gsm_file, settings, FakeEngine(scripted), db="f.db")
    runner.execute()
    assert runner.results() == resumed
    store.close()


def test_sa_turns_are_reused_by_ma_and_more_samples_reuse_the_prefix(tmp_path, gsm_file):
    small = EvalSettings(mode="sa", votes=2, samples=2, seeds=1)
    store, runner = make_runner(tmp_path, gsm_file, small, FakeEngine(scripted))
    assert runner.execute().generated == 2 * 2
    store.close()
    # MA on the same sample: only critiques and refinements are new.
    engine = FakeEngine(scripted)
    store, runner = make_runner(
        tmp_path, gsm_file, EvalSettings(mode="all", votes=2, samples=2, seeds=1), engine
    )
    assert runner.execute().generated == 2 * 2 * 2
    assert {role_of(r) for r in engine.requests} == {"verifier", "refiner"}
    store.close()
    # One more question and one more vote: only their turns are new.
    store, runner = make_runner(
        tmp_path,
        gsm_file,
        EvalSettings(mode="all", votes=3, samples=3, seeds=1),
        FakeEngine(scripted),
    )
    assert runner.execute().generated == 3 * 3 * 3 - 2 * 2 * 3
    store.close()


class AdapterFake(FakeEngine):
    """Records adapter switches; its 'model' answers differently under an adapter."""

    def __init__(self) -> None:
        self.current: list = []
        self.log: list = []
        super().__init__(self.answer)

    def load_adapter(self, path):
        return ("handle", str(path))

    def use_adapters(self, adapters):
        self.current = list(adapters)
        self.log.append(("use", tuple(adapters)))

    def answer(self, request, key, seed):
        self.log.append(("gen", role_of(request)))
        text = scripted(request, key, seed)
        return text + (" [adapted]" if self.current else "")


def test_adapters_are_set_per_role_batch_and_only_for_their_role(tmp_path, gsm_file):
    settings = EvalSettings(mode="all", votes=2, samples=2, seeds=2)
    lora = AdapterSet(
        "lora-v", {"verifier": [{"sha256": "ab", "scale": 0.5}]}, {"verifier": [("HANDLE", 0.5)]}
    )
    engine = AdapterFake()
    store, runner = make_runner(tmp_path, gsm_file, settings, engine, (AdapterSet(BASE), lora))
    runner.execute()
    # Six batches: base G, V, R then LoRA G, V, R; each switch precedes only its role's work.
    switches = [i for i, e in enumerate(engine.log) if e[0] == "use"]
    assert [engine.log[i][1] for i in switches] == [(), (), (), (), (("HANDLE", 0.5),), ()]
    bounds = switches + [len(engine.log)]
    for k, (a, b) in enumerate(zip(bounds, bounds[1:], strict=False)):
        roles = {e[1] for e in engine.log[a + 1 : b]}
        assert roles == {("generator", "verifier", "refiner")[k % 3]}
    rows = list(store.db.query("SELECT * FROM eval_generations"))
    out = {
        (r["adapter_set"], r["seed_index"], r["question_id"], r["pass_index"], r["role"]): r[
            "output"
        ]
        for r in rows
    }
    for (aset, s, qid, p, role), text in out.items():
        if aset == "lora-v":
            base = out[(BASE, s, qid, p, role)]
            assert (text != base) == (role == "verifier") or role == "refiner"
            assert text.endswith("[adapted]") == (role == "verifier")
    res = runner.results()["benchmarks"][0]
    assert set(res["accuracy"]) == {
        "SA",
        "SA+MV",
        "MA",
        "MA+MV",
        "SA+LoRA",
        "SA+LoRA+MV",
        "MA+LoRA",
        "MA+LoRA+MV",
    }
    sets = {
        r["id"]: json.loads(r["adapters"])
        for r in store.db.query("SELECT * FROM eval_adapter_sets")
    }
    assert sets == {BASE: {}, "lora-v": {"verifier": [{"sha256": "ab", "scale": 0.5}]}}
    store.close()


def test_an_engine_without_adapter_support_is_refused(tmp_path, gsm_file):
    lora = AdapterSet(
        "lora-v", {"verifier": [{"sha256": "ab", "scale": 1.0}]}, {"verifier": [("H", 1.0)]}
    )
    from malt_local.errors import MaltError

    with pytest.raises(MaltError, match="cannot apply LoRA"):
        make_runner(
            tmp_path, gsm_file, EvalSettings(), FakeEngine(scripted), (AdapterSet(BASE), lora)
        )


def test_benchmark_labels_name_the_folder_and_stay_distinct(tmp_path):
    for d in ("gsm8k", "math500"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "test.jsonl").write_text('{"question": "1+1?", "answer": "#### 2"}\n')
    benches = load_benchmarks(
        [
            tmp_path / "gsm8k/test.jsonl",
            tmp_path / "math500/test.jsonl",
            tmp_path / "gsm8k/test.jsonl",
        ],
        None,
    )
    assert [b.label for b in benches] == ["gsm8k/test.jsonl", "math500/test.jsonl"]
    assert isinstance(benches[0], Benchmark)


# --------------------------------------------------------------------------- bad input (CLI)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--votes", "0"], "--votes must be in [1, 1000] (got 0)"),
        (["--samples", "0"], "--samples must be in [1, 1000000] (got 0)"),
        (["--seeds", "0"], "--seeds must be in [1, 1000] (got 0)"),
        (["--adapter", "critic=x.gguf"], "unknown role 'critic'"),
        (["--adapter", "generator"], "expected ROLE=PATH"),
        (["--task", "poetry"], "unknown task 'poetry'"),
        (["--ctx", "100"], "--ctx 100 is too small (at least 256)"),
        (["--temperature", "nan"], "--temperature must be a finite number"),
        (["--top-k", str(10**22)], "--top-k must be in"),
        (["--seed", str(10**22)], "--seed must be a 64-bit integer"),
        (["--max-tokens", str(2**31)], "--max-tokens must be in"),
    ],
)
def test_bad_flags_are_one_line_exit_2_and_write_nothing(tmp_path, gsm_file, args, message):
    db = tmp_path / "bad.db"
    r = malt("eval", str(gsm_file), "--model", "nope.gguf", "--db", str(db), *args)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not db.exists()


def test_missing_questions_file_and_model_are_clear(tmp_path, gsm_file):
    r = malt(
        "eval", str(tmp_path / "none.jsonl"), "--model", "x.gguf", "--db", str(tmp_path / "a.db")
    )
    assert r.returncode == 2 and "questions file not found" in r.stderr
    r = malt("eval", str(gsm_file), "--db", str(tmp_path / "a.db"))
    assert r.returncode == 2 and "no model" in r.stderr
    assert not (tmp_path / "a.db").exists()


# --------------------------------------------------------------------------- real model


def slice_of(src: Path, dest: Path, n: int = 12) -> Path:
    """The n shortest rows of a real benchmark file (short prompts keep two cores quick)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    lines = sorted(src.read_text(encoding="utf-8").splitlines()[:200], key=len)[:n]
    dest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return dest


def hand_vote(answers: list, task: str, options) -> int | None:
    """The documented rule, written out again: most votes, ties to the earliest first vote."""
    groups: list[list[int]] = []  # [first pass, votes]
    for i, a in enumerate(answers):
        if a is None:
            continue
        for g in groups:
            if answers_equal(answers[g[0]], a, task, options):
                g[1] += 1
                break
        else:
            groups.append([i, 1])
    if not groups:
        return None
    top = max(g[1] for g in groups)
    return next(g[0] for g in groups if g[1] == top)


def test_real_model_eval_all_modes_recomputed_by_hand(tmp_path, small_model):
    files = [
        slice_of(TEST_DATA / "gsm8k/test.jsonl", tmp_path / "gsm8k/test.jsonl"),
        slice_of(TEST_DATA / "math500/test.jsonl", tmp_path / "math500/test.jsonl"),
        slice_of(TEST_DATA / "csqa/validation.jsonl", tmp_path / "csqa/validation.jsonl"),
    ]
    db = tmp_path / "eval.db"
    votes, seeds = 2, 2
    argv = [
        "eval",
        *map(str, files),
        "--mode",
        "all",
        "--votes",
        str(votes),
        "--samples",
        "1",
        "--seeds",
        str(seeds),
        "--max-tokens",
        "16",
        "--model",
        str(small_model),
        "--db",
        str(db),
    ]
    r = malt(*argv, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["columns"] == ["SA", "SA+MV", "MA", "MA+MV"]
    assert out["generations_new"] == out["generations_total"] == 3 * seeds * votes * 3
    assert [b["benchmark"] for b in out["benchmarks"]] == [
        "gsm8k/test.jsonl",
        "math500/test.jsonl",
        "csqa/validation.jsonl",
    ]

    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    questions = {r["id"]: dict(r) for r in conn.execute("SELECT * FROM questions")}
    gens = {}
    for row in conn.execute(
        "SELECT * FROM eval_generations WHERE eval_run_id = ?", [out["eval_run"]]
    ):
        gens[(row["seed_index"], row["question_id"], row["pass_index"], row["role"])] = dict(row)
    assert len(gens) == out["generations_total"]
    samples = defaultdict(list)
    for row in conn.execute(
        "SELECT * FROM eval_samples WHERE eval_run_id = ? ORDER BY benchmark, seed_index, position",
        [out["eval_run"]],
    ):
        samples[(row["benchmark"], row["seed_index"])].append(row["question_id"])
    conn.close()

    # Every stored grade is the grader's verdict on the stored text.
    for (_, qid, _, role), g in gens.items():
        qr = questions[qid]
        options = [tuple(o) for o in json.loads(qr["options"])] if qr["options"] else None
        answer, correct = grade(g["output"], qr["ground_truth"], qr["task"], options)
        assert g["answer"] == answer
        assert g["correct"] == (None if role == "verifier" and answer is None else correct)

    for bench in out["benchmarks"]:
        per = defaultdict(list)
        counts = {k: defaultdict(int) for k in ("MA", "MA+MV")}
        for s in range(seeds):
            qids = samples[(bench["benchmark"], s)]
            assert qids == bench["sampled"][s] and len(qids) == 1
            flags = defaultdict(list)
            for qid in qids:
                qr = questions[qid]
                options = [tuple(o) for o in json.loads(qr["options"])] if qr["options"] else None
                chain = [
                    {role: gens[(s, qid, p, role)] for role in ("generator", "verifier", "refiner")}
                    for p in range(votes)
                ]
                after_v = [
                    c["verifier"] if c["verifier"]["answer"] is not None else c["generator"]
                    for c in chain
                ]

                def voted(turns, qr=qr, options=options):
                    i = hand_vote([t["answer"] for t in turns], qr["task"], options)
                    return i is not None and bool(turns[i]["correct"])

                g0, v0, r0 = (
                    bool(chain[0]["generator"]["correct"]),
                    bool(after_v[0]["correct"]),
                    bool(chain[0]["refiner"]["correct"]),
                )
                gm = voted([c["generator"] for c in chain])
                vm = voted(after_v)
                rm = voted([c["refiner"] for c in chain])
                for name, flag in (
                    ("SA", g0),
                    ("SA+MV", gm),
                    ("MA", r0),
                    ("MA+MV", rm),
                    ("V", v0),
                    ("V+MV", vm),
                ):
                    flags[name].append(flag)
                for name, (a, b) in (("MA", (g0, r0)), ("MA+MV", (gm, rm))):
                    counts[name][f"{'right' if a else 'wrong'}_to_{'right' if b else 'wrong'}"] += 1
            for name, fl in flags.items():
                per[name].append(100.0 * sum(fl) / len(fl))
        for col in ("SA", "SA+MV", "MA", "MA+MV"):
            got = bench["accuracy"][col]
            assert got["per_seed"] == pytest.approx(per[col])
            assert got["mean"] == pytest.approx(statistics.fmean(per[col]), abs=1e-3)
            assert got["std"] == pytest.approx(statistics.pstdev(per[col]), abs=1e-3)
        for col, v in (("MA", "V"), ("MA+MV", "V+MV")):
            tw = bench["turnwise"][col]
            assert tw["after_verifier"]["per_seed"] == pytest.approx(per[v])
            assert tw["after_generator"]["per_seed"] == pytest.approx(per[col.replace("MA", "SA")])
            assert tw["after_refiner"] == bench["accuracy"][col]
            sc = bench["self_correction"][col]
            assert {k: c for k, c in sc["counts"].items() if c} == dict(counts[col])
            assert sc["questions"] == seeds

    # The same command again: nothing new, and the table shows the same numbers.
    r = malt(*argv)
    assert r.returncode == 0, r.stderr
    assert "0 turns generated" in r.stdout
    for col in ("SA", "SA+MV", "MA", "MA+MV", "after G", "wrong→right"):
        assert col in r.stdout
    for bench in out["benchmarks"]:
        line = next(ln for ln in r.stdout.splitlines() if bench["benchmark"] in ln)
        cells = re.findall(r"(\d+\.\d\d) ± (\d+\.\d\d)", line)
        assert [(float(m), float(s)) for m, s in cells] == [
            (round(bench["accuracy"][c]["mean"], 2), round(bench["accuracy"][c]["std"], 2))
            for c in out["columns"]
        ]


def _adapters_folder(folder: Path, base_sha: str, prompts: list[str]) -> Path:
    """A malt train folder as `eval --adapters` reads it, whose one adapter file is no GGUF: a
    refusal that names the model or the prompts shows the identity was checked first."""
    folder.mkdir()
    (folder / "generator-sft.gguf").write_bytes(b"not a gguf")
    manifest = {
        "tool": "malt-train",
        "base": {"kind": "gguf", "sha256": base_sha},
        "export": {"model": {"file": "m.gguf", "sha256": base_sha}, "prompts_sha256": prompts},
        "adapters": {"generator-sft": {"role": "generator", "gguf": "generator-sft.gguf"}},
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def test_eval_refuses_adapters_made_for_another_model_or_other_prompts(tmp_path, small_model):
    from malt_local.hashing import sha256_file
    from malt_local.run.settings import prompts_digest

    sha = sha256_file(small_model)
    ours = prompts_digest(PromptSet(None).hashes())
    db = tmp_path / "eval.db"
    argv = ["eval", str(TEST_DATA / "gsm8k/test.jsonl"), "--model", str(small_model),
            "--db", str(db), "--samples", "1", "--seeds", "1"]  # fmt: skip

    def refused(folder: Path, *extra: str) -> str:
        r = malt(*argv, "--adapters", str(folder), *extra)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("Error: "), r.stderr
        assert not db.exists()
        return lines[0]

    other_model = _adapters_folder(tmp_path / "other-model", "0" * 64, [ours])
    line = refused(other_model)
    assert "trained on the model with sha256 000000000000" in line and "--allow-mismatch" in line
    other_prompts = _adapters_folder(tmp_path / "other-prompts", sha, ["f" * 64])
    line = refused(other_prompts)
    assert "other prompts" in line and "ffffffffffff" in line
    # The same model and prompts pass the identity check, and so does --allow-mismatch: what
    # refuses them then is llama.cpp's check of the adapter file itself.
    same = _adapters_folder(tmp_path / "same", sha, [ours])
    for folder, extra in [(same, ()), (other_model, ("--allow-mismatch",))]:
        line = refused(folder, *extra)
        assert "sha256" not in line and "prompts" not in line and "generator-sft.gguf" in line
