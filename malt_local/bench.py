"""`make bench`: the same MALT trees through the node-by-node path and the batched engine, next to
the raw decode ceiling of the same model, in one run.

    python -m malt_local.bench --model PATH [--n 3] [--questions 4] [--max-tokens 96]
                               [--parallel N] [--ctx N] [--threads N] [--gpu-layers N]
                               [--out BENCHMARKS.md]

(a) `HighLevelEngine` through `TreeRunner` on a temporary database, (b) the batched engine through
`TreeRunner` on another, (c) a plain loop of `llama_decode` with B sequences, no sampling, on a
context sized exactly like the engine's, where B is the engine's mean decode batch in (b). Every
tree has the same questions, n, seeds and a fixed length (end-of-sequence ignored), so (a) and (b)
generate the same number of tokens. Each part runs in its own process, so each peak RSS is its
own. A last part times sampling one step's logits with llama.cpp's sampler chains (one call per
sequence, as the high-level path samples) against the engine's vectorised sampler.

It prints a table with generated tokens/s, nodes/s, the ratios b/a and b/c and peak memory, and
writes it to BENCHMARKS.md with the machine it ran on. Speed goals live here, not in timed tests.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The first 200 GSM8K test rows, shipped with the tests (tests/data/README.md).
GSM8K_SLICE = ROOT / "tests" / "data" / "gsm8k" / "test.jsonl"
EXAMPLE_GSM8K = ROOT / "examples" / "gsm8k.jsonl"
TARGET_VS_SIMPLE = 1.7
TARGET_VS_CEILING = 0.85
SAMPLING_BATCHES = (27, 64)
FLASH = {"auto": None, "on": True, "off": False}
KV = {"auto": None, "unified": True, "streams": False}


def peak_rss_mib() -> float:
    """Peak resident memory of this process (Linux reports KiB, macOS bytes)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


def questions_file(k: int) -> Path:
    if GSM8K_SLICE.is_file():
        return GSM8K_SLICE
    if EXAMPLE_GSM8K.is_file() and k <= 3:
        return EXAMPLE_GSM8K
    raise SystemExit(f"bench: no GSM8K questions found ({GSM8K_SLICE} or {EXAMPLE_GSM8K})")


# -- the parts, each run in a child process ------------------------------------------------------


def run_tree_part(args: argparse.Namespace, kind: str) -> dict:
    """(a) or (b): the trees through TreeRunner on a temporary database."""
    from malt_local.batched_engine import make_engine
    from malt_local.prompts import PromptSet
    from malt_local.questions import load_questions
    from malt_local.runs import RunSpec
    from malt_local.store import Store
    from malt_local.tree import TreeRunner

    questions = load_questions(questions_file(args.questions))[: args.questions]
    engine = make_engine(
        kind,
        args.model,
        max_tokens=args.max_tokens,
        seq_ctx=3 * args.max_tokens + 2048,
        ctx=args.ctx if kind == "batched" else None,
        threads=args.threads,
        gpu_layers=args.gpu_layers,
        parallel=args.parallel if kind == "batched" else None,
        flash_attn=FLASH[args.flash_attn] if kind == "batched" else None,
        kv_unified=KV[args.kv] if kind == "batched" else None,
    )
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "bench.db")
        spec = RunSpec(
            model=str(args.model), model_sha256="bench", n=args.n, temperature=0.3, top_p=1.0,
            top_k=0, max_tokens=args.max_tokens, seed=0, theta=0.5, task=None,
            prompts_sha256="bench", prompt_hashes={}, ignore_eos=True,
        )  # fmt: skip
        store.insert_run(spec.row("bench"))
        run = store.run("bench")
        store.add_questions("bench", questions)
        runner = TreeRunner(store, run, questions, engine, PromptSet(args.prompts))
        started = time.perf_counter()
        progress = runner.execute()
        seconds = time.perf_counter() - started
        shape = sorted((r.path, r.completion_tokens) for r in store.nodes("bench"))
        store.close()
    out = {
        "kind": kind,
        "tokens": progress.completion_tokens,
        "nodes": progress.generated_nodes,
        "seconds": seconds,
        "shape": shape,
    }
    if kind == "batched":
        out["stats"] = asdict(engine.stats)  # type: ignore[attr-defined]
        out["mean_batch"] = engine.stats.mean_batch  # type: ignore[attr-defined]
        out["mean_position"] = engine.stats.mean_position  # type: ignore[attr-defined]
        out["plan"] = asdict(engine.plan)  # type: ignore[attr-defined]
    engine.close()
    out["peak_rss_mib"] = peak_rss_mib()
    return out


def ceiling_part(args: argparse.Namespace) -> dict:
    """(c): raw llama_decode with B sequences forked from one prompt, no sampling, on a context
    sized like the engine's; then one step's sampling timed both ways."""
    import llama_cpp as lib
    import numpy as np

    from malt_local.batched_engine import (
        Draw,
        TokenBatch,
        VectorSampler,
        new_context,
        plan_batch,
    )
    from malt_local.engine import SamplingParams
    from malt_local.llama_engine import LocalModel
    from malt_local.prompts import PromptSet, TreeContext
    from malt_local.questions import load_questions

    model = LocalModel(
        args.model, n_ctx=256, n_batch=64, n_threads=args.threads, n_gpu_layers=args.gpu_layers
    )
    plan = plan_batch(
        model,
        max_tokens=args.max_tokens,
        seq_limit=3 * args.max_tokens + 2048,
        parallel=args.parallel,
        ctx=args.ctx,
        flash_attn=FLASH[args.flash_attn],
        kv_unified=KV[args.kv],
    )
    ctx = new_context(model, plan)
    mem = lib.llama_get_memory(ctx)
    batch = TokenBatch(plan.n_batch, 1)
    n_vocab = model.llm.n_vocab()
    # The first question's generator prompt, so that the logits sampled below are real ones.
    question = load_questions(questions_file(args.questions))[0]
    messages = PromptSet().messages("generator", TreeContext(question))
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
            raise SystemExit(f"bench: raw decode failed ({rc}) at B={b}")

    # Decode at the depth the engine decoded at: a context of `depth` tokens, then max_tokens
    # steps, so the mean position of the decoded tokens is the engine's.
    depth = max(1, round(args.position - args.max_tokens / 2))
    context = np.resize(prompt, depth)
    b = max(1, min(plan.n_seq_max, round(args.batch)))
    tokens, seconds = 0, 0.0
    while seconds < args.ceiling_seconds:
        fork(b, context)
        step(b, depth)  # warm-up, not timed
        lib.llama_synchronize(ctx)
        t0 = time.perf_counter()
        for i in range(1, args.max_tokens):
            step(b, depth + i)
        lib.llama_synchronize(ctx)
        seconds += time.perf_counter() - t0
        tokens += b * (args.max_tokens - 1)

    sampling = []
    vec = VectorSampler(model.eog_ids, min(8, os.cpu_count() or 1) if plan.offload else 1)
    params = SamplingParams(temperature=0.3)
    for sb in [x for x in SAMPLING_BATCHES if x <= plan.n_seq_max]:
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
        "peak_rss_mib": peak_rss_mib(),
    }


# -- orchestration -------------------------------------------------------------------------------


def busy_cpu_seconds() -> float | None:
    """CPU seconds the whole machine has spent busy since boot (None without /proc/stat)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def child(args: argparse.Namespace, part: str, **extra) -> dict:
    """Run one part in its own process; also measure how busy the rest of the machine was.

    On a shared machine another process's threads make llama.cpp's spinning threads wait, and
    a part can slow down many times over: `other_load` (other processes' CPU use during the
    part, in cores) says whether a figure can be trusted.
    """
    argv = [sys.executable, "-m", "malt_local.bench", "--part", part, *args.passthrough]
    for key, value in extra.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    print(f"bench: running {part} ...", file=sys.stderr, flush=True)
    busy0, own0 = busy_cpu_seconds(), resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    r = subprocess.run(argv, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    busy1, own1 = busy_cpu_seconds(), resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0:
        sys.stderr.write(r.stderr[-4000:])
        raise SystemExit(f"bench: part {part} failed (exit {r.returncode})")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    own = (own1.ru_utime + own1.ru_stime) - (own0.ru_utime + own0.ru_stime)
    out["other_load"] = (
        max(0.0, (busy1 - busy0 - own) / wall) if busy0 is not None and busy1 is not None else None
    )
    return out


def machine() -> dict:
    import llama_cpp

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        from importlib.metadata import version

        lcp = version("llama-cpp-python")
    except Exception:
        lcp = getattr(llama_cpp, "__version__", "?")
    return {
        "cpu": cpu,
        "cores": cores,
        "python": platform.python_version(),
        "llama_cpp_python": lcp,
        "gpu_offload": bool(llama_cpp.llama_supports_gpu_offload()),
    }


def report(args: argparse.Namespace, a: dict, b: dict, c: dict, info: dict) -> str:
    """The markdown written to BENCHMARKS.md (also what the terminal table shows)."""
    tps = {k: r["tokens"] / r["seconds"] for k, r in (("a", a), ("b", b), ("c", c))}
    ba, bc = tps["b"] / tps["a"], tps["b"] / tps["c"]
    plan, stats = b["plan"], b["stats"]
    row_rate = (b["tokens"] + stats["prefill_tokens"]) / b["seconds"]
    model = Path(args.model)
    size = model.stat().st_size / 2**20 if model.exists() else 0
    offload = "yes" if plan["offload"] else "no (CPU)"
    layout = (
        "one unified cache"
        if plan["kv_unified"]
        else f"a stream for each of {plan['n_seq_max']} sequences"
    )
    lines = [
        "# Benchmarks",
        "",
        "Written by `make bench` (`python -m malt_local.bench`); rerun it to refresh. Figures from "
        "one run on one machine: compare the ratios, which are taken in the same run.",
        "",
        f"- date: {_dt.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- machine: {info['cpu']}, {info['cores']} cores; GPU offload: {offload}",
        f"- llama-cpp-python {info['llama_cpp_python']}, Python {info['python']}",
        f"- model: `{model.name}` ({size:.0f} MiB)",
        f"- command: `{' '.join(args.command)}`",
        f"- tree: {args.questions} GSM8K questions, n = {args.n} "
        f"({args.n + args.n**2 + args.n**3} nodes each), {args.max_tokens} tokens per node "
        "(end-of-sequence ignored), temperature 0.3, the same seeds on both paths",
        f"- engine: parallel {plan['parallel']}, {plan['n_ctx']} KV cells "
        f"({layout}), "
        f"n_batch {plan['n_batch']}, n_ubatch {plan['n_ubatch']}, {plan['threads']} threads, "
        f"flash attention {'on' if plan['flash_attn'] else 'off'}",
        "",
        "| path | generated tokens | seconds | tokens/s | nodes/s | peak RSS (MiB) "
        "| other load (cores) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    rows = (
        ("(a) high-level API, node by node", a, a["nodes"]),
        ("(b) batched tree engine", b, b["nodes"]),
        (f"(c) raw `llama_decode` ceiling, B = {c['batch']}, depth {c['depth']}+", c, None),
    )
    for name, r, nodes in rows:
        nps = f"{nodes / r['seconds']:.2f}" if nodes else "—"
        load = "?" if r.get("other_load") is None else f"{r['other_load']:.2f}"
        lines.append(
            f"| {name} | {r['tokens']} | {r['seconds']:.1f} | {r['tokens'] / r['seconds']:.1f} "
            f"| {nps} | {r['peak_rss_mib']:.0f} | {load} |"
        )
    ok_a = "met" if ba >= TARGET_VS_SIMPLE else "NOT met"
    ok_c = "met" if bc >= TARGET_VS_CEILING else "NOT met"
    busiest = max((r.get("other_load") or 0.0) for r in (a, b, c))
    if busiest > 0.1 * info["cores"]:
        lines += [
            "",
            f"**Warning:** other processes used up to {busiest:.2f} cores during this run; "
            "llama.cpp's threads slow down badly when they share cores. Rerun on a quiet machine.",
        ]
    lines += [
        "",
        f"- **b/a = {ba:.2f}×** (target ≥ {TARGET_VS_SIMPLE}×: {ok_a})",
        f"- **b/c = {bc:.0%}** of the raw ceiling (target ≥ {TARGET_VS_CEILING:.0%}: {ok_c})",
        f"- (c) decodes B sequences, no sampling, on a context built like the engine's, at the "
        f"engine's mean batch and at its mean depth (a {c['depth']}-token context, then "
        f"{args.max_tokens} steps: the average generated token of (b) sat at position "
        f"{b['mean_position']:.0f})",
        f"- engine: mean decode batch {b['mean_batch']:.1f}, peak {stats['peak_live']} sequences, "
        f"{stats['steps']} steps ({stats['id_runs'] / max(1, stats['steps']):.2f} runs of "
        "consecutive sequence ids per step: with a KV stream per sequence, the micro-batches; "
        f"{stats['moves']} sequences moved to keep them in one run); "
        f"prompts {stats['prompt_tokens']} tokens, of which "
        f"{stats['reused_tokens']} reused from a parent's cache and {stats['prefill_tokens']} "
        f"prefilled; {stats['cache_full']} cache-full recoveries; "
        f"{stats['decode_seconds']:.1f} s in llama_decode, "
        f"{stats['sample_seconds']:.1f} s sampling",
        f"- prompts are work too: besides its {b['tokens']} generated tokens, (b) read "
        f"{stats['prefill_tokens']} prompt tokens that (c) has none of; counting both, (b) "
        f"evaluated {row_rate:.1f} tokens/s, {row_rate / tps['c']:.0%} of (c)",
        "",
        f"Sampling one step's logits ({c['n_vocab']}-token vocabulary, temperature 0.3), "
        "ms per step:",
        "",
        "| sequences | llama.cpp chains, one call per sequence | vectorised (engine) |",
        "| ---: | ---: | ---: |",
    ]
    for s in c["sampling"]:
        lines.append(f"| {s['batch']} | {s['chains_ms']:.1f} | {s['vector_ms']:.1f} |")
    if not plan["offload"]:
        lines += [
            "",
            "GPU: not measured on this machine. `make bench` runs unchanged on a CUDA build "
            "(all layers offloaded by default, n_ubatch "
            "1024, parallel 256).",
        ]
    return "\n".join(lines) + "\n"


# Hand-written measurements below this line (e.g. prompt tokens saved by a template change,
# measured with `--part batched --prompts DIR`) survive a rerun of the benchmark.
KEEP_MARKER = "<!-- notes below are kept when make bench rewrites this file -->"


def kept_notes(path: Path) -> str:
    """The part of an existing report from KEEP_MARKER on, or nothing."""
    if not path.is_file():
        return ""
    text = path.read_text()
    at = text.find(KEEP_MARKER)
    return "\n" + text[at:] if at >= 0 else ""


def print_table(md: str) -> None:
    from rich.console import Console
    from rich.markdown import Markdown

    Console().print(Markdown(md))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m malt_local.bench", description=__doc__.split("\n")[0]
    )
    p.add_argument("--model", required=True, type=Path, help="GGUF file")
    p.add_argument("--n", type=int, default=3)
    p.add_argument("--questions", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--parallel", type=int, default=None)
    p.add_argument("--ctx", type=int, default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--gpu-layers", type=int, default=None)
    p.add_argument("--flash-attn", choices=tuple(FLASH), default="auto", help="[auto: on]")
    p.add_argument("--kv", choices=tuple(KV), default="auto", help="[auto: unified]")
    p.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    p.add_argument("--prompts", type=Path, default=None, help="templates folder [the default]")
    p.add_argument("--ceiling-seconds", type=float, default=10.0)
    p.add_argument("--part", choices=("simple", "batched", "ceiling"), help=argparse.SUPPRESS)
    p.add_argument("--batch", type=float, default=0, help=argparse.SUPPRESS)
    p.add_argument("--position", type=float, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    given = sys.argv[1:] if argv is None else argv
    args.command = ["python", "-m", "malt_local.bench", *given]
    args.passthrough = [
        x
        for key in ("model", "n", "questions", "max_tokens", "parallel", "ctx", "threads",
                    "gpu_layers", "ceiling_seconds", "flash_attn", "kv", "prompts")
        if getattr(args, key) is not None
        for x in (f"--{key.replace('_', '-')}", str(getattr(args, key)))
    ]  # fmt: skip
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.part:
        out = ceiling_part(args) if args.part == "ceiling" else run_tree_part(args, args.part)
        print(json.dumps(out))
        return 0
    if not args.model.is_file():
        raise SystemExit(f"bench: model not found: {args.model}")
    a = child(args, "simple")
    b = child(args, "batched")
    if a["shape"] != b["shape"]:
        raise SystemExit("bench: the two paths built different trees")
    c = child(args, "ceiling", batch=f"{b['mean_batch']:.2f}", position=f"{b['mean_position']:.1f}")
    md = report(args, a, b, c, machine())
    print_table(md)
    args.out.write_text(md + kept_notes(args.out))
    print(f"bench: wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
