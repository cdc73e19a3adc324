"""Sizing the batched engine's llama.cpp context: sequences, KV cells, micro-batches.

Kept apart from the engine so the benchmark and the tests can read a plan without decoding.
"""

from __future__ import annotations

from dataclasses import dataclass

from malt_local.engines.llama.model import LocalModel, quiet_stderr
from malt_local.errors import MaltError

# Default sequences decoding at once. On a GPU a bigger batch is nearly free (raw decode on an
# H100: 2,497 tok/s at 27 sequences, 5,071 at 256); on a CPU the model is compute-bound (2-core
# CPU, SmolLM2-135M: 247 tok/s at 9 sequences, 281 at 27), so a batch only needs to stay full.
DEFAULT_PARALLEL_GPU = 256
DEFAULT_PARALLEL_CPU = 32
# Tokens per physical micro-batch: prompt prefill runs in chunks of this size.
UBATCH_GPU = 1024
UBATCH_CPU = 512
# Bytes the one-stream-per-sequence layout may take (a faster layout, not a necessary one). A
# constant, not a share of the free memory: the layout changes the texts a seed gives, so it
# must follow from the flags and the model alone, or the same command makes another tree on a
# day with less memory free (and a resumed run mixes layouts).
# 2 GiB holds the streams of the benchmark's tree (SmolLM2-135M, 96 tokens a node: 36 ids) and
# still runs with 3 GB free; a larger budget would be refused there.
STREAMS_BYTES = 2 * 2**30


@dataclass(frozen=True)
class BatchPlan:
    """How the batched context is sized; every figure is printed by the benchmark."""

    parallel: int  # most sequences decoding at once
    n_seq_max: int  # sequence ids: the live ones plus parents kept for their children
    n_ctx: int  # KV cells in total
    n_batch: int  # most tokens in one llama_decode
    n_ubatch: int  # physical micro-batch
    seq_limit: int  # most positions one sequence may use (prompt + output)
    threads: int
    offload: bool  # layers on a GPU
    flash_attn: bool
    kv_bytes: int  # bytes of KV cache at n_ctx cells
    # One cache shared by every sequence (a shared prefix is stored once), or one stream of
    # n_ctx / n_seq_max cells per sequence id (a fork copies the prefix).
    kv_unified: bool = True


def kv_bytes_per_cell(model: LocalModel) -> int:
    """K and V at f16 for one token: 2 * layers * kv heads * head size * 2 bytes."""
    import llama_cpp

    m = model.llm._model.model
    n_layer = llama_cpp.llama_model_n_layer(m)
    n_head = max(1, llama_cpp.llama_model_n_head(m))
    n_head_kv = llama_cpp.llama_model_n_head_kv(m) or n_head
    arch = model.llm.metadata.get("general.architecture", "")
    head_k = int(model.llm.metadata.get(f"{arch}.attention.key_length", 0) or 0)
    head_v = int(model.llm.metadata.get(f"{arch}.attention.value_length", 0) or 0)
    head = llama_cpp.llama_model_n_embd(m) // n_head
    return n_layer * n_head_kv * ((head_k or head) + (head_v or head)) * 2


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo, in bytes (None where there is no such file)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def plan_batch(
    model: LocalModel,
    *,
    max_tokens: int,
    seq_limit: int,
    parallel: int | None = None,
    ctx: int | None = None,
    flash_attn: bool | None = None,
    kv_unified: bool | None = None,
) -> BatchPlan:
    """Size the context from the model and the flags; a clear error for what cannot fit.

    `seq_limit` is the per-sequence context of the simple path (prompt plus output), so both
    engines end a too-long node the same way. `ctx` is the total number of KV cells of one
    unified cache; by default there is room for every live sequence's output and a share of
    the prompts above it.

    Two layouts of the KV cache. On a GPU, and wherever `ctx` is given, one unified cache: a
    shared prefix is stored once and a fork only tags cells. On a CPU, by default, one stream
    of `seq_limit` cells per sequence id (a fork copies the parent's stream) whenever more than
    `parallel` streams fit in `STREAMS_BYTES`, up to `2 * parallel` (the spare ids hold
    parents kept until their children start). Attention on the CPU then reads only a
    sequence's own cells, where in a unified cache every query row walks past every other
    sequence's cells too. On the 2-core CPU (SmolLM2-135M, the benchmark's tree at 96 tokens a
    node) streams made 124 to 128 tok/s against 82 for the unified cache, at a cost in memory:
    3.8 against 0.5 GiB peak. `kv_unified` forces either layout.

    Neither choice reads the free memory: the layout changes the texts a seed gives, so one
    command must give one tree on any day. A plan that needs more than the available memory
    is refused in one line instead of shrunk.
    """
    import llama_cpp

    offload = model.n_gpu_layers != 0 and bool(llama_cpp.llama_supports_gpu_offload())
    max_seq = int(llama_cpp.llama_max_parallel_sequences())
    if parallel is None:
        parallel = DEFAULT_PARALLEL_GPU if offload else DEFAULT_PARALLEL_CPU
    if not 1 <= parallel <= max_seq:
        raise MaltError(f"--parallel must be between 1 and {max_seq} (got {parallel})")
    check_ctx(ctx)
    per_cell = kv_bytes_per_cell(model)
    n_ubatch = UBATCH_GPU if offload else UBATCH_CPU

    def make(unified: bool, n_seq_max: int, n_ctx: int, limit: int) -> BatchPlan:
        return BatchPlan(
            parallel=parallel,
            n_seq_max=n_seq_max,
            n_ctx=n_ctx,
            n_batch=max(n_ubatch, parallel + 256),
            n_ubatch=n_ubatch,
            seq_limit=limit,
            threads=model.n_threads,
            offload=offload,
            # Flash attention skips other sequences' cells instead of computing and masking
            # them: on the 2-core CPU, 27 sequences, 288 against 249 tok/s alone and 217
            # against 87 tok/s with 8,000 other cells in a unified cache.
            flash_attn=True if flash_attn is None else flash_attn,
            kv_bytes=n_ctx * per_cell,
            kv_unified=unified,
        )

    if kv_unified is None:
        kv_unified = offload or ctx is not None
    plan = None
    if not kv_unified:
        stream = -(-seq_limit // 256) * 256
        n_seq_max = min(max_seq, 2 * parallel, STREAMS_BYTES // (stream * per_cell))
        if n_seq_max >= parallel + 1:
            plan = make(False, n_seq_max, n_seq_max * stream, seq_limit)
    if plan is None:
        # By default a live sequence holds its own output and, in a tree, about half an
        # output's worth of shared prompt and parent output; seq_limit leaves room for one
        # long prompt.
        n_ctx = ctx if ctx is not None else parallel * (max_tokens * 3 // 2 + 128) + seq_limit
        n_ctx = -(-n_ctx // 256) * 256
        plan = make(True, min(max_seq, 2 * parallel), n_ctx, min(seq_limit, n_ctx))
    _check_memory(
        plan,
        "lower --parallel" + (" or --ctx" if plan.kv_unified else " or --max-tokens"),
    )
    return plan


# The figures of a plan that shape the texts a seed gives: a run records them when it starts,
# and a resumed run is made with them (`plan_from_layout`).
LAYOUT_FIELDS = (
    "kv_unified", "parallel", "n_seq_max", "n_ctx", "n_batch", "n_ubatch", "seq_limit",
    "flash_attn",
)  # fmt: skip


def layout_of(plan: BatchPlan) -> dict:
    """The plan's layout as a run records it (JSON-ready)."""
    return {name: getattr(plan, name) for name in LAYOUT_FIELDS}


def plan_from_layout(model: LocalModel, layout: dict) -> BatchPlan:
    """The plan a run recorded, rebuilt on this machine for its resume.

    The defaults may have moved since the run began (another malt version, a GPU now seen), and
    the texts follow the layout, so a resumed tree keeps the layout it began with.
    """
    import llama_cpp

    try:
        figures = {name: layout[name] for name in LAYOUT_FIELDS}
        ints = [figures[k] for k in LAYOUT_FIELDS if k not in ("kv_unified", "flash_attn")]
        ok = all(type(v) is int and v > 0 for v in ints) and all(
            type(figures[k]) is bool for k in ("kv_unified", "flash_attn")
        )
    except (KeyError, TypeError):
        ok = False
    if not ok:
        raise MaltError(f"the run's recorded KV layout is not readable: {layout!r}")
    max_seq = int(llama_cpp.llama_max_parallel_sequences())
    if figures["n_seq_max"] > max_seq:
        raise MaltError(
            f"the run's KV layout uses {figures['n_seq_max']} sequences, more than this "
            f"llama.cpp's {max_seq}: pass --new-run"
        )
    offload = model.n_gpu_layers != 0 and bool(llama_cpp.llama_supports_gpu_offload())
    plan = BatchPlan(
        **figures,
        threads=model.n_threads,
        offload=offload,
        kv_bytes=figures["n_ctx"] * kv_bytes_per_cell(model),
    )
    _check_memory(plan, "free some memory, or pass --new-run (the run keeps its KV layout)")
    return plan


def _check_memory(plan: BatchPlan, advice: str) -> None:
    """Free memory decides only whether a plan runs at all, never its shape."""
    avail = None if plan.offload else available_memory()
    if avail is not None and plan.kv_bytes > avail:
        raise MaltError(
            f"a KV cache of {plan.n_ctx} cells needs {_gib(plan.kv_bytes)} GiB, more than the "
            f"{_gib(avail)} GiB available: {advice}"
        )


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f}"


def new_context(model: LocalModel, plan: BatchPlan):
    """A second llama.cpp context on the already loaded weights, sized by `plan`."""
    import llama_cpp

    p = llama_cpp.llama_context_default_params()
    p.n_ctx = plan.n_ctx
    p.n_batch = plan.n_batch
    p.n_ubatch = plan.n_ubatch
    p.n_seq_max = plan.n_seq_max
    p.n_outputs_max = plan.n_seq_max  # one row per sequence at most: keeps the buffer small
    p.n_threads = plan.threads
    p.n_threads_batch = plan.threads
    p.kv_unified = plan.kv_unified
    p.flash_attn_type = (
        llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        if plan.flash_attn
        else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    )
    p.no_perf = True
    with quiet_stderr():
        ctx = llama_cpp.llama_init_from_model(model.llm._model.model, p)
        if not ctx and plan.flash_attn:
            # A device or model without flash-attention kernels: let llama.cpp decide.
            p.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO
            ctx = llama_cpp.llama_init_from_model(model.llm._model.model, p)
    if not ctx:
        raise MaltError(
            f"llama.cpp could not create a context of {plan.n_ctx} cells "
            f"({_gib(plan.kv_bytes)} GiB of KV cache) for {plan.parallel} sequences: "
            "lower --ctx or --parallel"
        )
    return ctx


def context_size(max_tokens: int, requested: int | None) -> int:
    """Room for the refiner's prompt: question, answer, critique, and its own output."""
    if requested is not None:
        return check_ctx(requested)
    return 3 * max_tokens + 2048


MIN_CTX = 256
MAX_CTX = 2**31 - 1


def check_ctx(ctx: int | None) -> int | None:
    """A `--ctx` too small for any template and answer, refused before a model is loaded."""
    if ctx is not None and ctx < MIN_CTX:
        raise MaltError(f"--ctx {ctx} is too small (at least {MIN_CTX})")
    if ctx is not None and ctx > MAX_CTX:  # llama.cpp's n_ctx is a uint32
        raise MaltError(f"--ctx must be at most {MAX_CTX} (got {ctx!r})")
    return ctx
