"""Building the llama.cpp engines from `EngineOptions` (the registry's entries)."""

from __future__ import annotations

from pathlib import Path

from malt_local.engines.base import Engine, ModelIdentity
from malt_local.engines.llama.batched import BatchedEngine
from malt_local.engines.llama.model import LocalModel, resolve_model_path
from malt_local.engines.llama.simple import HighLevelEngine
from malt_local.engines.llama.sizing import context_size, plan_batch, plan_from_layout
from malt_local.engines.registry import EngineOptions
from malt_local.errors import MaltError


def identify(model_spec: str | None, options: EngineOptions) -> ModelIdentity:
    """The GGUF a path or pulled alias names, its header checked, and its sha256."""
    from malt_local.hashing import cached_sha256

    if not model_spec:
        raise MaltError(
            "no model: pass --model PATH.gguf or a pulled alias "
            "(`malt pull smollm2-135m`), or set MALT_MODEL"
        )
    path, known = resolve_model_path(model_spec)
    return ModelIdentity(model=str(path), sha256=known or cached_sha256(path))


def _model_path(options: EngineOptions) -> Path:
    if options.model_path is None:
        raise MaltError("a llama.cpp engine needs a model: pass --model PATH.gguf or an alias")
    return options.model_path


def make_simple(options: EngineOptions) -> Engine:
    """Node by node; `ctx` is one node's context (prompt plus output)."""
    if options.parallel is not None and not options.judge:
        raise MaltError("--parallel needs --engine batched")
    model = LocalModel(
        _model_path(options),
        n_ctx=context_size(options.max_tokens, options.ctx),
        n_threads=options.threads,
        n_gpu_layers=options.gpu_layers,
    )
    return HighLevelEngine(model)


def make_batched(options: EngineOptions) -> Engine:
    """Every live sequence decoded together; `ctx` is the KV cache all sequences share.

    For the judge (one schema-held verdict per leaf) it is the node-by-node engine: its grammar
    sampling holds output to the schema, which the vectorised sampler does not.
    """
    if options.judge:
        return make_simple(options)
    # The high-level context is only used for tokenising: keep it tiny.
    model = LocalModel(
        _model_path(options),
        n_ctx=256,
        n_batch=64,
        n_threads=options.threads,
        n_gpu_layers=options.gpu_layers,
    )
    try:
        flags = (options.parallel, options.ctx, options.flash_attn, options.kv_unified)
        if options.layout and all(flag is None for flag in flags):
            return BatchedEngine(model, plan_from_layout(model, options.layout))
        plan = plan_batch(
            model,
            max_tokens=options.max_tokens,
            seq_limit=context_size(options.max_tokens, options.ctx),
            parallel=options.parallel,
            ctx=options.ctx,
            flash_attn=options.flash_attn,
            kv_unified=options.kv_unified,
        )
        return BatchedEngine(model, plan)
    except BaseException:
        model.close()
        raise
