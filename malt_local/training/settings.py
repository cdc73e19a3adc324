"""`malt train`'s settings: one dataclass, its defaults and why each one is what it is.

The paper (§4.3, App. A.9) trains on a hosted service and reports only a batch size of 8, a DPO
β of 0.2, "learning rate multipliers" of 0.1 and 1–10 epochs "depending on the data size". The
rest is not reported; the defaults below are common LoRA starting points, each with its reason.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

from malt_local.errors import MaltError

STAGES = ("sft", "dpo")
DEVICES = ("auto", "cpu", "cuda", "mps")
REPORTERS = ("tensorboard", "wandb")


@dataclass(frozen=True)
class TrainSettings:
    """Hyperparameters of one `malt train`; every field lands in the adapters' manifest."""

    epochs: float = 3.0  # paper: 1-10 by data size; 3 is a middle for a few thousand rows
    dpo_epochs: float = 1.0  # paper: DPO "did not necessarily converge"; one pass
    max_steps: int = -1  # -1: as many as the epochs take; a cap for quick runs and tests
    lr: float = 1e-4  # not reported (multiplier 0.1 of a hidden base); usual LoRA SFT rate
    dpo_lr: float = 5e-6  # not reported; DPO on top of SFT needs a far smaller step
    batch_size: int = 8  # the paper's
    grad_accum: int = 1
    lora_r: int = 16  # not reported; 16 is the usual middle
    lora_alpha: int = 32  # not reported; 2 x r, the usual pairing
    lora_dropout: float = 0.05  # not reported; the PEFT examples' value
    # Tokens a row; longer rows lose their end. None: each stage's longest row, so nothing is
    # cut (TRL pads a batch to its own longest row, so the limit costs no memory on short rows).
    max_length: int | None = None
    beta: float = 0.2  # the paper's DPO beta
    seed: int = 0
    save_steps: int = 50  # checkpoint every N optimizer steps (Ctrl-C also saves one)

    def validate(self) -> None:
        checks = [
            (self.epochs > 0, "--epochs must be above 0"),
            (self.dpo_epochs > 0, "--dpo-epochs must be above 0"),
            (self.max_steps == -1 or self.max_steps >= 1, "--max-steps must be 1 or more"),
            (self.lr > 0, "--lr must be above 0"),
            (self.dpo_lr > 0, "--dpo-lr must be above 0"),
            (self.batch_size >= 1, "--batch-size must be 1 or more"),
            (self.grad_accum >= 1, "--grad-accum must be 1 or more"),
            (self.lora_r >= 1, "--lora-r must be 1 or more"),
            (self.lora_alpha > 0, "--lora-alpha must be above 0"),
            (0 <= self.lora_dropout < 1, "--lora-dropout must be in [0, 1)"),
            (self.max_length is None or self.max_length >= 16, "--max-length must be 16 or more"),
            (self.beta > 0, "--beta must be above 0"),
            (self.save_steps >= 1, "--save-steps must be 1 or more"),
        ]
        for ok, message in checks:
            if not ok:
                raise MaltError(message)

    def record(self) -> dict:
        return asdict(self)


def fingerprint(*parts: object) -> str:
    """A short digest of JSON-able parts: what makes two trainings the same one."""
    text = json.dumps(parts, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
