"""Model backends behind one interface: prompts in, completions out.

The tree, the judge and eval see only `Engine` and its requests (`base`); the registry names the
engines `--engine` offers; the llama.cpp engines live in `engines.llama`, the OpenAI-compatible
client in `engines.openai`.
"""

from malt_local.engines.base import (
    AdapterEngine,
    Completion,
    Engine,
    GenRequest,
    HasLayout,
    MeasuresPrompts,
    ModelIdentity,
    PerRequestAdapters,
    RequestQueue,
    SamplingParams,
)
from malt_local.engines.registry import (
    ENGINES,
    EngineKind,
    EngineOptions,
    engine_kind,
    engine_names,
    identify_model,
    make_engine,
)

__all__ = [
    "ENGINES",
    "AdapterEngine",
    "Completion",
    "Engine",
    "EngineKind",
    "EngineOptions",
    "GenRequest",
    "HasLayout",
    "MeasuresPrompts",
    "ModelIdentity",
    "PerRequestAdapters",
    "RequestQueue",
    "SamplingParams",
    "engine_kind",
    "engine_names",
    "identify_model",
    "make_engine",
]
