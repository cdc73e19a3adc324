"""PEFT LoRA adapter -> llama.cpp LoRA GGUF, written with the `gguf` package.

llama.cpp reads a LoRA adapter as a GGUF file with ``general.type = adapter``,
``adapter.type = lora``, ``adapter.lora.alpha``, and for each adapted weight W of the model a
pair ``NAME.lora_a`` / ``NAME.lora_b`` named after W's GGUF tensor (``blk.N.attn_q.weight``).
llama.cpp's own converter (``convert_lora_to_gguf.py``) needs a llama.cpp checkout and, without
``--base``, the network; this one needs neither. It was checked against llama.cpp's converter:
the tensors were bit-identical.

Layouts: PEFT stores ``lora_A`` as [rank, in] and ``lora_B`` as [out, rank] (torch order), which
in GGUF's reversed dimension order is exactly llama.cpp's [in, rank] and [rank, out], so the
arrays are written as they are. One transform is needed: llama.cpp's llama graph expects the
query and key projections with their rows permuted for its RoPE layout (convert_hf_to_gguf's
``LlamaModel.permute``), and the transformers weights are in the Hugging Face layout. The LoRA
delta is ``B @ A``, whose rows are B's rows, so the same permutation applied to ``lora_B`` of
``q_proj`` and ``k_proj`` gives the delta llama.cpp needs.

Tensors are written as float32: the adapter is small next to the base, and f32 keeps the
conversion exact.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from malt_local.errors import MaltError

# transformers model_type -> (GGUF architecture, whether q/k need llama's RoPE permutation).
ARCHITECTURES = {
    "llama": ("llama", True),
    "mistral": ("llama", True),
    "qwen2": ("qwen2", False),
    "qwen3": ("qwen3", False),
    # Gemma 3's text model (Gemma3ForCausalLM); llama.cpp's converter permutes no q/k for it.
    "gemma3_text": ("gemma3", False),
}

# Hugging Face module name -> GGUF tensor name inside a block.
_MODULES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_PEFT_KEY = re.compile(
    r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn\.\w+|mlp\.\w+)\.lora_([AB])\.weight$"
)


@dataclass(frozen=True)
class BaseShape:
    """What the conversion needs of the base model's config."""

    model_type: str
    n_head: int
    n_head_kv: int

    @classmethod
    def from_config(cls, config: dict) -> BaseShape:
        model_type = str(config.get("model_type", ""))
        if model_type not in ARCHITECTURES:
            raise MaltError(
                f"architecture '{model_type}' is not supported for training (supported: "
                f"{', '.join(sorted(ARCHITECTURES))})"
            )
        n_head = int(config["num_attention_heads"])
        return cls(model_type, n_head, int(config.get("num_key_value_heads") or n_head))

    @property
    def gguf_arch(self) -> str:
        return ARCHITECTURES[self.model_type][0]


def rope_permute(rows: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder the output rows of a q/k projection from the Hugging Face layout (two halves
    per head) to llama.cpp's (interleaved pairs), as convert_hf_to_gguf does for the weights."""
    out = rows.shape[0]
    return (
        rows.reshape(n_head, 2, out // n_head // 2, *rows.shape[1:])
        .swapaxes(1, 2)
        .reshape(rows.shape)
    )


def gguf_tensors(weights: dict[str, np.ndarray], shape: BaseShape) -> dict[str, np.ndarray]:
    """PEFT's tensors (names as `save_pretrained` writes them) -> llama.cpp's LoRA tensors."""
    out: dict[str, np.ndarray] = {}
    permute = ARCHITECTURES[shape.model_type][1]
    for key in sorted(weights):
        m = _PEFT_KEY.match(key)
        if not m or m.group(2) not in _MODULES:
            raise MaltError(f"adapter tensor '{key}' has no llama.cpp counterpart")
        layer, module, ab = m.groups()
        array = np.asarray(weights[key], dtype=np.float32)
        if ab == "B" and permute and module in ("self_attn.q_proj", "self_attn.k_proj"):
            heads = shape.n_head if module == "self_attn.q_proj" else shape.n_head_kv
            array = rope_permute(array, heads)
        name = f"blk.{layer}.{_MODULES[module]}.weight.lora_{ab.lower()}"
        out[name] = np.ascontiguousarray(array)
    if not out:
        raise MaltError("the adapter has no LoRA tensors")
    return out


def convert(peft_dir: Path, dest: Path, shape: BaseShape) -> Path:
    """Write `dest` (a LoRA GGUF) from the PEFT folder `peft_dir`; the file appears whole."""
    import gguf
    from safetensors.numpy import load_file

    config = json.loads((peft_dir / "adapter_config.json").read_text(encoding="utf-8"))
    if config.get("use_rslora") or config.get("use_dora"):
        raise MaltError("rsLoRA and DoRA adapters have no llama.cpp LoRA equivalent")
    tensors = gguf_tensors(load_file(str(peft_dir / "adapter_model.safetensors")), shape)
    tmp = dest.with_name(dest.name + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), shape.gguf_arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(config["lora_alpha"]))
    for name, array in tensors.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, dest)
    return dest
