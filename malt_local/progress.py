"""What a long operation tells its progress callback.

`malt run` (the trees, then the judge) and `malt eval` report the same facts after every stored
node or generation; the CLI turns them into a bar (`malt_local.cli._progress`), a test or the
bench reads them as numbers. The library never draws.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Progress:
    total: int
    done: int
    generated: int = 0  # made by this process (done also counts what was stored before)
    completion_tokens: int = 0
    started: float = field(default_factory=time.monotonic)
    questions_complete: int = 0  # `malt run`: questions whose whole tree is stored
    stage: str = ""  # what is being made ("trees", "judge"): a new stage, a new bar

    @property
    def tokens_per_second(self) -> float:
        elapsed = time.monotonic() - self.started
        return self.completion_tokens / elapsed if elapsed > 0 else 0.0


OnProgress = Callable[[Progress], None]
