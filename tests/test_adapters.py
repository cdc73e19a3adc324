"""Per-role LoRA adapters: `--adapter` parsing, file checks, and with the real small model, a
random LoRA GGUF written with the `gguf` package that changes only its own role's turns."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest

from malt_local.db.store import Store
from malt_local.engines import EngineOptions
from malt_local.engines import make_engine as make_registered
from malt_local.engines.base import SamplingParams
from malt_local.engines.llama.adapters import (
    AdapterSpec,
    check_adapters,
    parse_adapter,
    parse_adapters,
    read_gguf_header,
)
from malt_local.errors import MaltError
from malt_local.evaluate.benchmarks import AdapterSet, adapter_set_id, load_benchmarks
from malt_local.evaluate.runner import EvalRunner
from malt_local.evaluate.settings import BASE, EvalSettings
from malt_local.prompts import PromptSet
from tests.conftest import TEST_DATA, malt

RANK = 4


def model_shapes(model: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes in GGUF order (ne0, ne1), read with the reference `gguf` reader."""
    return {t.name: tuple(int(x) for x in t.shape) for t in gguf.GGUFReader(model).tensors}


def write_lora(
    path: Path,
    shapes: dict,
    *,
    arch: str = "llama",
    general_type: str = "adapter",
    adapter_type: str | None = "lora",
    targets=("attn_q", "attn_v"),
    std: float = 0.3,
    seed: int = 0,
    extra: dict | None = None,
    rank_b: int = RANK,
) -> Path:
    """A LoRA adapter GGUF as llama.cpp reads it (llama-adapter.cpp): for each target W of
    shape [in, out], `W.lora_a` [in, rank] and `W.lora_b` [rank, out]. Random values large
    enough to change greedy outputs."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_type(general_type)
    if adapter_type is not None:
        writer.add_string("adapter.type", adapter_type)
    writer.add_float32("adapter.lora.alpha", float(RANK))
    rng = np.random.default_rng(seed)
    tensors = {}
    n_blocks = 1 + max(int(n.split(".")[1]) for n in shapes if n.startswith("blk."))
    for i in range(n_blocks):
        for t in targets:
            name = f"blk.{i}.{t}.weight"
            n_in, n_out = shapes[name]
            # numpy shapes are the reverse of GGUF's ne order.
            tensors[name + ".lora_a"] = rng.standard_normal((RANK, n_in)) * std
            tensors[name + ".lora_b"] = rng.standard_normal((n_out, rank_b)) * std
    tensors.update(extra or {})
    for name, array in tensors.items():
        writer.add_tensor(name, np.asarray(array, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def shapes(small_model) -> dict:
    return model_shapes(small_model)


@pytest.fixture(scope="module")
def lora(tmp_path_factory, shapes) -> Path:
    return write_lora(tmp_path_factory.mktemp("lora") / "lora.gguf", shapes)


@pytest.fixture(scope="module")
def lora2(tmp_path_factory, shapes) -> Path:
    """Another adapter (other targets, other values), to stack on the first."""
    return write_lora(
        tmp_path_factory.mktemp("lora2") / "lora2.gguf",
        shapes,
        targets=("attn_k", "attn_output"),
        seed=1,
    )


# --------------------------------------------------------------------------- parsing


def test_parse_adapter_role_path_and_scale():
    assert parse_adapter("generator=g.gguf") == AdapterSpec("generator", Path("g.gguf"), 1.0)
    assert parse_adapter("Refiner=out/r.gguf:0.5") == AdapterSpec(
        "refiner", Path("out/r.gguf"), 0.5
    )
    assert parse_adapter("verifier=v.gguf:0").scale == 0.0
    # A ':' that is not followed by a number is part of the path.
    assert parse_adapter("verifier=run:3b/v.gguf").path == Path("run:3b/v.gguf")
    specs = parse_adapters(["refiner=r.gguf", "generator=g.gguf", "refiner=dpo.gguf:0.2"])
    assert list(specs) == ["generator", "refiner"]
    # Several adapters for one role stack (an SFT adapter and the DPO adapter on top of it).
    assert [(a.path.name, a.scale) for a in specs["refiner"]] == [
        ("r.gguf", 1.0),
        ("dpo.gguf", 0.2),
    ]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (["critic=c.gguf"], "unknown role 'critic'"),
        (["generator"], "expected ROLE=PATH"),
        (["generator="], "expected ROLE=PATH"),
        (["generator=a.gguf:nan"], "finite"),
    ],
)
def test_parse_adapter_errors(values, message):
    with pytest.raises(MaltError, match=message):
        parse_adapters(values)


# --------------------------------------------------------------------------- file checks


def test_header_reader_agrees_with_the_gguf_package(small_model, shapes, lora):
    header = read_gguf_header(small_model)
    assert header.tensors == shapes
    assert header.string("general.architecture") == "llama"
    lh = read_gguf_header(lora)
    assert lh.string("general.type") == "adapter" and lh.string("adapter.type") == "lora"
    assert lh.metadata["adapter.lora.alpha"] == RANK


def test_a_good_adapter_is_described(small_model, lora):
    info = check_adapters({"verifier": [AdapterSpec("verifier", lora, 0.5)]}, small_model)
    (v,) = info["verifier"]
    assert (v.rank, v.alpha, v.scale, v.tensors) == (RANK, RANK, 0.5, 2 * 2 * 30)
    assert len(v.sha256) == 64 and v.record()["sha256"] == v.sha256


def bad(tmp_path, shapes, **kwargs) -> Path:
    return write_lora(tmp_path / "bad.gguf", shapes, targets=("attn_q",), **kwargs)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda t, s: t / "absent.gguf", "file not found"),
        (lambda t, s: (t / "x.gguf").write_text("hello") and t / "x.gguf", "not a GGUF file"),
        (lambda t, s: bad(t, s, general_type="model"), "is a model, not a LoRA adapter"),
        (lambda t, s: bad(t, s, adapter_type="control_vector"), "not a LoRA adapter"),
        (lambda t, s: bad(t, s, arch="qwen2"), "architecture 'qwen2', but"),
        (lambda t, s: bad(t, s, rank_b=RANK + 1), "do not fit"),
        (
            lambda t, s: bad(
                t,
                s,
                extra={
                    "blk.99.attn_q.weight.lora_a": np.zeros((4, 576)),
                    "blk.99.attn_q.weight.lora_b": np.zeros((576, 4)),
                },
            ),
            "does not exist in",
        ),
        (
            lambda t, s: bad(t, s, extra={"blk.0.attn_k.weight.lora_a": np.zeros((4, 576))}),
            "not both",
        ),
        (
            lambda t, s: bad(t, s, extra={"blk.0.attn_k.weight": np.zeros((4, 576))}),
            "not a LoRA tensor",
        ),
    ],
)
def test_bad_adapter_files_are_refused_with_a_reason(tmp_path, small_model, shapes, make, message):
    path = make(tmp_path, shapes)
    with pytest.raises(MaltError, match=message) as exc:
        check_adapters({"refiner": [AdapterSpec("refiner", path)]}, small_model)
    assert "--adapter refiner" in exc.value.message


def test_an_adapter_for_another_model_shape_is_refused(tmp_path, small_model, shapes):
    wider = {n: (s[0] * 2, s[1]) if len(s) == 2 else s for n, s in shapes.items()}
    path = write_lora(tmp_path / "wide.gguf", wider, targets=("attn_q",))
    with pytest.raises(MaltError, match="do not fit"):
        check_adapters({"generator": [AdapterSpec("generator", path)]}, small_model)


def test_cli_refuses_a_bad_adapter_before_writing_anything(tmp_path, small_model):
    questions = tmp_path / "q.jsonl"
    questions.write_text('{"question": "1+1?", "answer": "#### 2"}\n')
    db = tmp_path / "e.db"
    for value, message in (
        (f"refiner={tmp_path / 'missing.gguf'}", "file not found"),
        (f"generator={small_model}", "is a model, not a LoRA adapter"),
    ):
        r = malt(
            "eval", str(questions), "--model", str(small_model), "--db", str(db), "--adapter", value
        )
        assert r.returncode == 2 and message in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    assert not db.exists()


# --------------------------------------------------------------------------- real model


def make_engine(model, *, max_tokens: int, ctx: int | None = None, kind: str = "batched"):
    """The engine `malt eval` makes, from the registry."""
    return make_registered(kind, EngineOptions(max_tokens=max_tokens, model_path=model, ctx=ctx))


def test_adapter_on_the_context_scale_zero_and_switching_back(small_model, lora, lora2, tmp_path):
    engine = make_engine(small_model, max_tokens=12, ctx=1024, kind="simple")
    try:
        handle = engine.load_adapter(lora)
        tokens = engine.model.prompt_tokens([{"role": "user", "content": "What is 2 + 3?"}])
        params = SamplingParams(temperature=0.0, max_tokens=12)

        def text(adapters) -> str:
            engine.use_adapters(adapters)
            return engine.complete(tokens, 1, params).text

        base = text([])
        adapted = text([(handle, 1.0)])
        assert adapted != base
        # Scale 0 is the base model exactly; and after an adapted generation the same prompt
        # must not reuse KV computed under the adapter.
        assert text([(handle, 0.0)]) == base
        assert text([]) == base
        assert text([(handle, 1.0)]) == adapted
        # Two adapters on one role add up; a zero-scale one among them changes nothing.
        second = engine.load_adapter(lora2)
        assert text([(handle, 1.0), (second, 0.0)]) == adapted
        assert text([(handle, 1.0), (second, 1.0)]) not in (adapted, base)
        # A file whose header passes but whose data is cut off: llama.cpp says no.
        cut = tmp_path / "cut.gguf"
        cut.write_bytes(lora.read_bytes()[: lora.stat().st_size // 2])
        with pytest.raises(MaltError, match="could not load the LoRA adapter"):
            engine.load_adapter(cut)
    finally:
        engine.close()


def test_each_role_adapter_changes_only_its_role(tmp_path, small_model, lora):
    # One short question keeps five configurations x three turns cheap on two cores.
    path = tmp_path / "q.jsonl"
    path.write_text(
        '{"question": "Tom has 2 apples and buys 3 more. How many now?", "answer": "#### 5"}\n'
    )
    settings = EvalSettings(mode="all", votes=1, samples=1, seeds=1, max_tokens=12)
    engine = make_engine(small_model, max_tokens=12)  # the batched engine, as `malt eval`
    store = Store(tmp_path / "e.db")
    try:
        handle = engine.load_adapter(lora)

        def lora_set(role: str, scale: float) -> AdapterSet:
            records = {role: [{"sha256": "x", "scale": scale}]}
            return AdapterSet(adapter_set_id(records), records, {role: [(handle, scale)]})

        sets = {
            "base": AdapterSet(BASE),
            "refiner": lora_set("refiner", 1.0),
            "verifier": lora_set("verifier", 1.0),
            "zero": lora_set("generator", 0.0),
            "generator": lora_set("generator", 1.0),
        }
        assert len({s.id for s in sets.values()}) == len(sets)
        store.db.execute(
            "INSERT INTO eval_runs (id, created_at, model, model_sha256, temperature, top_p, "
            "top_k, max_tokens, seed, task, prompts_sha256, prompt_hashes, tool_version, config)"
            " VALUES ('etest', '', 'm', '0', 0.3, 1, 0, 12, 0, NULL, '0', '{}', '0', '{}')"
        )
        runner = EvalRunner(
            store,
            "etest",
            load_benchmarks([path], None),
            settings,
            engine,
            PromptSet(),
            list(sets.values()),
        )
        runner.execute()
        outputs: dict[str, dict] = {}
        for row in store.db.query("SELECT * FROM eval_generations"):
            outputs.setdefault(row["adapter_set"], {})[(row["question_id"], row["role"])] = (
                row["output"],
                json.loads(row["messages"]),
            )
    finally:
        store.close()
        engine.close()

    base = outputs[BASE]

    def same(name: str, role: str) -> bool:
        got = outputs[sets[name].id]
        keys = [k for k in base if k[1] == role]
        assert len(keys) == 1
        return all(got[k][0] == base[k][0] for k in keys)

    # Refiner adapter: the generator's and the verifier's turns are the base model's.
    assert same("refiner", "generator") and same("refiner", "verifier")
    assert not same("refiner", "refiner")
    # Verifier adapter: the generator untouched, the critiques changed.
    assert same("verifier", "generator") and not same("verifier", "verifier")
    # Generator adapter: its own turns change. At scale 0 nothing changes anywhere.
    assert not same("generator", "generator")
    assert all(same("zero", role) for role in ("generator", "verifier", "refiner"))


def test_cli_eval_with_an_adapter_reports_both_configurations(tmp_path, small_model, lora, lora2):
    path = tmp_path / "csqa" / "validation.jsonl"
    path.parent.mkdir()
    src = TEST_DATA / "csqa/validation.jsonl"
    path.write_text("".join(src.read_text().splitlines(keepends=True)[:6]))
    db = tmp_path / "e.db"
    r = malt(
        "eval",
        str(path),
        "--votes",
        "1",
        "--samples",
        "1",
        "--seeds",
        "1",
        "--max-tokens",
        "8",
        "--model",
        str(small_model),
        "--db",
        str(db),
        "--adapter",
        f"refiner={lora}:0.5",
        "--adapter",
        f"refiner={lora2}",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["columns"] == ["SA", "MA", "SA+LoRA", "MA+LoRA"]
    a, b = out["adapters"]["refiner"]
    assert a["scale"] == 0.5 and a["rank"] == RANK and a["path"] == str(lora)
    assert b["scale"] == 1.0 and b["path"] == str(lora2) and b["sha256"] != a["sha256"]
    # Base: G, V, R; LoRA: G, V, R generated again (the adapter set is its own configuration).
    assert out["generations_new"] == 6
    acc = out["benchmarks"][0]["accuracy"]
    assert set(acc) == set(out["columns"])
    import sqlite3

    conn = sqlite3.connect(db)
    sets = dict(conn.execute("SELECT id, adapters FROM eval_adapter_sets").fetchall())
    conn.close()
    assert set(sets) == {BASE, out["adapter_set"]}
    stored = json.loads(sets[out["adapter_set"]])["refiner"]
    assert [(r["sha256"], r["scale"]) for r in stored] == [(a["sha256"], 0.5), (b["sha256"], 1.0)]
