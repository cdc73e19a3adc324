"""Tiny random models of the architectures users bring, converted by llama.cpp's own converter.

`convert_hf_to_gguf.py` (with its `conversion/` package and its own `gguf-py`) and the vocab-only
GGUFs of `models/` ship in the llama-cpp-python sdist; pip's cache serves the sdist of the
installed version, so nothing is downloaded at test time. Only those files are extracted, once,
into `~/.cache/malt/llama-cpp-src/<version>/` (written to a temporary folder and renamed into
place, so an interrupted extraction leaves nothing half there).

Weights are random with a large `initializer_range`, so the logits are peaked and greedy texts
do not flip on float noise between transformers and llama.cpp; everything is float32.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from importlib.metadata import version
from pathlib import Path

VENDOR = "vendor/llama.cpp/"
WANTED = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "models/ggml-vocab-qwen2.gguf")

# name -> (transformers model_type, config overrides, tokenizer: "smollm" or a vocab GGUF)
LLAMA3_ROPE = {
    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}  # fmt: skip
ARCHS = {
    "llama3.1": (
        "llama",
        {"max_position_embeddings": 131072, "rope_scaling": LLAMA3_ROPE, "rope_theta": 500000.0},
        "smollm",
    ),  # fmt: skip
    # transformers 5 gives a qwen2 folder Qwen2's own tokenizer whatever it holds, so it gets
    # Qwen2's real vocabulary (llama.cpp's test vocab).
    "qwen2.5": ("qwen2", {"tie_word_embeddings": True, "rope_theta": 1e6}, "qwen2"),
    "qwen3": ("qwen3", {"head_dim": 16, "tie_word_embeddings": True}, "smollm"),
    "mistral": ("mistral", {"sliding_window": None}, "smollm"),  # Mistral 7B v0.1: theta 1e4
    "gemma3": (
        "gemma3_text",
        {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 512},
        "smollm",
    ),  # fmt: skip
}


def llama_cpp_source() -> Path:
    """The cached converter tree of the installed llama-cpp-python's llama.cpp."""
    release = version("llama-cpp-python")
    dest = Path.home() / ".cache/malt/llama-cpp-src" / release
    if (dest / "convert_hf_to_gguf.py").is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="malt-llama-src-", dir=dest.parent) as tmp:
        pip = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary",
               "llama-cpp-python", f"llama-cpp-python=={release}", "-d", tmp]  # fmt: skip
        subprocess.run(pip, check=True, capture_output=True)
        sdist = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        out = Path(tmp) / "src"
        with tarfile.open(sdist) as tar:
            for member in tar:
                rel = member.name.split("/", 1)[-1]
                if rel.startswith(VENDOR) and rel[len(VENDOR) :].startswith(WANTED):
                    member.name = rel[len(VENDOR) :]
                    tar.extract(member, out, filter="data")
        try:
            os.rename(out, dest)
        except OSError:
            shutil.rmtree(out, ignore_errors=True)  # another process made it first
    return dest


def smollm_tokenizer(small_model: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(small_model.parent), gguf_file=small_model.name)


def build(name: str, folder: Path, small_model: Path) -> Path:
    """A tiny random `name` model saved as a Hugging Face folder (with a chat template)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    model_type, overrides, vocab = ARCHS[name]
    tok = smollm_tokenizer(small_model)
    if vocab != "smollm":
        template = tok.chat_template  # SmolLM2's (ChatML, as Qwen's)
        models = llama_cpp_source() / "models"
        tok = AutoTokenizer.from_pretrained(str(models), gguf_file=f"ggml-vocab-{vocab}.gguf")
        tok.chat_template = template
    config = AutoConfig.for_model(
        model_type, vocab_size=len(tok), hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        initializer_range=0.2, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.eos_token_id, **overrides,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def convert(folder: Path, dest: Path) -> Path:
    """llama.cpp's own convert_hf_to_gguf.py, float32 (exact comparisons)."""
    script = llama_cpp_source() / "convert_hf_to_gguf.py"
    argv = [sys.executable, str(script), str(folder), "--outtype", "f32", "--outfile", str(dest)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return dest
