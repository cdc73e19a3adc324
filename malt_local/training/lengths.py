"""How long each training row is in tokens, and how many `--max-length` would cut.

TRL keeps the start of a row longer than `max_length`: an SFT row loses the end of the role's
turn (the final answer and the end-of-turn token the role must learn to stop on), and a DPO pair
compares its chosen and rejected texts cut to the same prefix. A node's context can reach
3 x `--max-tokens` plus the question and the prompts, so a limit that looks roomy can still cut
many rows, and TRL says nothing (it only drops rows with no completion token left).

So before any weights load, every row of every stage to train is tokenized exactly as TRL will
(the base's tokenizer and chat template over the prompt and the completion), the rows longer
than the limit are counted, and a stage where more than `max_cut_share` of them would be cut is
refused. Without `--max-length` the limit is the stage's longest row: nothing is cut. That costs
no memory on short rows (TRL pads each batch to its own longest row, not to `max_length`) and
the rows were generated inside the model's context, so the model can take them.
"""

from __future__ import annotations

from dataclasses import dataclass

from malt_local.errors import MaltError

# More rows cut than this share of a stage is refused; a few outliers cut is allowed, so one long
# row does not force a limit (and memory) sized for it alone.
MAX_CUT_SHARE = 0.1


@dataclass(frozen=True)
class StageLengths:
    """One stage's rows against its token limit, as recorded in the adapters' manifest."""

    rows: int
    longest: int  # tokens of the longest row
    max_length: int  # the limit the stage trains with
    cut: int  # rows longer than max_length, whose end TRL cuts off

    def record(self) -> dict:
        return {
            "max_length": self.max_length,
            "longest_row": self.longest,
            "rows_cut": self.cut,
        }


def _tokens(tokenizer, messages: list[dict]) -> int:
    """Tokens of a conversation as TRL tokenizes it (trl.data_utils._tokenize: the chat
    template, tokenized, the tokenizer's own template)."""
    ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    return len(ids)


def row_length(tokenizer, stage: str, row: dict) -> int:
    """Tokens TRL trains on for one row: prompt + completion for SFT; for DPO the longer of
    prompt + chosen and prompt + rejected (each is cut to max_length on its own)."""
    if stage == "sft":
        return _tokens(tokenizer, row["prompt"] + row["completion"])
    return max(
        _tokens(tokenizer, row["prompt"] + row["chosen"]),
        _tokens(tokenizer, row["prompt"] + row["rejected"]),
    )


def measure(
    tokenizer,
    name: str,
    stage: str,
    rows: list[dict],
    max_length: int | None,
    max_cut_share: float = MAX_CUT_SHARE,
) -> StageLengths:
    """Count the rows of stage `name` longer than `max_length` (None: the longest row, so
    none); refuse the stage when more than `max_cut_share` of its rows would be cut."""
    lengths = [row_length(tokenizer, stage, row) for row in rows]
    longest = max(lengths, default=0)
    limit = max_length if max_length is not None else max(longest, 16)
    cut = sum(1 for n in lengths if n > limit)
    if lengths and cut / len(lengths) > max_cut_share:
        raise MaltError(
            f"{name}: {cut} of {len(lengths)} rows are longer than --max-length {limit} tokens "
            f"(the longest has {longest}), and TRL would cut off their ends (the answer, the end "
            f"of the turn): raise --max-length to {longest}, leave it out to take the longest "
            f"row, or allow more than {max_cut_share:.0%} cut rows with --max-cut-share"
        )
    return StageLengths(len(lengths), longest, limit, cut)


def check_share(value: float) -> None:
    """`--max-cut-share` is a share of a stage's rows."""
    if not 0 <= value <= 1:
        raise MaltError("--max-cut-share must be in [0, 1]")
