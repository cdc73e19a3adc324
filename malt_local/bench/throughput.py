"""`make bench`: the same MALT trees through the node-by-node path, the batched engine and
llama.cpp's own llama-server, next to the raw decode ceiling of the same model, in one run.

    python -m malt_local.bench --model PATH [--n 3] [--questions 4] [--max-tokens 96]
                               [--parallel N] [--ctx N] [--threads N] [--gpu-layers N]
                               [--out BENCHMARKS.md]

(a) `HighLevelEngine` through `TreeRunner` on a temporary database, (b) the batched engine through
`TreeRunner` on another, (c) a plain loop of `llama_decode` with B sequences, no sampling, on a
context sized exactly like the engine's, where B is the engine's mean decode batch in (b), (d)
`--engine openai` through `TreeRunner` against `llama-server` (`make llama-server`) started on
127.0.0.1 with as many parallel slots as the engine's `--parallel`. Every tree has the same
questions, n, seeds and a fixed length (end-of-sequence ignored), so (a), (b) and (d) generate
the same number of tokens. Each part runs in its own process, so each peak RSS is its
own. A last part times sampling one step's logits with llama.cpp's sampler chains (one call per
sequence, as the high-level path samples) against the engine's vectorised sampler. (e) is (b)
with a LoRA adapter on every role (`malt run --adapters`): random rank-8 adapters on the
attention's q and v, built role by role in waves, so e/b is what the adapters cost.

It prints a table with generated tokens/s, nodes/s, the ratios b/a, b/c and b/d, the requests
llama-server had in flight per step, and peak memory, and
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

ROOT = Path(__file__).resolve().parents[2]  # the checkout: malt_local/bench/ is two below
# The first 200 GSM8K test rows, shipped with the tests (tests/data/README.md).
GSM8K_SLICE = ROOT / "tests" / "data" / "gsm8k" / "test.jsonl"
EXAMPLE_GSM8K = ROOT / "examples" / "gsm8k.jsonl"
TARGET_VS_SIMPLE = 1.7
TARGET_VS_CEILING = 0.85
TARGET_VS_SERVER = 2.0
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


def execute_tree(args: argparse.Namespace, engine, role_adapters: dict | None = None) -> dict:
    """The bench's trees through TreeRunner and `engine` on a temporary database: the same
    questions, n, seeds and fixed node length whichever engine generates."""
    from malt_local.db.store import Store
    from malt_local.prompts import PromptSet
    from malt_local.questions.loading import load_questions
    from malt_local.run.settings import Run, RunSpec
    from malt_local.run.tree import TreeRunner

    questions = load_questions(questions_file(args.questions))[: args.questions]
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "bench.db")
        spec = RunSpec(
            model=str(args.model), model_sha256="bench", n=args.n, temperature=0.3, top_p=1.0,
            top_k=0, max_tokens=args.max_tokens, seed=0, theta=0.5, task=None,
            prompts_sha256="bench", prompt_hashes={}, ignore_eos=True,
        )  # fmt: skip
        store.insert_run(spec.row("bench"))
        store.add_questions("bench", questions)
        runner = TreeRunner(
            store,
            Run("bench", spec),
            questions,
            engine,
            PromptSet(args.prompts),
            role_adapters=role_adapters,
        )
        started = time.perf_counter()
        progress = runner.execute()
        seconds = time.perf_counter() - started
        shape = sorted((r.path, r.completion_tokens) for r in store.nodes("bench"))
        store.close()
    return {
        "tokens": progress.completion_tokens,
        "nodes": progress.generated,
        "seconds": seconds,
        "shape": shape,
    }


def write_random_lora(path: Path, model: Path, *, seed: int, rank: int = 8) -> Path:
    """A LoRA adapter GGUF for `model` on every block's attn_q and attn_v, random values: what an
    adapter costs does not depend on what it learnt."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(model)
    arch = str(bytes(reader.fields["general.architecture"].parts[-1]), "utf-8")
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_type("adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", float(rank))
    rng = np.random.default_rng(seed)
    for t in reader.tensors:
        if t.name.endswith((".attn_q.weight", ".attn_v.weight")):
            n_in, n_out = (int(x) for x in t.shape[:2])
            a = rng.standard_normal((rank, n_in)) * 0.01  # numpy order is GGUF's reversed
            writer.add_tensor(t.name + ".lora_a", a.astype(np.float32))
            writer.add_tensor(t.name + ".lora_b", np.zeros((n_out, rank), np.float32) + 0.01)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def run_tree_part(args: argparse.Namespace, kind: str) -> dict:
    """(a), (b) or (e): the trees through TreeRunner on a temporary database."""
    from malt_local.engines import EngineOptions, make_engine
    from malt_local.roles import ROLES

    adapters = kind == "adapters"
    kind = "batched" if adapters else kind
    batched = kind == "batched"
    engine = make_engine(
        kind,
        EngineOptions(
            model_path=Path(args.model),
            max_tokens=args.max_tokens,
            ctx=args.ctx if batched else None,
            threads=args.threads,
            gpu_layers=args.gpu_layers,
            parallel=args.parallel if batched else None,
            flash_attn=FLASH[args.flash_attn] if batched else None,
            kv_unified=KV[args.kv] if batched else None,
        ),
    )
    role_adapters = None
    with tempfile.TemporaryDirectory() as tmp:
        if adapters:
            role_adapters = {}
            for i, role in enumerate(ROLES):
                path = write_random_lora(Path(tmp) / f"{role}.gguf", Path(args.model), seed=i)
                role_adapters[role] = [(engine.load_adapter(path), 1.0)]  # type: ignore[attr-defined]
        out = {"kind": "adapters" if adapters else kind}
        out.update(execute_tree(args, engine, role_adapters))
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
    from malt_local.engines.llama.ceiling import measure_ceiling
    from malt_local.prompts import PromptSet, TreeContext
    from malt_local.questions.loading import load_questions

    # The first question's generator prompt, so that the logits sampled are real ones.
    question = load_questions(questions_file(args.questions))[0]
    out = measure_ceiling(
        args.model,
        PromptSet().messages("generator", TreeContext(question)),
        max_tokens=args.max_tokens,
        position=args.position,
        batch_size=args.batch,
        seconds_wanted=args.ceiling_seconds,
        sampling_batches=SAMPLING_BATCHES,
        parallel=args.parallel,
        ctx=args.ctx,
        threads=args.threads,
        gpu_layers=args.gpu_layers,
        flash_attn=FLASH[args.flash_attn],
        kv_unified=KV[args.kv],
    )
    out["peak_rss_mib"] = peak_rss_mib()
    return out


def server_part(args: argparse.Namespace) -> dict:
    """(d): the same trees through `--engine openai` against llama.cpp's own llama-server on this
    machine, set up like the engine in (b): as many parallel slots as its `--parallel`, each
    with the cells of one of its sequences, the same KV layout, flash attention and threads.
    The server's own counters give the sequences it had in flight per `llama_decode`."""
    from malt_local.bench.llama_server import LlamaServer
    from malt_local.engines import EngineOptions, make_engine
    from malt_local.engines.openai.settings import OpenAISettings

    server = LlamaServer(
        args.model,
        slots=args.slots,
        ctx_per_slot=args.slot_ctx,
        threads=args.server_threads,
        unified_kv=bool(args.server_kvu),
        flash_attn=bool(args.server_fa),
        extra=["--n-gpu-layers", str(args.gpu_layers)] if args.gpu_layers is not None else [],
    )
    with server:
        (model,) = [m["id"] for m in server.get("/v1/models")["data"]]  # type: ignore[index]
        settings = OpenAISettings(endpoints=(server.url,), model=model)
        engine = make_engine("openai", EngineOptions(max_tokens=args.max_tokens, remote=settings))
        try:
            out = {"kind": "server", **execute_tree(args, engine)}
            out["slots"] = engine.endpoints[0].slots  # type: ignore[attr-defined]
            out["slot_ctx"] = args.slot_ctx
            out["server_n"] = engine.endpoints[0].server_n  # type: ignore[attr-defined]
        finally:
            engine.close()
        m = server.metrics()
        out["server_peak_rss_mib"] = server.peak_rss_mib()
    # The server's own count of generated tokens is (d)'s figure; what malt stored per node is
    # kept next to it, so a client that books tokens wrongly shows up in the report.
    out["stored_tokens"], out["tokens"] = out["tokens"], int(m["llamacpp:tokens_predicted_total"])
    out["busy_per_decode"] = m["llamacpp:n_busy_slots_per_decode"]
    out["decodes"] = int(m["llamacpp:n_decode_total"])
    out["prompt_tokens"] = int(m["llamacpp:prompt_tokens_total"])
    out["cached_tokens"] = int(m.get("llamacpp:prompt_tokens_cached_total", 0))
    out["peak_rss_mib"] = peak_rss_mib()
    return out


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
    from malt_local.engines.llama.ceiling import backend_info

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
    info = backend_info()
    return {
        "cpu": cpu,
        "cores": cores,
        "python": platform.python_version(),
        "llama_cpp_python": info["llama_cpp_python"],
        "gpu_offload": info["gpu_offload"],
    }


def report(
    args: argparse.Namespace, a: dict, b: dict, c: dict, d: dict, e: dict, info: dict
) -> str:
    """The markdown written to BENCHMARKS.md (also what the terminal table shows)."""
    tps = {
        k: r["tokens"] / r["seconds"] for k, r in (("a", a), ("b", b), ("c", c), ("d", d), ("e", e))
    }
    ba, bc, bd = tps["b"] / tps["a"], tps["b"] / tps["c"], tps["b"] / tps["d"]
    eb = tps["e"] / tps["b"]
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
        "(end-of-sequence ignored), temperature 0.3, the same seeds on every path",
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
        (f"(d) `--engine openai` → llama-server, {d['slots']} slots", d, d["nodes"]),
        ("(e) batched, a LoRA adapter on every role (role by role)", e, e["nodes"]),
    )
    for name, r, nodes in rows:
        nps = f"{nodes / r['seconds']:.2f}" if nodes else "—"
        load = "?" if r.get("other_load") is None else f"{r['other_load']:.2f}"
        lines.append(
            f"| {name} | {r['tokens']} | {r['seconds']:.1f} | {r['tokens'] / r['seconds']:.1f} "
            f"| {nps} | {r.get('server_peak_rss_mib') or r['peak_rss_mib']:.0f} | {load} |"
        )
    ok_a = "met" if ba >= TARGET_VS_SIMPLE else "NOT met"
    ok_c = "met" if bc >= TARGET_VS_CEILING else "NOT met"
    ok_d = "met" if bd >= TARGET_VS_SERVER else "NOT met"
    busiest = max((r.get("other_load") or 0.0) for r in (a, b, c, d, e))
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
        f"- **b/d = {bd:.2f}×** llama-server on the same tree (goal on a CPU ≥ "
        f"{TARGET_VS_SERVER}×: {ok_d})",
        f"- **e/b = {eb:.2f}×**: the same tree with a LoRA adapter on every role (rank 8 on q and "
        "v, `malt run --adapters`): built role by role in waves, so no child reuses its parent's "
        f"cache ({e['stats']['reused_tokens']} prompt tokens reused, against "
        f"{stats['reused_tokens']} in (b)) and each step also computes the adapters' low-rank "
        "products",
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
        f"- (d): llama.cpp's own `llama-server`, built from the same llama.cpp "
        f"(`make llama-server`), {d['slots']} parallel slots of {d['slot_ctx']} cells "
        f"({'one unified cache' if plan['kv_unified'] else 'a KV stream each'}), "
        f"{plan['threads']} threads, flash attention {'on' if plan['flash_attn'] else 'off'}; "
        f"malt's client sends a node's children as one request "
        f"{'with n' if d['server_n'] else 'each'}, up to {d['slots']} sequences in flight; "
        f"**{d['busy_per_decode']:.1f} requests in flight per step** (the server's mean of busy "
        f"slots per `llama_decode`, over {d['decodes']} calls); prompts: "
        f"{d['prompt_tokens']} tokens processed, {d['cached_tokens']} reused from a slot's "
        "cache; peak RSS is the server's"
        + (
            ""
            if d["stored_tokens"] == d["tokens"]
            else f" (**malt stored {d['stored_tokens']} completion tokens for these nodes**, "
            "not the server's count: requests were retried, or the client books tokens wrongly)"
        ),
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
    print(md)  # Markdown reads as it is; the bench needs no terminal UI


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
    p.add_argument("--prompts", type=Path, default=None, help="templates folder or set [default]")
    p.add_argument("--ceiling-seconds", type=float, default=10.0)
    p.add_argument(
        "--part",
        choices=("simple", "batched", "ceiling", "server", "adapters"),
        help=argparse.SUPPRESS,
    )
    p.add_argument("--batch", type=float, default=0, help=argparse.SUPPRESS)
    p.add_argument("--position", type=float, default=0, help=argparse.SUPPRESS)
    for hidden in ("--slots", "--slot-ctx", "--server-threads", "--server-kvu", "--server-fa"):
        p.add_argument(hidden, type=int, default=0, help=argparse.SUPPRESS)
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
        parts = {"ceiling": ceiling_part, "server": server_part}
        out = parts[args.part](args) if args.part in parts else run_tree_part(args, args.part)
        print(json.dumps(out))
        return 0
    if not args.model.is_file():
        raise SystemExit(f"bench: model not found: {args.model}")
    a = child(args, "simple")
    b = child(args, "batched")
    if a["shape"] != b["shape"]:
        raise SystemExit("bench: the two paths built different trees")
    c = child(args, "ceiling", batch=f"{b['mean_batch']:.2f}", position=f"{b['mean_position']:.1f}")
    plan = b["plan"]
    d = child(
        args, "server", slots=plan["parallel"], slot_ctx=plan["seq_limit"],
        server_threads=plan["threads"], server_kvu=int(plan["kv_unified"]),
        server_fa=int(plan["flash_attn"]),
    )  # fmt: skip
    # The tree is what malt stored; the server's own counter also holds the tokens of a request
    # that was retried (a read timed out on a loaded machine), which the report points out.
    same_paths = [p for p, _ in d["shape"]] == [p for p, _ in b["shape"]]
    if not same_paths or d["stored_tokens"] != b["tokens"]:
        raise SystemExit("bench: llama-server built a different tree")
    e = child(args, "adapters")
    if [p for p, _ in e["shape"]] != [p for p, _ in b["shape"]] or e["tokens"] != b["tokens"]:
        raise SystemExit("bench: the adapters' tree has another shape")
    md = report(args, a, b, c, d, e, machine())
    print_table(md)
    args.out.write_text(md + kept_notes(args.out))
    print(f"bench: wrote {args.out}", file=sys.stderr)
    return 0
