"""`malt train`: the GGUF LoRA conversion, bad input, and real training on the small model.

The real tests share trained outputs through module fixtures (few steps, short rows), so the
whole file costs a few minutes on two cores:

* `loop`: `malt pull --file` -> `malt run` (examples/sums.jsonl, which the small model gets
  partly right, so every role has positives and pairs) -> `malt export` -> `malt train --role
  all` (every role and stage, the base found from the export's model sha256) -> `malt eval
  --adapters`. This is the whole MALT loop, offline; `make loop` runs the same commands.
* `memorised`: the generator's SFT adapter trained several epochs on its positives: the loss
  falls, llama.cpp's greedy text with the GGUF LoRA equals transformers + PEFT's, and it is the
  uninterrupted reference for the SIGINT and SIGKILL tests.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from malt_local.cli import cli
from malt_local.errors import MaltError
from malt_local.training.data import load_export
from malt_local.training.gguf_lora import BaseShape, gguf_tensors, rope_permute
from malt_local.training.manifest import adapter_values, apply_order
from malt_local.training.pipeline import plan_stages
from tests.conftest import EXAMPLES, malt

ROLES = ("generator", "verifier", "refiner")
# Few steps and short rows: enough to change the model, cheap on two cores.
SUMS = EXAMPLES / "sums.jsonl"
QUICK = ["--batch-size", "2", "--max-length", "512", "--lora-dropout", "0"]


# --------------------------------------------------------------------------- helpers


def chat(q: str) -> list[dict]:
    return [{"role": "system", "content": "Solve it."}, {"role": "user", "content": q}]


def make_export(
    folder: Path, sft: dict, dpo: dict, sha: str | None = "0" * 64, sources: list | None = None
) -> Path:
    """A small export folder in `malt export`'s layout, written by hand (`sha` None: no model
    named, so `--base` is not checked against one and says nothing about it)."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for role in ROLES:
        for kind, rows in (("sft", sft.get(role, [])), ("dpo", dpo.get(role, []))):
            name = f"{role}.{kind}.jsonl"
            text = "".join(json.dumps(r) + "\n" for r in rows)
            (folder / name).write_text(text, encoding="utf-8")
            files[name] = {"lines": len(rows), "sha256": hashlib.sha256(text.encode()).hexdigest()}
    manifest = {
        "tool": "malt",
        "roles": list(ROLES),
        "files": files,
        "models": [{"file": "m.gguf", "sha256": sha, "alias": None}] if sha else [],
        "sources": sources or [],
    }
    (folder / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    return folder


def sft_row(q: str, a: str) -> dict:
    return {"messages": [*chat(q), {"role": "assistant", "content": a}]}


def dpo_row(q: str) -> dict:
    return {
        "prompt": chat(q),
        "chosen": [{"role": "assistant", "content": "4"}],
        "rejected": [{"role": "assistant", "content": "5"}],
    }


def small_export(tmp_path: Path, **kw) -> Path:
    sft = {r: [sft_row("2+2?", "4")] for r in ROLES}
    dpo = {r: [dpo_row("2+2?")] for r in ROLES}
    sft.update(kw.get("sft", {}))
    dpo.update(kw.get("dpo", {}))
    return make_export(tmp_path / "export", sft, dpo, kw.get("sha", "0" * 64), kw.get("sources"))


def cli_train(*args: str):
    return CliRunner().invoke(cli, ["train", *args])


def one_line_exit_2(result, fragment: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert fragment in lines[0], lines[0]


def load_adapter(folder: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


# --------------------------------------------------------------------------- conversion


def test_rope_permutation_is_llamas_interleaving():
    """Row r of head h, half k, index i (HF layout: two halves) lands at h, i, k (pairs)."""
    n_head, head_dim = 3, 8
    rows = np.arange(n_head * head_dim, dtype=np.float32)[:, None] * np.ones((1, 2))
    out = rope_permute(rows, n_head)
    half = head_dim // 2
    for h in range(n_head):
        for k in range(2):
            for i in range(half):
                assert out[h * head_dim + 2 * i + k, 0] == h * head_dim + k * half + i


def test_peft_names_map_to_llama_cpp_tensors_and_only_q_k_b_are_permuted():
    shape = BaseShape("llama", n_head=2, n_head_kv=1)
    rng = np.random.default_rng(0)
    w: dict[str, np.ndarray] = {}
    for mod, out_dim in (("self_attn.q_proj", 8), ("self_attn.k_proj", 4), ("mlp.up_proj", 6)):
        w[f"base_model.model.model.layers.3.{mod}.lora_A.weight"] = rng.standard_normal(
            (2, 5), dtype=np.float32
        )
        w[f"base_model.model.model.layers.3.{mod}.lora_B.weight"] = rng.standard_normal(
            (out_dim, 2), dtype=np.float32
        )
    got = gguf_tensors(w, shape)
    assert sorted(got) == sorted(
        f"blk.3.{t}.weight.lora_{ab}" for t in ("attn_q", "attn_k", "ffn_up") for ab in "ab"
    )
    key = "base_model.model.model.layers.3.{}.lora_{}.weight"
    np.testing.assert_array_equal(
        got["blk.3.attn_q.weight.lora_a"], w[key.format("self_attn.q_proj", "A")]
    )
    np.testing.assert_array_equal(
        got["blk.3.attn_q.weight.lora_b"], rope_permute(w[key.format("self_attn.q_proj", "B")], 2)
    )
    np.testing.assert_array_equal(
        got["blk.3.attn_k.weight.lora_b"], rope_permute(w[key.format("self_attn.k_proj", "B")], 1)
    )
    np.testing.assert_array_equal(
        got["blk.3.ffn_up.weight.lora_b"], w[key.format("mlp.up_proj", "B")]
    )
    # Qwen2 has no permutation.
    plain = gguf_tensors(w, BaseShape("qwen2", 2, 1))
    np.testing.assert_array_equal(
        plain["blk.3.attn_q.weight.lora_b"], w[key.format("self_attn.q_proj", "B")]
    )
    with pytest.raises(MaltError, match="no llama.cpp counterpart"):
        gguf_tensors({"base_model.model.lm_head.lora_A.weight": np.zeros((2, 2))}, shape)
    with pytest.raises(MaltError, match="not supported"):
        BaseShape.from_config({"model_type": "gemma", "num_attention_heads": 8})


# --------------------------------------------------------------------------- bad input


def test_missing_extra_is_one_line(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "trl" else real(name, *a)
    )
    one_line_exit_2(cli_train(str(small_export(tmp_path))), "pip install 'malt-local[train]'")


def test_not_an_export_and_missing_folder(tmp_path):
    (tmp_path / "notexport").mkdir()
    one_line_exit_2(cli_train(str(tmp_path / "notexport")), "is not a malt export")
    one_line_exit_2(cli_train(str(tmp_path / "nope")), "export folder not found")


def test_role_without_sft_lines_and_edited_file(tmp_path):
    export = small_export(tmp_path, sft={"verifier": []})
    out = tmp_path / "adapters"
    # Named explicitly, a role with no data is an error (--role all skips it, below).
    one_line_exit_2(
        cli_train(str(export), "--role", "verifier", "--out", str(out)), "verifier.sft.jsonl"
    )
    assert not out.exists() and not (tmp_path / "adapters.partial").exists()
    (export / "generator.sft.jsonl").write_text(json.dumps(sft_row("1+1?", "3")) + "\n")
    one_line_exit_2(
        cli_train(str(export), "--role", "generator", "--out", str(out)), "changed after the export"
    )


def hf_base(tmp_path: Path) -> Path:
    """A Hugging Face model folder that passes `--base`'s checks (no weights: nothing may load)."""
    hf = tmp_path / "hf"
    hf.mkdir(exist_ok=True)
    (hf / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 49152}))
    return hf


def test_role_all_trains_the_roles_with_data_and_names_the_skipped(tmp_path):
    from malt_local.training.base_model import Base
    from malt_local.training.pipeline import _base_identity, _manifest
    from malt_local.training.settings import TrainSettings, fingerprint

    export = small_export(tmp_path, sft={"verifier": []}, sha=None)
    data = load_export(export, list(ROLES), ["sft", "dpo"], skip_empty=True)
    assert list(data.skipped) == ["verifier"]
    assert "no verifier positives" in data.skipped["verifier"]
    assert "1 DPO pair(s)" in data.skipped["verifier"]
    plan = plan_stages(data, ["generator", "refiner"], "all", None, False)
    assert [s.name for s in plan.stages] == ["generator-sft", "refiner-sft", "refiner-dpo"]
    # The manifest records the skipped role.
    m = _manifest(None, "x", data, Base(export, "hf", None, "llama", None), TrainSettings(),
                  "cpu", plan, {}, tmp_path, 0.0)  # fmt: skip
    assert list(m["skipped_roles"]) == ["verifier"]
    # Through the CLI: OUT already holds every stage the roles with data have, so nothing
    # trains (nor loads); the skipped role is named in one line and the command succeeds.
    base = hf_base(tmp_path)
    ident = fingerprint(
        data.manifest_sha256,
        _base_identity(Base(base, "hf", None, "llama", None)),
        TrainSettings().record(),
    )
    out = tmp_path / "adapters"
    out.mkdir()
    adapters = {n: {"role": n.split("-")[0], "gguf": f"{n}.gguf", "steps": 1, "loss": []}
                for n in ("generator-sft", "refiner-sft", "refiner-dpo")}  # fmt: skip
    (out / "manifest.json").write_text(
        json.dumps({"tool": "malt-train", "fingerprint": ident, "adapters": adapters})
    )
    r = cli_train(str(export), "--base", str(base), "--out", str(out))
    assert r.exit_code == 0, r.output
    assert "roles skipped (no data): verifier" in r.stderr.splitlines()
    assert "refiner-dpo: already trained" in r.stderr
    # --stage dpo for all roles: the generator has no pairs, so it is left out, not an error.
    empty_gen = small_export(tmp_path / "g", dpo={"generator": []}, sha=None)
    d = load_export(empty_gen, list(ROLES), ["sft", "dpo"], skip_empty=True)
    p = plan_stages(d, list(ROLES), "dpo", None, False, skip_empty=True)
    assert [s.name for s in p.stages] == ["verifier-dpo", "refiner-dpo"]
    assert "generator-dpo" in p.skipped
    # Every role empty: one line, exit 2, nothing written.
    none = small_export(tmp_path / "none", sft={r: [] for r in ROLES}, sha=None)
    out2 = tmp_path / "adapters2"
    one_line_exit_2(cli_train(str(none), "--out", str(out2)), "no role has SFT lines")
    assert not out2.exists() and not (tmp_path / "adapters2.partial").exists()


@pytest.fixture(scope="module")
def tokenizer_base(tmp_path_factory, small_model) -> Path:
    """A Hugging Face folder with the small model's tokenizer and chat template but no weights:
    the rows can be measured, nothing can train (a test that reached training would fail)."""
    from transformers import AutoTokenizer

    folder = hf_base(tmp_path_factory.mktemp("tokenizer_base"))
    tok = AutoTokenizer.from_pretrained(str(small_model.parent), gguf_file=small_model.name)
    tok.save_pretrained(str(folder))
    return folder


def test_rows_longer_than_max_length_are_counted_and_too_many_refused(tmp_path, tokenizer_base):
    from transformers import AutoTokenizer
    from trl.data_utils import _tokenize

    from malt_local.training.lengths import measure, row_length

    long_answer = " ".join(["7"] * 200)
    sft = [sft_row(f"{i}+{i}?", str(2 * i)) for i in range(8)]
    sft += [sft_row("9+9?", long_answer), sft_row("8+8?", long_answer)]
    export = small_export(tmp_path, sft={"generator": sft}, sha=None)
    tok = AutoTokenizer.from_pretrained(str(tokenizer_base))
    rows = load_export(export, ["generator"], ["sft"]).sft["generator"]
    # Counted as TRL tokenizes a conversational prompt/completion row.
    expected = [len(_tokenize(tok, r["prompt"] + r["completion"])["input_ids"]) for r in rows]
    assert [row_length(tok, "sft", r) for r in rows] == expected
    longest, short = max(expected), sorted(expected)[-3]
    assert short < 64 < longest
    # 2 of 10 rows longer than 64 tokens: over the default share (10%), one line, exit 2,
    # before anything loads or is written.
    out = tmp_path / "adapters"
    argv = [str(export), "--role", "generator", "--stage", "sft", "--base", str(tokenizer_base),
            "--out", str(out)]  # fmt: skip
    r = cli_train(*argv, "--max-length", "64")
    one_line_exit_2(r, f"2 of 10 rows are longer than --max-length 64 tokens (the longest has "
                       f"{longest})")  # fmt: skip
    assert "--max-cut-share" in r.stderr
    assert not out.exists() and not (tmp_path / "adapters.partial").exists()
    one_line_exit_2(cli_train(*argv, "--max-cut-share", "1.5"), "--max-cut-share must be in")
    # Allowed by a larger share: counted, not refused.
    m = measure(tok, "generator-sft", "sft", rows, 64, 0.25)
    assert (m.rows, m.cut, m.max_length, m.longest) == (10, 2, 64, longest)
    assert m.record() == {"max_length": 64, "longest_row": longest, "rows_cut": 2}
    # Without --max-length, the stage's longest row: nothing cut.
    m = measure(tok, "generator-sft", "sft", rows, None)
    assert (m.cut, m.max_length) == (0, longest)
    # DPO: the longer of prompt + chosen and prompt + rejected.
    pair = {"prompt": chat("2+2?"), "chosen": [{"role": "assistant", "content": "4"}],
            "rejected": [{"role": "assistant", "content": long_answer}]}  # fmt: skip
    assert row_length(tok, "dpo", pair) == len(
        _tokenize(tok, pair["prompt"] + pair["rejected"])["input_ids"]
    )
    with pytest.raises(MaltError, match="refiner-dpo: 1 of 1 rows"):
        measure(tok, "refiner-dpo", "dpo", [pair], 64)


def test_role_without_dpo_pairs_trains_sft_and_says_why(tmp_path):
    export = small_export(tmp_path, dpo={"refiner": []})
    data = load_export(export, list(ROLES), ["sft", "dpo"])
    plan = plan_stages(data, list(ROLES), "all", None, False)
    assert [s.name for s in plan.stages] == [
        "generator-sft", "verifier-sft", "verifier-dpo", "refiner-sft",
    ]  # fmt: skip
    assert "no pairs" in plan.skipped["refiner-dpo"]
    # Asked for DPO only, there is nothing to train: refused before anything loads.
    one_line_exit_2(
        cli_train(str(export), "--role", "refiner", "--stage", "dpo", "--base", str(export)),
        "no DPO to train for the refiner",
    )
    # --stage dpo gives the generator DPO too (only when asked).
    assert [s.name for s in plan_stages(data, ["generator"], "dpo", None, False).stages] == [
        "generator-dpo"
    ]


def test_unknown_model_and_mismatched_base_are_refused(tmp_path, small_model, isolated_env):
    from malt_local.hashing import cached_sha256

    sha = cached_sha256(small_model)
    export = small_export(tmp_path, sha=sha)
    out = tmp_path / "adapters"
    one_line_exit_2(cli_train(str(export), "--out", str(out)), "is not known here")
    r = malt(
        "pull", "smollm2-135m", "--file", str(small_model), env={"MALT_HOME": str(isolated_env)}
    )
    assert r.returncode == 0, r.stderr
    # A Hugging Face folder of another model: another vocabulary.
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(
        json.dumps({"model_type": "llama", "vocab_size": 32000, "num_attention_heads": 9})
    )
    one_line_exit_2(
        cli_train(str(export), "--base", str(hf), "--out", str(out)), "vocabulary of 32000"
    )
    (hf / "config.json").write_text(json.dumps({"model_type": "gemma", "vocab_size": 49152}))
    one_line_exit_2(cli_train(str(export), "--base", str(hf), "--out", str(out)), "not supported")
    (hf / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 49152}))
    (hf / "chat_template.jinja").write_text("{{ messages }}")
    one_line_exit_2(
        cli_train(str(export), "--base", str(hf), "--out", str(out)), "another chat template"
    )
    # A GGUF of an architecture malt train does not convert.
    import gguf

    other = tmp_path / "other.gguf"
    writer = gguf.GGUFWriter(str(other), "gemma")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    one_line_exit_2(cli_train(str(export), "--base", str(other), "--out", str(out)), "'gemma'")
    # An output folder holding something else.
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    one_line_exit_2(cli_train(str(export), "--out", str(out)), "holds no malt train adapters")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert not (tmp_path / "adapters.partial").exists()


def test_bad_settings(tmp_path):
    export = str(small_export(tmp_path))
    one_line_exit_2(cli_train(export, "--lr", "0"), "--lr must be above 0")
    one_line_exit_2(cli_train(export, "--lora-dropout", "1"), "--lora-dropout")


def test_adapters_manifest_gives_each_role_its_stack(tmp_path):
    adapters = {
        "verifier-dpo": {"gguf": "verifier-dpo.gguf"},
        "verifier-sft": {"gguf": "verifier-sft.gguf"},
        "generator-sft": {"gguf": "generator-sft.gguf"},
    }
    assert apply_order(adapters) == {
        "generator": ["generator-sft.gguf"],
        "verifier": ["verifier-sft.gguf", "verifier-dpo.gguf"],
    }
    with pytest.raises(MaltError, match="no manifest.json"):
        adapter_values(tmp_path)
    (tmp_path / "manifest.json").write_text(
        json.dumps({"tool": "malt-train", "adapters": adapters})
    )
    with pytest.raises(MaltError, match="generator-sft.gguf is missing"):
        adapter_values(tmp_path)
    for info in adapters.values():
        (tmp_path / info["gguf"]).write_bytes(b"GGUF")
    assert adapter_values(tmp_path) == [
        f"generator={tmp_path / 'generator-sft.gguf'}",
        f"verifier={tmp_path / 'verifier-sft.gguf'}",
        f"verifier={tmp_path / 'verifier-dpo.gguf'}",
    ]


# --------------------------------------------------------------------------- real training


@pytest.fixture(scope="module")
def home(tmp_path_factory, small_model) -> Path:
    """A MALT_HOME where the small model was registered with `malt pull --file` (offline)."""
    h = tmp_path_factory.mktemp("train_home")
    r = malt("pull", "smollm2-135m", "--file", str(small_model), env={"MALT_HOME": str(h)})
    assert r.returncode == 0, r.stderr
    return h


# The small model's outputs differ between CPUs (llama.cpp picks its kernels for the machine it
# was built on), so the export's run takes the first of these seeds that gives every role
# positives and the verifier and refiner pairs; θ = 0.2 makes a generator positive when one of
# its four leaves is right.
EXPORT_SEEDS = tuple(range(8))


@pytest.fixture(scope="module")
def exported(home, tmp_path_factory) -> Path:
    """A real `malt run` on sums the small model gets partly right, then `malt export`."""
    d = tmp_path_factory.mktemp("train_run")
    env = {"MALT_HOME": str(home)}
    for seed in EXPORT_SEEDS:
        db = d / f"malt-{seed}.db"
        r = malt(
            "run", "--n", "2", "--max-tokens", "32", "--model", "smollm2-135m", "--db", str(db),
            "--seed", str(seed), "--theta", "0.2", str(SUMS), env=env, timeout=1800,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        out = d / f"export-{seed}"
        # A 32-token budget cuts most nodes off: kept, since this is about training, not data.
        r = malt("export", "--db", str(db), "--out", str(out), "--keep-length-stopped", env=env)
        assert r.returncode == 0, r.stderr
        if all((out / f"{role}.sft.jsonl").read_text().strip() for role in ROLES) and all(
            (out / f"{role}.dpo.jsonl").read_text().strip() for role in ("verifier", "refiner")
        ):
            return out
    pytest.fail(f"no seed in {EXPORT_SEEDS} gave positives in every role and V/R pairs")


@pytest.fixture(scope="module")
def loop(home, exported, tmp_path_factory) -> dict:
    """`malt train --role all`: every role and stage, a few steps, the base found offline."""
    out = tmp_path_factory.mktemp("loop") / "adapters"
    start = time.monotonic()
    r = malt(
        "train", str(exported), "--out", str(out), "--max-steps", "3", "--lr", "2e-3",
        "--dpo-lr", "1e-4", *QUICK, "--json", env={"MALT_HOME": str(home)}, timeout=1800,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    return {"out": out, "manifest": json.loads(r.stdout), "seconds": time.monotonic() - start}


MEMORISE = ["--role", "generator", "--stage", "sft", "--epochs", "3", "--lr", "1e-3"]


def memorise_argv(exported: Path, out: Path) -> list[str]:
    """One row a step, so that a few positives still make several steps (the last flag wins)."""
    return [
        "train", str(exported), "--out", str(out), *MEMORISE, *QUICK, "--batch-size", "1",
        "--max-steps", "8", "--save-steps", "1",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def memorised(home, exported, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("memorised") / "adapters"
    r = malt(*memorise_argv(exported, out), "--json", env={"MALT_HOME": str(home)}, timeout=1800)
    assert r.returncode == 0, r.stderr
    return {"out": out, "manifest": json.loads(r.stdout)}


def test_whole_loop_writes_a_gguf_lora_for_every_role_and_stage(loop, exported, small_model):
    from malt_local.engines.llama.adapters import AdapterSpec, check_adapters
    from malt_local.hashing import sha256_file

    out, m = loop["out"], loop["manifest"]
    stages = ["generator-sft", "refiner-dpo", "refiner-sft", "verifier-dpo", "verifier-sft"]
    assert sorted(m["adapters"]) == stages
    specs = {}
    for name in stages:
        info = m["adapters"][name]
        assert (out / name / "adapter_model.safetensors").is_file()
        assert info["gguf_sha256"] == sha256_file(out / f"{name}.gguf")
        assert info["steps"] == 3 and len(info["loss"]) == 3 and info["resumed_from_step"] == 0
        # Measured before training: QUICK's limit, and the sums' short rows all fit it.
        assert info["max_length"] == 512 and info["rows_cut"] == 0
        assert 0 < info["longest_row"] <= 512
        specs.setdefault(info["role"], []).append(AdapterSpec(info["role"], out / f"{name}.gguf"))
    # llama.cpp's own checks (names, shapes, architecture) accept every file.
    checked = check_adapters(specs, small_model)
    assert all(i.rank == 16 and i.tensors == 30 * 7 * 2 for v in checked.values() for i in v)
    assert m["apply"]["verifier"] == ["verifier-sft.gguf", "verifier-dpo.gguf"]
    assert m["adapters"]["verifier-dpo"]["reference"] == "verifier-sft"
    # DPO starts at the SFT model itself: its first loss is log 2.
    assert m["adapters"]["verifier-dpo"]["loss"][0][1] == pytest.approx(0.6931, abs=1e-3)
    # ... and its reward margins are logged by step, the first one 0 (policy = reference);
    # SFT has none.
    dpo = m["adapters"]["verifier-dpo"]
    assert [s for s, _ in dpo["margins"]] == [1, 2, 3]
    assert dpo["margins"][0][1] == pytest.approx(0.0, abs=1e-3)
    assert len(dpo["reward_accuracies"]) == 3
    assert m["adapters"]["verifier-sft"]["margins"] == []
    assert m["base"]["kind"] == "gguf" and m["base"]["sha256"] == sha256_file(small_model)
    assert m["export"]["manifest_sha256"] == sha256_file(exported / "manifest.json")
    # The prompts the trees were made with, as `malt eval --adapters` compares them.
    sources = json.loads((exported / "manifest.json").read_text())["sources"]
    assert m["export"]["prompts_sha256"] == sorted({s["prompts_sha256"] for s in sources})
    assert m["export"]["files"]["verifier.dpo.jsonl"] == sha256_file(
        exported / "verifier.dpo.jsonl"
    )
    assert m["settings"]["beta"] == 0.2 and m["settings"]["max_steps"] == 3
    assert m["versions"]["trl"] and m["versions"]["torch"]
    assert json.loads((out / "manifest.json").read_text()) == m
    assert not out.with_name("adapters.partial").exists()
    per_step = {name: m["adapters"][name]["seconds_per_step"] for name in stages}
    print(f"\nmalt train --role all (5 stages x 3 steps): {loop['seconds']:.0f} s, {per_step}")


def test_same_command_again_trains_nothing_and_other_settings_need_force(loop, exported, home):
    out = loop["out"]
    argv = ["train", str(exported), "--out", str(out), "--max-steps", "3", "--lr", "2e-3",
            "--dpo-lr", "1e-4", *QUICK]  # fmt: skip
    r = malt(*argv, env={"MALT_HOME": str(home)})
    assert r.returncode == 0, r.stderr
    assert "verifier-dpo: already trained" in r.stderr
    r = malt(*argv[:-2], "--lora-dropout", "0.1", env={"MALT_HOME": str(home)})
    assert r.returncode == 2 and "--force" in r.stderr
    assert r.stderr.count("\n") == 1


def eval_rows(db: Path) -> dict:
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    rows = {}
    for g in conn.execute("SELECT * FROM eval_generations"):
        rows[(g["adapter_set"], g["seed_index"], g["question_id"], g["pass_index"], g["role"])] = g[
            "output"
        ]
    conn.close()
    return rows


def test_eval_applies_the_adapters_and_the_verifiers_changes_only_the_verifier(
    loop, small_model, tmp_path
):
    out, db = loop["out"], tmp_path / "eval.db"
    common = ["eval", str(SUMS), "--model", str(small_model), "--db",
              str(db), "--mode", "ma", "--votes", "1", "--samples", "3", "--seeds", "1",
              "--max-tokens", "24", "--json"]  # fmt: skip
    r = malt(*common, "--adapters", str(out), timeout=1800)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert {role: len(a) for role, a in result["adapters"].items()} == {
        "generator": 1, "verifier": 2, "refiner": 2,
    }  # fmt: skip
    assert "MA+LoRA" in result["columns"]
    # The verifier's two adapters alone: generator turns are the base's, critiques are not.
    # Three steps move the weights too little to be sure a short critique changes, so the
    # adapters go at scale 8 here (`--adapter ROLE=PATH:SCALE`, as a user may give them).
    v = [f"verifier={out / 'verifier-sft.gguf'}:8", f"verifier={out / 'verifier-dpo.gguf'}:8"]
    r = malt(*common, "--adapter", v[0], "--adapter", v[1], timeout=1800)
    assert r.returncode == 0, r.stderr
    only_v = json.loads(r.stdout)["adapter_set"]
    rows = eval_rows(db)
    keys = [k[1:4] for k in rows if k[0] == only_v and k[4] == "generator"]
    assert len(keys) == 3
    for s, q, p in keys:
        assert rows[(only_v, s, q, p, "generator")] == rows[("base", s, q, p, "generator")]
    assert any(
        rows[(only_v, s, q, p, "verifier")] != rows[("base", s, q, p, "verifier")]
        for s, q, p in keys
    )


def test_run_with_the_trained_adapters_builds_trees_a_new_round_can_train_on(
    loop, small_model, tmp_path
):
    """`malt run --adapters` (the next MALT round's data) and `--adapter` with the trained
    files: a full tree, the generator's nodes the base model's where it has no adapter."""
    out = loop["out"]

    def run(db: Path, *extra: str) -> dict:
        r = malt(
            "run", "--n", "2", "--max-tokens", "24", "--model", str(small_model), "--db",
            str(db), "--limit", "2", "--seed", "1", "--json", *extra, str(SUMS), timeout=1800,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    summary = run(tmp_path / "round2.db", "--adapters", str(out))
    assert summary["nodes_total"] == summary["nodes_expected"] == 2 * 14
    stacks = summary["config"]["adapters"]
    assert {role: len(stack) for role, stack in stacks.items()} == {
        "generator": 1, "verifier": 2, "refiner": 2,
    }  # fmt: skip
    files = loop["manifest"]["adapters"]
    assert stacks["verifier"][0][0] == files["verifier-sft"]["gguf_sha256"]

    # Three steps move the weights little: the verifier's and refiner's files at scale 8 (as in
    # the eval test above) against the base built the same way (scale 0 is the base exactly).
    def flags(scale: int) -> list[str]:
        return [
            x
            for role in ("verifier", "refiner")
            for stage in ("sft", "dpo")
            for x in ("--adapter", f"{role}={out / f'{role}-{stage}.gguf'}:{scale}")
        ]

    texts = {}
    for scale in (0, 8):
        db = tmp_path / f"scale{scale}.db"
        run(db, *flags(scale))
        with sqlite3.connect(db) as conn:
            rows = conn.execute("SELECT question_id, path, role, output FROM nodes").fetchall()
        texts[scale] = {(q, p): (role, o) for q, p, role, o in rows}
    assert texts[0].keys() == texts[8].keys() and len(texts[8]) == 2 * 14
    changed = {"generator": 0, "verifier": 0, "refiner": 0}
    for key, (role, output) in texts[8].items():
        changed[role] += output != texts[0][key][1]
    assert changed["generator"] == 0 and changed["verifier"] and changed["refiner"], changed


def test_sft_training_lowers_the_loss_of_its_own_rows(memorised, exported, home, monkeypatch):
    """Learning, measured on fixed data: the completion loss of every generator SFT row under the
    base model and under the trained adapter, in one process. The per-step losses in the manifest
    are one row a step, so their curve follows row order and length, and on another CPU flavour
    (AVX-512) its halves did not fall; the same rows before and after do not depend on either."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    info = memorised["manifest"]["adapters"]["generator-sft"]
    assert info["steps"] >= 4 and len(info["loss"]) == info["steps"]
    monkeypatch.setenv("MALT_HOME", str(home))
    from malt_local.training.base_model import cache_root

    folder = cache_root() / memorised["manifest"]["base"]["sha256"]
    tok = AutoTokenizer.from_pretrained(str(folder))
    rows = [json.loads(x) for x in (exported / "generator.sft.jsonl").read_text().splitlines()]
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    peft = PeftModel.from_pretrained(model, str(memorised["out"] / "generator-sft"))
    peft.eval()

    def mean_loss() -> float:
        total, count = 0.0, 0
        for row in rows:
            prompt = list(
                tok.apply_chat_template(
                    row["messages"][:-1], add_generation_prompt=True, return_dict=False
                )
            )
            full = list(tok.apply_chat_template(row["messages"], return_dict=False))
            assert full[: len(prompt)] == prompt
            labels = [-100] * len(prompt) + full[len(prompt) :]
            with torch.no_grad():
                out = peft(torch.tensor([full]), labels=torch.tensor([labels]))
            n = len(full) - len(prompt)
            total, count = total + float(out.loss) * n, count + n
        return total / count

    with peft.disable_adapter():
        before = mean_loss()
    after = mean_loss()
    print(f"\ngenerator SFT rows: loss {before:.3f} before training, {after:.3f} after")
    assert after < 0.5 * before, (before, after)


def test_llama_cpp_greedy_with_the_gguf_lora_equals_transformers_peft(
    memorised, exported, home, small_model, monkeypatch
):
    """The conversion is exact: same prompt tokens, same greedy continuation."""
    import llama_cpp
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("MALT_HOME", str(home))
    from malt_local.training.base_model import cache_root

    folder = cache_root() / memorised["manifest"]["base"]["sha256"]
    tok = AutoTokenizer.from_pretrained(str(folder))
    row = json.loads((exported / "generator.sft.jsonl").read_text().splitlines()[0])
    ids = list(
        tok.apply_chat_template(row["messages"][:-1], add_generation_prompt=True, return_dict=False)
    )
    n = 24
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    peft = PeftModel.from_pretrained(model, str(memorised["out"] / "generator-sft"))
    with torch.no_grad():
        hf = peft.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)[0][len(ids) :]
    hf = [t for t in hf.tolist()]
    if tok.eos_token_id in hf:
        hf = hf[: hf.index(tok.eos_token_id)]

    def llama(lora: Path | None) -> list[int]:
        llm = llama_cpp.Llama(
            str(small_model), lora_path=str(lora) if lora else None, n_ctx=1024, verbose=False
        )
        toks = []
        for t in llm.generate(ids, temp=0.0, top_k=1):
            if t == llm.token_eos() or len(toks) >= n:
                break
            toks.append(t)
        llm.close()
        return toks

    adapted = llama(memorised["out"] / "generator-sft.gguf")
    assert adapted == hf, (tok.decode(adapted), tok.decode(hf))
    assert adapted != llama(None), "the adapter should change the greedy text"


def interrupted_then_resumed(exported: Path, home: Path, out: Path, sig: int) -> dict:
    """Start the memorise training, send `sig` once checkpoint-2 is complete, rerun."""
    argv = memorise_argv(exported, out)
    env = {**os.environ, "MALT_HOME": str(home)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "malt_local", *argv], env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    marker = out.with_name("adapters.partial") / "generator-sft/checkpoints/checkpoint-2"
    deadline = time.monotonic() + 600
    while not (marker / "trainer_state.json").is_file():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=600)
    if sig == signal.SIGINT:
        assert proc.returncode == 130, err
        assert "checkpoint saved at step" in err and "Traceback" not in err
    else:
        assert proc.returncode == -signal.SIGKILL
    assert not out.exists()  # nothing published from an unfinished training
    r = malt(*argv, "--json", env={"MALT_HOME": str(home)}, timeout=1800)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["sigint", "sigkill"])
def test_interrupted_training_resumes_and_ends_like_an_uninterrupted_one(
    memorised, exported, home, tmp_path, sig
):
    out = tmp_path / "adapters"
    m = interrupted_then_resumed(exported, home, out, sig)
    ref = memorised["manifest"]["adapters"]["generator-sft"]
    info = m["adapters"]["generator-sft"]
    assert 2 <= info["resumed_from_step"] < info["steps"] == ref["steps"]
    a = load_adapter(memorised["out"] / "generator-sft")
    b = load_adapter(out / "generator-sft")
    assert sorted(a) == sorted(b)
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-6)
    assert [s for s, _ in info["loss"]] == [s for s, _ in ref["loss"]]
