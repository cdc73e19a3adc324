"""The batched tree engine against the high-level reference, with the real small model.

Both layouts of the KV cache are exercised: one stream per sequence (the CPU default) and one
unified cache (the GPU default, and whenever --ctx is given).

Batched decoding changes the order of floating-point sums (other sequences' cells sit between a
sequence's own ones in the unified cache, and a step multiplies more rows at once), so greedy
text equals the high-level path's exactly only where the engine runs one sequence alone. With
many sequences at once, every greedy token is checked against the reference model instead: it
must be the reference's best token or within a small logit margin of it.
"""

from __future__ import annotations

import dataclasses
import json

import llama_cpp
import numpy as np
import pytest

from malt_local.db.store import Store
from malt_local.engines import EngineOptions, make_engine
from malt_local.engines.base import GenRequest, RequestQueue, SamplingParams
from malt_local.engines.llama import batched as batched_engine
from malt_local.engines.llama import sizing
from malt_local.engines.llama.batched import BatchedEngine
from malt_local.engines.llama.model import LocalModel
from malt_local.engines.llama.sampler import Draw, VectorSampler
from malt_local.engines.llama.simple import HighLevelEngine
from malt_local.engines.llama.sizing import kv_bytes_per_cell, plan_batch
from malt_local.errors import MaltError
from malt_local.prompts import PromptSet
from malt_local.questions.loading import load_questions
from malt_local.roles import tree_size
from malt_local.run.settings import Run, RunSpec
from malt_local.run.tree import TreeRunner
from tests.conftest import EXAMPLES

GREEDY = SamplingParams(temperature=0.0, max_tokens=16)
PROMPTS = [
    "What is 12 plus 30?",
    "Name three colours.",
    "Janet has 3 apples and buys 5 more. How many apples does she have?",
]


@pytest.fixture(scope="module")
def model(small_model):
    m = LocalModel(small_model, n_ctx=2048, n_threads=2)
    yield m
    m.close()


LAYOUTS = pytest.mark.parametrize("unified", [False, True], ids=["streams", "unified"])


def engine_for(
    model, *, max_tokens=16, flash_attn=None, unified=None, **overrides
) -> BatchedEngine:
    plan = plan_batch(
        model, max_tokens=max_tokens, seq_limit=2048, flash_attn=flash_attn,
        parallel=overrides.pop("parallel", 16), ctx=overrides.pop("ctx", None),
        kv_unified=unified,
    )  # fmt: skip
    assert unified is None or plan.kv_unified == unified
    return BatchedEngine(model, dataclasses.replace(plan, **overrides), owns_model=False)


def chat(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def queue_of(*requests: GenRequest) -> RequestQueue:
    q = RequestQueue()
    for i, r in enumerate(requests):
        q.push(r, (i,))
    return q


def request(i: int, params=GREEDY, keys=("a",), seeds=None) -> GenRequest:
    keys = [f"p{i}{k}" for k in keys]
    return GenRequest(chat(PROMPTS[i]), keys, list(seeds or range(1, len(keys) + 1)), params)


def run(engine, *requests) -> dict:
    out = {}
    for c in engine.generate(queue_of(*requests)):
        assert c.key not in out, f"{c.key} produced twice"
        out[c.key] = c
    return out


# -- greedy against the high-level API -----------------------------------------------------------


@LAYOUTS
def test_greedy_one_sequence_at_a_time_equals_high_level_text(model, unified):
    # Same kernels as the high-level context (no flash attention) and one sequence in the cache:
    # the computation is the same, so the text must be identical.
    eng = engine_for(model, flash_attn=False, unified=unified)
    ref = HighLevelEngine(model)
    try:
        for i in range(len(PROMPTS)):
            (b,) = run(eng, request(i)).values()
            (h,) = run(ref, request(i)).values()
            assert (b.text, b.finish_reason, b.prompt_tokens, b.completion_tokens) == (
                h.text, h.finish_reason, h.prompt_tokens, h.completion_tokens,
            )  # fmt: skip
            assert b.completion_tokens > 0
    finally:
        eng.close()


def reference_gaps(model: LocalModel, messages, text: str) -> list[float]:
    """For each token of `text`, how far its logit is below the reference model's best one,
    with the text so far as context (teacher forcing through the high-level context)."""
    llm = model.llm
    tokens = llm.tokenize(text.encode(), add_bos=False, special=False)
    llm.reset()
    llm.eval(model.prompt_tokens(messages))
    gaps = []
    for t in tokens:
        ptr = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
        logits = np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),))
        gaps.append(float(logits.max() - logits[t]))
        llm.eval([t])
    llm.reset()
    return gaps


@LAYOUTS
def test_greedy_in_a_full_batch_follows_the_reference_model(model, unified):
    eng = engine_for(model, unified=unified)
    try:
        reqs = [request(i, keys=("a", "b", "c")) for i in range(len(PROMPTS))]
        out = run(eng, *reqs)
    finally:
        eng.close()
    assert set(out) == {k for r in reqs for k in r.keys}
    assert eng.stats.peak_live == 9 and eng.stats.mean_batch > 1
    for r in reqs:
        for key in r.keys:
            gaps = reference_gaps(model, r.messages, out[key].text)
            assert gaps and max(gaps) < 1.0, (key, out[key].text, gaps)
            # Most tokens are exactly the reference's best.
            assert sum(g == 0.0 for g in gaps) >= 0.8 * len(gaps)


@LAYOUTS
def test_child_prompt_reuses_the_parents_cache(model, unified):
    """A child request extending its parent's prompt and output prefills only the new turn."""
    eng = engine_for(model, unified=unified)
    parent = GenRequest(chat(PROMPTS[0]), ["g"], [1], GREEDY, expects_children=True)
    queue = queue_of(parent)
    out = {}
    try:
        for c in eng.generate(queue):
            out[c.key] = c
            if c.key == "g":
                child = chat(PROMPTS[0]) + [
                    {"role": "assistant", "content": c.text},
                    {"role": "user", "content": "Check the answer above."},
                ]
                queue.push(GenRequest(child, ["v0", "v1"], [2, 3], GREEDY, parent_key="g"))
    finally:
        eng.close()
    assert set(out) == {"g", "v0", "v1"}
    full = out["v0"].prompt_tokens
    assert eng.stats.reused_tokens >= out["g"].prompt_tokens
    # Prefilled: the whole first prompt, then only the child's turn.
    assert eng.stats.prefill_tokens <= out["g"].prompt_tokens + full - eng.stats.reused_tokens
    assert out["v0"].text == out["v1"].text  # greedy siblings share every token


def waiting_parent_run(eng) -> dict:
    """A short parent between two long requests, its three children held back by --parallel 4:
    the parent waits in the cache between live sequences, then its children start mid-batch."""
    short = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    long = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    queue = queue_of(
        request(0, long, keys=("a",)),
        GenRequest(chat(PROMPTS[1]), ["g"], [1], short, expects_children=True),
        request(2, long, keys=("a", "b")),
    )
    out = {}
    for c in eng.generate(queue):
        assert c.key not in out
        out[c.key] = c
        if c.key == "g":
            child = chat(PROMPTS[1]) + [
                {"role": "assistant", "content": c.text},
                {"role": "user", "content": "Check the answer above."},
            ]
            queue.push(GenRequest(child, ["v0", "v1", "v2"], [2, 3, 4], long, parent_key="g"), (9,))
    return out


def test_live_sequences_are_moved_into_one_run_of_ids(model, monkeypatch):
    """With a stream per sequence, every step decodes one run of consecutive ids (one
    micro-batch), and moving a sequence's stream changes none of its tokens."""
    eng = engine_for(model, parallel=4, unified=False)
    try:
        moved = waiting_parent_run(eng)
        stats = eng.stats
        monkeypatch.setattr(BatchedEngine, "_compact", lambda self: None)
        eng.stats = batched_engine.EngineStats()
        still = waiting_parent_run(eng)
    finally:
        eng.close()
    assert set(moved) == {"p0a", "g", "p2a", "p2b", "v0", "v1", "v2"}
    # The waiting parent moved up, a live sequence into its place, and the first child (the
    # parent's id) down after its prefill; no step had more than one run (steps that only
    # prefill have none).
    assert stats.moves >= 3 and stats.id_runs <= stats.steps
    assert eng.stats.moves == 0 and eng.stats.id_runs > eng.stats.steps
    assert stats.reused_tokens == eng.stats.reused_tokens > 0
    assert {k: c.text for k, c in moved.items()} == {k: c.text for k, c in still.items()}
    assert all(moved[k].completion_tokens == 24 for k in ("v0", "v1", "v2", "p0a", "p2b"))


# -- seeds ---------------------------------------------------------------------------------------


@LAYOUTS
def test_sibling_seeds_differ_and_the_same_seeds_repeat(model, unified):
    params = SamplingParams(temperature=0.9, max_tokens=16, ignore_eos=True)
    reqs = [request(i, params, keys=("a", "b", "c"), seeds=(11, 22, 33)) for i in range(2)]
    eng = engine_for(model, unified=unified)
    try:
        first = run(eng, *reqs)
        again = run(eng, *reqs)
    finally:
        eng.close()
    for r in reqs:
        texts = [first[k].text for k in r.keys]
        assert len(set(texts)) == 3, texts
        assert all(first[k].completion_tokens == 16 for k in r.keys)
    assert {k: c.text for k, c in first.items()} == {k: c.text for k, c in again.items()}


# -- the tree ------------------------------------------------------------------------------------


def tree_run(tmp_path, engine, name: str, n: int = 2, max_tokens: int = 12, prompts=None):
    store = Store(tmp_path / f"{name}.db")
    spec = RunSpec(
        model="m.gguf", model_sha256="0" * 64, n=n, temperature=0.3, top_p=1.0, top_k=0,
        max_tokens=max_tokens, seed=5, theta=0.5, task=None, prompts_sha256="p",
        prompt_hashes={}, ignore_eos=True,
    )  # fmt: skip
    store.insert_run(spec.row("r"))
    questions = load_questions(EXAMPLES / "gsm8k.jsonl")[:1]
    store.add_questions("r", questions)
    progress = TreeRunner(store, Run("r", spec), questions, engine, PromptSet(prompts)).execute()
    nodes = sorted(store.nodes("r"), key=lambda r: r.path)
    store.close()
    return progress, nodes


def bookkeeping(node) -> tuple:
    return (
        node.id, node.parent_id, node.role, node.depth, node.branch, node.path, node.seed,
        node.completion_tokens, node.finish_reason,
    )  # fmt: skip


@LAYOUTS
@pytest.mark.parametrize("prompts", ["default", "paper"])
def test_tree_through_the_engine_matches_the_high_level_tree(model, tmp_path, unified, prompts):
    eng = engine_for(model, max_tokens=12, unified=unified)
    try:
        p_b, batched = tree_run(tmp_path, eng, "batched", prompts=prompts)
    finally:
        eng.close()
    p_h, simple = tree_run(tmp_path, HighLevelEngine(model), "simple", prompts=prompts)
    assert p_b.done == p_h.done == p_b.total == tree_size(2)
    assert [bookkeeping(n) for n in batched] == [bookkeeping(n) for n in simple]
    for node in batched + simple:
        assert node.prompt_tokens == len(model.prompt_tokens(json.loads(node.messages)))
        assert node.completion_tokens == 12 and node.value is not None
    if prompts == "default":
        # Verifier and refiner prompts extend their parents': most of each was already cached.
        assert eng.stats.reused_tokens > eng.stats.prefill_tokens
    else:
        # Each role its own conversation: no parent is kept for its children, nothing reused.
        assert {len(json.loads(n.messages)) for n in batched} == {2}
        assert eng.stats.reused_tokens == 0
    assert eng.stats.cache_full == 0


def test_a_full_cache_recovers_and_every_node_is_made_once(model, tmp_path):
    # 768 cells cannot hold this tree's live sequences (about 1,100 cells at its widest): decode
    # runs out of KV slots, kept parents are dropped and young sequences restart later.
    eng = engine_for(model, max_tokens=48, ctx=768, parallel=8)
    try:
        progress, nodes = tree_run(tmp_path, eng, "small", max_tokens=48)
    finally:
        eng.close()
    assert eng.plan.n_ctx == 768
    assert eng.stats.cache_full > 0 and eng.stats.preempted + eng.stats.evicted > 0
    assert progress.done == progress.total == len(nodes) == tree_size(2)
    assert len({n.id for n in nodes}) == len(nodes)
    assert all(n.completion_tokens == 48 and n.finish_reason == "length" for n in nodes)


def test_cache_full_inside_one_request_preempts_siblings(model):
    params = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
    reqs = [request(i, params, keys=("a", "b", "c")) for i in range(3)]
    eng = engine_for(model, max_tokens=64, ctx=512, parallel=9)
    try:
        out = run(eng, *reqs)
    finally:
        eng.close()
    assert eng.stats.cache_full > 0 and eng.stats.preempted > 0
    assert set(out) == {k for r in reqs for k in r.keys}
    assert all(c.completion_tokens == 64 for c in out.values())


def test_a_prompt_longer_than_a_sequence_may_be_is_an_empty_length_node(model):
    eng = engine_for(model, seq_limit=20)
    try:
        out = run(eng, request(2, keys=("a", "b")))
    finally:
        eng.close()
    prompt = len(model.prompt_tokens(chat(PROMPTS[2])))
    assert prompt > 20
    got = {(c.text, c.finish_reason, c.prompt_tokens, c.completion_tokens) for c in out.values()}
    assert got == {("", "length", prompt, 0)} and len(out) == 2


# -- sizing and wiring ---------------------------------------------------------------------------


def test_settings_that_cannot_fit_are_clear_errors(model, monkeypatch):
    with pytest.raises(MaltError, match="--parallel"):
        plan_batch(model, max_tokens=16, seq_limit=2048, parallel=0)
    with pytest.raises(MaltError, match="--parallel"):
        plan_batch(model, max_tokens=16, seq_limit=2048, parallel=10_000)
    with pytest.raises(MaltError, match="--ctx"):
        plan_batch(model, max_tokens=16, seq_limit=2048, ctx=100)
    with pytest.raises(MaltError, match="--ctx must be at most"):
        plan_batch(model, max_tokens=16, seq_limit=2048, ctx=2**40)
    with pytest.raises(MaltError, match="lower --parallel or --ctx"):
        plan_batch(model, max_tokens=16, seq_limit=2048, ctx=2**31 - 1)
    # On a CPU: one stream of seq_limit cells per sequence id, half the ids spare for kept
    # parents, as many as STREAMS_BYTES holds; the free memory never changes the plan (the
    # layout changes the texts), it only refuses one that cannot fit.
    gib = 2**30
    per_stream = 2560 * kv_bytes_per_cell(model)  # the benchmark's nodes: 3 * 96 + 2048 cells
    plans = []
    for free in (32, 20, 12, 8, 3, 2.1):
        monkeypatch.setattr(sizing, "available_memory", lambda free=free: free * gib)
        plans.append(plan_batch(model, max_tokens=96, seq_limit=2336))
    plan = plans[0]
    assert all(p == plan for p in plans), plans
    assert plan.parallel == 32 and not plan.offload and not plan.kv_unified
    assert plan.n_seq_max == min(64, sizing.STREAMS_BYTES // per_stream) > plan.parallel
    assert plan.seq_limit == 2336 and plan.n_ctx == plan.n_seq_max * 2560
    monkeypatch.setattr(sizing, "available_memory", lambda: plan.kv_bytes - 1)
    with pytest.raises(MaltError, match="lower --parallel or --max-tokens"):
        plan_batch(model, max_tokens=96, seq_limit=2336)
    # Where streams do not fit STREAMS_BYTES (512 tokens a node): a unified cache, again
    # whatever is free.
    small = []
    for free in (32, 3):
        monkeypatch.setattr(sizing, "available_memory", lambda free=free: free * gib)
        small.append(plan_batch(model, max_tokens=512, seq_limit=3584))
    assert small[0] == small[1] and small[0].kv_unified and small[0].n_seq_max == 64
    assert small[0].n_ctx == -(-(32 * (768 + 128) + 3584) // 256) * 256
    # A total size asks for one unified cache.
    unified = plan_batch(model, max_tokens=512, seq_limit=3584, ctx=8192)
    assert unified.kv_unified and unified.n_ctx == 8192 and unified.seq_limit == 3584
    assert plan.n_seq_max <= llama_cpp.llama_max_parallel_sequences()
    with pytest.raises(MaltError, match="unknown engine"):
        make_engine("turbo", EngineOptions(max_tokens=16, model_path=model.path))


def test_use_adapters_with_none_drops_kept_prefixes(model):
    eng = engine_for(model)
    try:
        run(eng, request(0))
        eng.use_adapters([])
        (c,) = run(eng, request(0)).values()
        assert c.completion_tokens > 0
    finally:
        eng.close()


# -- the sampler (no model) ----------------------------------------------------------------------


def draws_for(logits, params, seeds):
    return [Draw(i, params, [np.random.default_rng(s)]) for i, s in enumerate(seeds)]


def test_vector_sampler_greedy_topk_topp_and_eos_mask():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 1000)).astype(np.float32)
    logits[:, 7] += 10  # token 7 is everyone's best
    sampler = VectorSampler(eog_ids=[7])
    best = logits.argmax(axis=1).tolist()
    assert sampler.sample(logits.copy(), draws_for(logits, GREEDY, range(4))) == [[b] for b in best]
    top1 = SamplingParams(temperature=1.0, top_k=1)
    assert sampler.sample(logits.copy(), draws_for(logits, top1, range(4))) == [[7]] * 4
    tiny_p = SamplingParams(temperature=1.0, top_p=0.01)
    assert sampler.sample(logits.copy(), draws_for(logits, tiny_p, range(4))) == [[7]] * 4
    no_eos = SamplingParams(temperature=0.0, ignore_eos=True)
    second = np.sort(logits, axis=1)[:, -2]
    got = sampler.sample(logits.copy(), draws_for(logits, no_eos, range(4)))
    assert [logits[i, t] for i, (t,) in enumerate(got)] == list(second)


def test_vector_sampler_draws_from_the_tempered_distribution():
    logits = np.full((1, 50), -100.0, dtype=np.float32)
    logits[0, 3], logits[0, 9] = 0.0, np.log(2.0)
    sampler = VectorSampler(eog_ids=[])
    params = SamplingParams(temperature=1.0)
    gen = np.random.default_rng(1)
    draw = [Draw(0, params, [gen] * 3000)]
    (tokens,) = sampler.sample(logits, draw)
    assert set(tokens) == {3, 9}
    assert abs(tokens.count(9) / 3000 - 2 / 3) < 0.03
    # Same seed, same draws.
    again = sampler.sample(logits, [Draw(0, params, [np.random.default_rng(5)])])
    assert again == sampler.sample(logits, [Draw(0, params, [np.random.default_rng(5)])])


def test_a_request_split_keeps_each_childs_seed_and_the_tree_it_belongs_to():
    req = GenRequest(
        [{"role": "user", "content": "q"}], ["a", "b", "c"], [7, 8, 9], GREEDY,
        parent_key="p", expects_children=True, group="q1", role="verifier",
    )  # fmt: skip
    part = req.only(["c", "a"])
    assert (part.keys, part.seeds, part.parent_key) == (["c", "a"], [9, 7], None)
    assert (part.group, part.role, part.expects_children) == ("q1", "verifier", True)
    assert req.only(["b"], parent_key="p").parent_key == "p"
    assert (req.keys, req.seeds) == (["a", "b", "c"], [7, 8, 9])
    with pytest.raises(KeyError):
        req.only(["z"])
