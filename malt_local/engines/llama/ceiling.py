"""The raw decode ceiling of a model on llama.cpp, for `make bench`: B sequences forked from one
prompt, decoded step after step with no sampling, on a context sized like the batched engine's;
then one step's sampling timed through llama.cpp's sampler chains against `VectorSampler`.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path

from malt_local.engines.base import SamplingParams
from malt_local.engines.llama.batched import TokenBatch
from malt_local.engines.llama.model import LocalModel
from malt_local.engines.llama.sampler import Draw, VectorSampler
from malt_local.engines.llama.sizing import new_context, plan_batch
from malt_local.errors import MaltError


def measure_ceiling(
    model_path: str | Path,
    messages: list[dict[str, str]],
    *,
    max_tokens: int,
    position: float,
    batch_size: float,
    seconds_wanted: float,
    sampling_batches: Sequence[int],
    parallel: int | None = None,
    ctx: int | None = None,
    threads: int | None = None,
    gpu_layers: int | None = None,
    flash_attn: bool | None = None,
    kv_unified: bool | None = None,
) -> dict:
    """Tokens/s of plain `llama_decode` at the engine's mean batch and position.

    `messages` is a real prompt, so that the logits sampled are real ones.
    """
    import llama_cpp as lib
    import numpy as np

    model = LocalModel(
        model_path, n_ctx=256, n_batch=64, n_threads=threads, n_gpu_layers=gpu_layers
    )
    plan = plan_batch(
        model,
        max_tokens=max_tokens,
        seq_limit=3 * max_tokens + 2048,
        parallel=parallel,
        ctx=ctx,
        flash_attn=flash_attn,
        kv_unified=kv_unified,
    )
    ctx = new_context(model, plan)
    mem = lib.llama_get_memory(ctx)
    batch = TokenBatch(plan.n_batch, 1)
    n_vocab = model.llm.n_vocab()
    prompt = np.asarray(model.prompt_tokens(messages), dtype=np.int32)

    def fork(b: int, tokens: np.ndarray) -> int:
        """`tokens` in sequence 0, copied to sequences 1..b-1; returns its next token."""
        lib.llama_memory_clear(mem, False)
        for at in range(0, len(tokens), plan.n_batch):
            p = min(plan.n_batch, len(tokens) - at)
            batch.token[:p], batch.pos[:p] = tokens[at : at + p], np.arange(at, at + p)
            batch.n_seq_id[:p], batch.seq_ids[:p, 0], batch.logits[:p] = 1, 0, 0
            batch.logits[p - 1] = 1
            assert batch.decode(ctx, p) == 0
        for s in range(1, b):
            lib.llama_memory_seq_cp(mem, 0, s, -1, -1)
        return int(np.ctypeslib.as_array(lib.llama_get_logits(ctx), shape=(n_vocab,)).argmax())

    def step(b: int, pos: int, token: int | None = None) -> None:
        # Token values do not change the cost of a step; the sampling timings use a real one.
        batch.token[:b] = (2000 + 7 * pos + np.arange(b)) % n_vocab if token is None else token
        batch.pos[:b] = pos
        batch.n_seq_id[:b], batch.seq_ids[:b, 0], batch.logits[:b] = 1, np.arange(b), 1
        rc = batch.decode(ctx, b)
        if rc != 0:
            raise MaltError(f"raw decode failed ({rc}) at B={b}")

    # Decode at the depth the engine decoded at: a context of `depth` tokens, then max_tokens
    # steps, so the mean position of the decoded tokens is the engine's.
    depth = max(1, round(position - max_tokens / 2))
    context = np.resize(prompt, depth)
    b = max(1, min(plan.n_seq_max, round(batch_size)))
    tokens, seconds = 0, 0.0
    while seconds < seconds_wanted:
        fork(b, context)
        step(b, depth)  # warm-up, not timed
        lib.llama_synchronize(ctx)
        t0 = time.perf_counter()
        for i in range(1, max_tokens):
            step(b, depth + i)
        lib.llama_synchronize(ctx)
        seconds += time.perf_counter() - t0
        tokens += b * (max_tokens - 1)

    sampling = []
    vec = VectorSampler(model.eog_ids, min(8, os.cpu_count() or 1) if plan.offload else 1)
    params = SamplingParams(temperature=0.3)
    for sb in [x for x in sampling_batches if x <= plan.n_seq_max]:
        step(sb, len(prompt), fork(sb, prompt))
        chains = []
        for s in range(sb):
            chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_temp(0.3))
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_dist(s))
            chains.append(chain)
        reps = 5
        t0 = time.perf_counter()
        for _ in range(reps):
            for s, chain in enumerate(chains):
                lib.llama_sampler_sample(chain, ctx, s)
        chain_ms = (time.perf_counter() - t0) / reps * 1000
        for chain in chains:
            lib.llama_sampler_free(chain)
        logits = np.ctypeslib.as_array(lib.llama_get_logits(ctx), shape=(sb, n_vocab))
        draws = [Draw(s, params, [np.random.default_rng(s)]) for s in range(sb)]
        t0 = time.perf_counter()
        for _ in range(reps):
            vec.sample(logits, draws)
        vec_ms = (time.perf_counter() - t0) / reps * 1000
        sampling.append({"batch": sb, "chains_ms": chain_ms, "vector_ms": vec_ms})
    vec.close()
    lib.llama_free(ctx)
    model.close()
    return {
        "kind": "ceiling",
        "batch": b,
        "depth": depth,
        "tokens": tokens,
        "seconds": seconds,
        "sampling": sampling,
        "n_vocab": n_vocab,
    }


def backend_info() -> dict:
    """The llama.cpp build the figures come from."""
    import llama_cpp

    try:
        from importlib.metadata import version

        lcp = version("llama-cpp-python")
    except Exception:
        lcp = getattr(llama_cpp, "__version__", "?")
    return {
        "llama_cpp_python": lcp,
        "gpu_offload": bool(llama_cpp.llama_supports_gpu_offload()),
        "platform": platform.machine(),
    }
