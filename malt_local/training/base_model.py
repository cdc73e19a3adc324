"""The base model `malt train` trains on: found offline, checked against the data, cached.

By default it is the very GGUF the exported runs were generated with: the export's manifest
names its file and sha256, and malt's model records (`malt pull`, `malt pull --file`) say where
a file with that sha256 lies. transformers loads a GGUF by dequantising it into float32 weights
(its tokenizer carries the chat template), so an air-gapped user needs nothing but that file.
Loading a GGUF is slow (the metadata is parsed in pure Python: 10-20 s for 135M parameters), so
the loaded model is saved once as a Hugging Face folder in the cache, keyed by the GGUF's
sha256, and later trainings load that copy in a fraction of a second.

`--base` also takes a Hugging Face model folder of the same model (unquantised weights train a
little better than dequantised Q4 ones) or another GGUF. A base that does not match the data's
model (architecture, vocabulary size, chat template) is refused: adapters trained on it would
not fit the GGUF the roles run on.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from malt_local.errors import MaltError
from malt_local.gguf import GGUFHeader, is_gguf, read_gguf_header
from malt_local.paths import malt_home
from malt_local.training.data import ExportData
from malt_local.training.gguf_lora import ARCHITECTURES

GGUF_ARCHS = {arch for arch, _ in ARCHITECTURES.values()}


@dataclass(frozen=True)
class Base:
    """The chosen base: a GGUF file (with its sha256) or a Hugging Face folder."""

    path: Path
    kind: str  # "gguf" or "hf"
    sha256: str | None
    arch: str  # GGUF architecture name
    reference: Path | None  # the data's GGUF, when found: adapters are checked against it

    def record(self) -> dict:
        return {
            "path": str(self.path),
            "kind": self.kind,
            "sha256": self.sha256,
            "architecture": self.arch,
            "gguf": str(self.reference) if self.reference else None,
        }


def cache_root() -> Path:
    return malt_home() / "cache" / "train-base"


def _find_pulled(sha256: str) -> Path | None:
    from malt_local.models.records import load_records

    for record in load_records().values():
        if record.sha256 == sha256 and record.problem() is None:
            return Path(record.path)
    return None


def _hf_facts(folder: Path) -> tuple[str, int | None, str | None]:
    """(GGUF architecture, vocabulary size, chat template) of a Hugging Face model folder."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise MaltError(f"--base {folder}: no readable config.json ({exc})") from exc
    model_type = str(config.get("model_type"))
    if model_type not in ARCHITECTURES:
        raise MaltError(
            f"--base {folder}: architecture '{model_type}' is not supported for training "
            f"(supported: {', '.join(sorted(ARCHITECTURES))})"
        )
    template = None
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        template = jinja.read_text(encoding="utf-8")
    else:
        try:
            tok = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
            template = tok.get("chat_template") if isinstance(tok, dict) else None
        except (OSError, ValueError):
            template = None
    vocab = config.get("vocab_size")
    return ARCHITECTURES[model_type][0], int(vocab) if vocab else None, template


def _gguf_facts(header: GGUFHeader) -> tuple[str | None, int | None, str | None]:
    embd = header.tensors.get("token_embd.weight")
    return (
        header.string("general.architecture"),
        embd[1] if embd and len(embd) == 2 else None,
        header.string("tokenizer.chat_template"),
    )


def _check_match(name: str, facts: tuple, reference: Path) -> None:
    arch, vocab, template = facts
    ref_arch, ref_vocab, ref_template = _gguf_facts(read_gguf_header(reference))
    if arch != ref_arch:
        raise MaltError(
            f"--base {name} is a '{arch}' model, but the data was made with {reference.name} "
            f"('{ref_arch}')"
        )
    if vocab is not None and ref_vocab is not None and vocab != ref_vocab:
        raise MaltError(
            f"--base {name} has a vocabulary of {vocab} tokens, but {reference.name} has "
            f"{ref_vocab}: not the model the data was made with"
        )
    if template and ref_template and template.strip() != ref_template.strip():
        raise MaltError(
            f"--base {name} has another chat template than {reference.name}: not the model the "
            "data was made with"
        )


def resolve_base(data: ExportData, base: Path | None) -> Base:
    """The base to train on, checked against the data's model; nothing is loaded yet."""
    from malt_local.hashing import cached_sha256

    model = data.model
    reference = _find_pulled(model.sha256) if model and model.sha256 else None
    if base is None:
        if model is None:
            raise MaltError(
                f"{data.folder} mixes runs of {len(data.models)} models: pass --base PATH"
            )
        if not model.sha256:
            raise MaltError(f"{data.folder}: the manifest has no sha256 for {model.file}")
        if reference is None:
            raise MaltError(
                f"the data's model {model.file} (sha256 {model.sha256[:12]}) is not known here: "
                f"register it with malt pull ALIAS --file PATH, or pass --base PATH"
            )
        path = reference
    else:
        path = base.expanduser()
        if not path.exists():
            raise MaltError(f"--base {path}: not found")
    if path.is_dir():
        arch, vocab, template = _hf_facts(path)
        if reference is not None:
            _check_match(str(path), (arch, vocab, template), reference)
        elif model is not None:
            print(
                f"note: {model.file} is not known here, so --base {path} is not checked against "
                "the data's model",
                file=sys.stderr,
            )
        return Base(path, "hf", None, arch, reference)
    if not is_gguf(path):
        raise MaltError(f"--base {path}: neither a GGUF file nor a Hugging Face model folder")
    header = read_gguf_header(path)
    facts = _gguf_facts(header)
    if facts[0] not in GGUF_ARCHS:
        raise MaltError(
            f"{path.name} is a '{facts[0]}' model, which malt train does not support "
            f"(supported: {', '.join(sorted(GGUF_ARCHS))})"
        )
    sha = cached_sha256(path)
    if reference is not None and sha != (model.sha256 if model else None):
        _check_match(path.name, facts, reference)
    return Base(path, "gguf", sha, str(facts[0]), reference or path)


def pick_device(device: str) -> str:
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    available = {
        "cpu": True,
        "cuda": torch.cuda.is_available(),
        "mps": bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available(),
    }
    if not available[device]:
        raise MaltError(f"--device {device}: not available on this machine")
    return device


def dtype_for(device: str):
    """bf16 on a GPU that has it (half the memory, the usual LoRA setting), else float32."""
    import torch

    if device == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def hf_folder(base: Base) -> Path:
    """A Hugging Face folder for the base: the folder itself, or the GGUF's cached copy.

    The copy is written to a temporary folder and renamed into place, so an interrupted first
    load leaves no half copy behind.
    """
    if base.kind == "hf":
        return base.path
    assert base.sha256
    dest = cache_root() / base.sha256
    if (dest / "config.json").is_file():
        return dest
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    folder, name = str(base.path.parent), base.path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    _drop_quantization_config(model)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.rename(tmp, dest)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another process made it first
    return dest


def _drop_quantization_config(model) -> None:
    """transformers marks a GGUF-loaded model as quantised although its weights are plain
    float32 tensors, and the Trainer then refuses it; the mark is dropped."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def load_tokenizer(base: Base):
    """The base's tokenizer alone (no weights), to measure the rows before training: from the
    folder, the GGUF's cached copy, or else the GGUF itself (a few seconds, no dequantising)."""
    from transformers import AutoTokenizer

    if base.kind == "hf":
        tokenizer = AutoTokenizer.from_pretrained(str(base.path))
    elif base.sha256 and (cache_root() / base.sha256 / "config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(str(cache_root() / base.sha256))
    else:
        tokenizer = AutoTokenizer.from_pretrained(str(base.path.parent), gguf_file=base.path.name)
    if tokenizer.chat_template is None:
        raise MaltError(f"{base.path}: the tokenizer has no chat template")
    return tokenizer


def load_base(base: Base, device: str):
    """(model, tokenizer) on `device`, in the device's training dtype."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = hf_folder(base)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    if tokenizer.chat_template is None:
        raise MaltError(f"{base.path}: the tokenizer has no chat template")
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype_for(device))
    _drop_quantization_config(model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
