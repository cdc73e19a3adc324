"""`malt train`: one LoRA adapter per role, SFT then DPO, offline from the GGUF (issue 16).

Modules: `data` (the export folder), `settings` (hyperparameters and their reasons), `base`
(finding, checking, loading and caching the base model), `trainer` (one TRL stage with
checkpoints), `gguf_lora` (PEFT adapter -> llama.cpp LoRA GGUF), `manifest` (adapters/
manifest.json, read by `malt eval --adapters`) and `pipeline` (the whole command).

torch, transformers, peft, trl and datasets are the `[train]` extra: they are imported only
inside the functions that train, so the rest of malt (and `malt eval --adapters`) works without
them.
"""

from __future__ import annotations

from malt_local.errors import MaltError

EXTRA = ("torch", "transformers", "peft", "trl", "datasets", "accelerate", "gguf")


def require_extra() -> None:
    """One line that says how to install the training extra, when a part of it is missing."""
    import importlib.util

    missing = [name for name in EXTRA if importlib.util.find_spec(name) is None]
    if missing:
        raise MaltError(f"malt train needs {', '.join(missing)}: pip install 'malt-local[train]'")
