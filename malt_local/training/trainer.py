"""One training stage (SFT or DPO of one role) with TRL, resumable from its checkpoints.

- **SFT** trains a fresh LoRA adapter on the base with the loss on the role's own turn only
  (prompt/completion rows, see data.py).
- **DPO** starts from the role's SFT model: the SFT adapter is merged into a copy of the base, and
  a fresh LoRA adapter is trained on top with no explicit reference model, so TRL's reference is
  that model with the new adapter switched off: exactly the SFT model, as in the paper (§4.3).
  At test time llama.cpp stacks the SFT and DPO adapters on the base (LoRA deltas add), which is
  the merged SFT model plus the DPO delta.
- **Checkpoints.** The Trainer saves a checkpoint (adapter, optimizer, scheduler, RNG state, step)
  every `save_steps` steps; Ctrl-C or SIGTERM asks the loop to save one at the end of the current
  step and stop; a `kill -9` loses at most the steps since the last one. A rerun resumes from the
  newest complete checkpoint (its `trainer_state.json` is written last), and the Trainer restores
  the data order and RNG, so the result equals an uninterrupted run's up to floating-point noise.
"""

from __future__ import annotations

import math
import re
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from malt_local.errors import MaltError
from malt_local.training.settings import TrainSettings

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# What the progress callback is told at each step: (step, total steps, last loss).
StepCallback = Callable[[int, int, float | None], None]


class TrainingInterrupted(Exception):
    """Ctrl-C or SIGTERM: a checkpoint was saved at `step`; the same command resumes."""

    def __init__(self, stage: str, step: int) -> None:
        super().__init__(stage, step)
        self.stage = stage
        self.step = step


@dataclass
class StageResult:
    steps: int
    losses: list[tuple[int, float]]
    seconds: float
    resumed_from_step: int
    rows: int
    extra: dict = field(default_factory=dict)
    # DPO only: TRL's logged reward margin (chosen minus rejected implicit reward) and the share
    # of pairs whose chosen side wins, by step. Whether DPO moved the model at all is read here
    # (a loss still at log 2 and margins near 0 mean it did not), not in the loss alone.
    margins: list[tuple[int, float]] = field(default_factory=list)
    reward_accuracies: list[tuple[int, float]] = field(default_factory=list)


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint under `folder` (the Trainer writes trainer_state.json
    last, so a checkpoint without it was cut short by a kill and is ignored)."""
    best: tuple[int, Path] | None = None
    if folder.is_dir():
        for child in folder.iterdir():
            m = CHECKPOINT.match(child.name)
            if m and (child / "trainer_state.json").is_file():
                step = int(m.group(1))
                if best is None or step > best[0]:
                    best = (step, child)
    return best[1] if best else None


class _StopOnSignal:
    """While active, the first SIGINT/SIGTERM sets a flag the training loop checks at the end of
    each step; a second SIGINT interrupts at once (the last checkpoint stays)."""

    def __init__(self) -> None:
        self.requested = threading.Event()
        self._old: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested.set()

    def __enter__(self) -> _StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _callback(stop: _StopOnSignal, on_step: StepCallback | None):
    from transformers import TrainerCallback

    class MaltCallback(TrainerCallback):
        last_loss: float | None = None

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.last_loss = float(logs["loss"])

        def on_step_end(self, args, state, control, **kwargs):
            if on_step:
                on_step(state.global_step, state.max_steps, self.last_loss)
            if stop.requested.is_set():
                control.should_save = True
                control.should_training_stop = True

    return MaltCallback()


def _lora_config(settings: TrainSettings):
    from peft import LoraConfig

    return LoraConfig(
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=[
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],
        bias="none",
        task_type="CAUSAL_LM",
    )


def _common_args(settings: TrainSettings, out: Path, device: str, report_to: str | None) -> dict:
    return {
        "output_dir": str(out),
        "per_device_train_batch_size": settings.batch_size,
        "gradient_accumulation_steps": settings.grad_accum,
        "max_steps": settings.max_steps,
        "max_length": settings.max_length,
        "logging_steps": 1,
        "save_strategy": "steps",
        "save_steps": settings.save_steps,
        "save_total_limit": 2,
        "seed": settings.seed,
        "data_seed": settings.seed,
        "report_to": report_to or "none",
        "disable_tqdm": True,
        "use_cpu": device == "cpu",
        "bf16": device == "cuda" and _bf16(),
        "dataloader_num_workers": 0,
        "gradient_checkpointing": device == "cuda",  # memory on big models; CPU: speed
    }


def _bf16() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def train_stage(
    stage: str,
    name: str,
    model,
    tokenizer,
    rows: list[dict],
    settings: TrainSettings,
    work: Path,
    device: str,
    *,
    report_to: str | None = None,
    on_step: StepCallback | None = None,
) -> tuple[object, StageResult]:
    """Train one stage into `work` (checkpoints) and return (the trained PEFT model, result).

    `model` is the base for SFT, the merged SFT model for DPO. Raises TrainingInterrupted
    after saving a checkpoint when asked to stop."""
    from datasets import Dataset
    from transformers.trainer_callback import PrinterCallback

    resume = latest_checkpoint(work)
    resumed_from = _checkpoint_step(resume)
    dataset = Dataset.from_list(rows)
    stop = _StopOnSignal()
    common = _common_args(settings, work, device, report_to)
    if stage == "sft":
        from trl import SFTConfig as Config
        from trl import SFTTrainer as Trainer

        specific = {
            "learning_rate": settings.lr,
            "num_train_epochs": settings.epochs,
            "completion_only_loss": True,
        }
    else:
        from trl import DPOConfig as Config
        from trl import DPOTrainer as Trainer

        specific = {
            "learning_rate": settings.dpo_lr,
            "num_train_epochs": settings.dpo_epochs,
            "beta": settings.beta,
        }
    trainer = Trainer(
        model=model,
        args=Config(**common, **specific),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=_lora_config(settings),
    )
    if len(trainer.train_dataset) == 0:
        raise MaltError(
            f"{name}: every row is cut away by --max-length {settings.max_length} (TRL drops rows "
            "whose turn to learn does not fit): raise --max-length"
        )
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(_callback(stop, on_step))
    start = time.monotonic()
    with stop:
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    seconds = time.monotonic() - start
    state = trainer.state
    if stop.requested.is_set() and state.global_step < state.max_steps:
        raise TrainingInterrupted(name, state.global_step)
    return trainer.model, StageResult(
        steps=state.global_step,
        losses=_logged(state.log_history, "loss"),
        margins=_logged(state.log_history, "rewards/margins"),
        reward_accuracies=_logged(state.log_history, "rewards/accuracies"),
        seconds=seconds,
        resumed_from_step=resumed_from,
        rows=len(rows),
    )


def _logged(history: list[dict], key: str) -> list[tuple[int, float]]:
    """(step, value) of one logged quantity, the steps that logged a finite value."""
    return [
        (int(e["step"]), float(e[key]))
        for e in history
        if key in e and "step" in e and math.isfinite(float(e[key]))
    ]


def _checkpoint_step(path: Path | None) -> int:
    if path is None:
        return 0
    m = CHECKPOINT.match(path.name)
    return int(m.group(1)) if m else 0


def merged_sft_model(base_model, sft_dir: Path):
    """The base with the role's SFT adapter merged in: DPO's starting point and reference."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base_model, str(sft_dir)).merge_and_unload()
