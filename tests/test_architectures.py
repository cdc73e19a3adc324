"""The architectures users bring: tiny random models, converted by llama.cpp, through malt.

For each architecture (tests/tinymodels.py): a Hugging Face folder with random weights, its GGUF
from llama.cpp's own converter, `malt pull --file`, `malt run`, `malt export`, `malt train --base
FOLDER`, the GGUF LoRA loaded by llama.cpp, and llama.cpp's greedy text with the adapter equal
to transformers + PEFT's on the prompt malt renders (and tokenizes) for a question.

A random model answers nothing right, so the run is made twice: greedy (temperature 0) texts do
not depend on the question's answer, so the first run's refiner answer becomes the question's
answer, and the second run (a real one, graded as usual) has positives to export.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from tests.conftest import malt
from tests.tinymodels import ARCHS, build, convert

QUESTION = "What is 2 + 2?"
# The generator's positive is the base model's own greedy text, so SFT on it cannot change the
# greedy text of its own prompt: the adapter is compared on another question's prompt.
OTHER = "What is 3 + 5?"
RUN = ["--n", "1", "--max-tokens", "16", "--temperature", "0", "--task", "exact"]
TRAIN = ["--role", "generator", "--stage", "sft", "--max-steps", "6", "--lr", "1e-2",
         "--batch-size", "1", "--lora-dropout", "0", "--max-length", "512"]  # fmt: skip


def run_tree(alias: str, db: Path, questions: Path, env: dict) -> list[tuple]:
    r = malt("run", *RUN, "--model", alias, "--db", str(db), str(questions), env=env)
    assert r.returncode == 0, r.stderr
    with sqlite3.connect(db) as conn:
        return conn.execute(
            "SELECT role, output, reward, value FROM nodes ORDER BY path"
        ).fetchall()


@pytest.mark.parametrize("arch", list(ARCHS))
def test_run_export_train_and_llama_cpp_greedy_equals_peft(arch, tmp_path, small_model):
    import llama_cpp
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from malt_local.engines.llama.adapters import AdapterSpec, check_adapters
    from malt_local.engines.llama.model import LocalModel
    from malt_local.grading import extract_answer
    from malt_local.prompts import PromptSet, TreeContext
    from malt_local.questions.loading import Question

    folder = build(arch, tmp_path / "hf", small_model)
    gguf = convert(folder, tmp_path / f"{arch}.gguf")
    env = {"MALT_HOME": str(tmp_path / "home")}
    alias = f"malt-tests/tiny/{arch}.gguf"
    r = malt("pull", alias, "--file", str(gguf), env=env)
    assert r.returncode == 0, r.stderr

    # malt run, twice (see the module's docstring).
    q1 = tmp_path / "q1.jsonl"
    q1.write_text(json.dumps({"question": QUESTION, "answer": "4"}) + "\n")
    first = run_tree(alias, tmp_path / "first.db", q1, env)
    assert [row[0] for row in first] == ["generator", "verifier", "refiner"]
    answer = extract_answer(first[-1][1], "exact")
    assert answer, first
    q2 = tmp_path / "q2.jsonl"
    q2.write_text(json.dumps({"question": QUESTION, "answer": answer}) + "\n")
    second = run_tree(alias, tmp_path / "run.db", q2, env)
    assert [row[1] for row in second] == [row[1] for row in first]
    assert second[-1][2] == 1.0 and second[0][3] == 1.0, second

    # Its export, and malt train on the Hugging Face folder.
    export = tmp_path / "export"
    r = malt("export", "--db", str(tmp_path / "run.db"), "--out", str(export),
             "--keep-length-stopped", env=env)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert (export / "generator.sft.jsonl").read_text().strip()
    out = tmp_path / "adapters"
    r = malt("train", str(export), "--base", str(folder), "--out", str(out), *TRAIN, "--json",
             env=env, timeout=1800)  # fmt: skip
    assert r.returncode == 0, r.stderr
    manifest = json.loads(r.stdout)
    assert manifest["base"]["kind"] == "hf"
    lora = out / "generator-sft.gguf"

    # llama.cpp's checks accept the LoRA GGUF for the model GGUF.
    checked = check_adapters({"generator": [AdapterSpec("generator", lora)]}, gguf)
    assert checked["generator"][0].tensors == 2 * 7 * 2

    # The prompt as malt renders and tokenizes it.
    question = Question(text=OTHER, ground_truth="8", task="exact")
    messages = PromptSet().messages("generator", TreeContext(question))
    local = LocalModel(gguf, n_ctx=1024)
    text = local.render(messages)
    ids = local.tokenize(text)
    local.close()
    tok = AutoTokenizer.from_pretrained(str(folder))
    assert tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == text
    hf_ids = tok(text, add_special_tokens=False)["input_ids"]
    assert hf_ids == ids[len(ids) - len(hf_ids) :], (hf_ids, ids)

    n = 16
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    peft = PeftModel.from_pretrained(model, str(out / "generator-sft"))
    with torch.no_grad():
        hf = peft.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)[0]
    hf = hf[len(ids) :].tolist()
    if tok.eos_token_id in hf:
        hf = hf[: hf.index(tok.eos_token_id)]

    def llama(adapter: Path | None) -> list[int]:
        llm = llama_cpp.Llama(
            str(gguf), lora_path=str(adapter) if adapter else None, n_ctx=1024, verbose=False
        )
        toks = []
        for t in llm.generate(ids, temp=0.0, top_k=1):
            if llama_cpp.llama_vocab_is_eog(llm._model.vocab, t) or len(toks) >= n:
                break
            toks.append(t)
        llm.close()
        return toks

    adapted = llama(lora)
    assert adapted == hf, (tok.decode(adapted), tok.decode(hf))
    assert tok.decode(adapted) == tok.decode(hf)
    assert adapted != llama(None), "the adapter should change the greedy text"


def test_an_architecture_malt_cannot_convert_is_refused_before_training(tmp_path):
    """A Phi-3 folder as --base: one line, exit 2, nothing written, nothing loaded."""
    from tests.test_train import cli_train, one_line_exit_2, small_export

    export = small_export(tmp_path, sha=None)
    hf = tmp_path / "phi3"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "phi3", "vocab_size": 32064}))
    out = tmp_path / "adapters"
    r = cli_train(str(export), "--base", str(hf), "--out", str(out))
    one_line_exit_2(r, "architecture 'phi3' is not supported")
    assert not out.exists() and not (tmp_path / "adapters.partial").exists()
