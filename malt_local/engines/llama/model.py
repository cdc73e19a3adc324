"""llama.cpp through llama-cpp-python: finding and loading a GGUF, prompts to tokens.

`LocalModel` owns the loaded weights and the prompt side (the GGUF's chat template, rendered in a
sandbox, then tokenised once). Engines built on it (`simple`, `batched`) only generate.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import jinja2

from malt_local.engines.llama.chat import ChatTemplate
from malt_local.errors import MaltError
from malt_local.gguf import check_gguf, read_gguf_header


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """llama.cpp logs from C straight to fd 2; keep a user's terminal readable."""
    if os.environ.get("MALT_DEBUG"):
        yield
        return
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    with open(os.devnull, "wb") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def set_context_adapters(ctx: object, adapters: list[tuple[object, float]]) -> None:
    """Set exactly these LoRA adapters, with their scales, on a llama.cpp context.

    llama.cpp drops adapters with scale 0, so a scale of 0 gives the base model's computation.
    Any engine that owns a context uses this, then invalidates whatever KV it keeps.
    """
    import ctypes

    import llama_cpp

    if not adapters:
        llama_cpp.llama_set_adapters_lora(ctx, None, 0, None)
        return
    handles = (llama_cpp.llama_adapter_lora_p_ctypes * len(adapters))(*(h for h, _ in adapters))
    scales = (ctypes.c_float * len(adapters))(*(float(s) for _, s in adapters))
    if llama_cpp.llama_set_adapters_lora(ctx, handles, len(adapters), scales) != 0:
        raise MaltError("llama.cpp could not set the LoRA adapters on the context")


def resolve_model_path(spec: str) -> tuple[Path, str | None]:
    """A GGUF path and its known sha256 (None: hash it) from a path or a pulled alias."""
    from malt_local.models.resolve import resolve_model

    resolved = resolve_model(spec)
    check_gguf(Path(resolved.path), "model file")
    return Path(resolved.path), resolved.sha256


def default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)


def _template_where(path: Path, key: str) -> str:
    return f"the chat template of {path.name} ({key})"


def check_chat_templates(path: Path) -> None:
    """Compile and probe every chat template in the GGUF's header (`ChatTemplate`), before
    llama.cpp loads it: llama-cpp-python compiles them itself while loading, and a broken one
    would end there in a traceback."""
    for key, value in read_gguf_header(path).metadata.items():
        if key.startswith("tokenizer.chat_template") and isinstance(value, str):
            ChatTemplate(value, where=_template_where(path, key))


class LocalModel:
    """A GGUF loaded once, with its tokenizer and chat template."""

    def __init__(
        self,
        path: str | Path,
        *,
        n_ctx: int = 4096,
        n_threads: int | None = None,
        n_gpu_layers: int | None = None,
        n_batch: int = 512,
    ) -> None:
        import llama_cpp

        self.path = Path(path)
        check_gguf(self.path, "model file")
        if n_gpu_layers is None:
            n_gpu_layers = -1 if llama_cpp.llama_supports_gpu_offload() else 0
        self.n_threads = n_threads or default_threads()
        check_chat_templates(self.path)
        try:
            with quiet_stderr():
                self.llm = llama_cpp.Llama(
                    model_path=str(self.path),
                    n_ctx=n_ctx,
                    n_batch=n_batch,
                    n_threads=self.n_threads,
                    n_threads_batch=self.n_threads,
                    n_gpu_layers=n_gpu_layers,
                    verbose=False,
                )
        except (ValueError, RuntimeError, jinja2.TemplateError) as exc:
            raise MaltError(f"llama.cpp could not load {self.path}: {exc}") from exc
        self.n_gpu_layers = n_gpu_layers
        self.n_ctx = self.llm.n_ctx()
        self.n_ctx_train = self.llm._model.n_ctx_train()
        vocab = self.llm._model.vocab
        self.bos_id = self.llm.token_bos()
        self.add_bos = bool(self.llm._model.add_bos_token()) and self.bos_id >= 0
        self.eog_ids = [
            t for t in range(self.llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, t)
        ]
        bos = self._piece(self.bos_id)
        eos = self._piece(self.llm.token_eos())
        try:  # a broken or hostile template is refused here, before any row is written
            self.chat = ChatTemplate(
                self.llm.metadata.get("tokenizer.chat_template"),
                bos,
                eos,
                where=_template_where(self.path, "tokenizer.chat_template"),
            )
        except MaltError:
            self.llm.close()
            raise
        self._lora_handles: list[object] = []

    def _piece(self, token: int) -> str:
        if token < 0:
            return ""
        return self.llm.detokenize([token], special=True).decode("utf-8", errors="replace")

    def render(self, messages: list[dict[str, str]]) -> str:
        return self.chat.render(messages, add_generation_prompt=True)

    def tokenize(self, text: str) -> list[int]:
        """Prompt text to tokens with exactly one BOS where the model wants one.

        Templates that write the BOS text themselves (Llama 3) would otherwise get a second one
        from the tokenizer.
        """
        tokens = self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        if self.add_bos and (not tokens or tokens[0] != self.bos_id):
            tokens.insert(0, self.bos_id)
        return tokens

    def prompt_tokens(self, messages: list[dict[str, str]]) -> list[int]:
        return self.tokenize(self.render(messages))

    def load_adapter(self, path: str | Path) -> object:
        """Load a LoRA adapter GGUF onto these weights and return its handle.

        The base weights stay loaded once; an adapter adds only its low-rank tensors, and it is
        applied per context (`set_context_adapters`), so one model serves every role. Check the
        file first (`adapters.check_adapter`) for a clear message; a NULL from llama.cpp is
        still reported here. Handles live until `close`.
        """
        import llama_cpp

        with quiet_stderr():
            handle = llama_cpp.llama_adapter_lora_init(
                self.llm._model.model, str(path).encode("utf-8")
            )
        if not handle:
            raise MaltError(
                f"llama.cpp could not load the LoRA adapter {path} for {self.path.name}"
            )
        self._lora_handles.append(handle)
        return handle

    def _free_adapters(self) -> None:
        """Detach and free adapters before the model: llama.cpp's model frees the ones left."""
        import llama_cpp

        handles = getattr(self, "_lora_handles", [])
        if handles:
            set_context_adapters(self.llm._ctx.ctx, [])
            for handle in handles:
                llama_cpp.llama_adapter_lora_free(handle)
            handles.clear()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._free_adapters()
        with contextlib.suppress(Exception):
            self.llm.close()
