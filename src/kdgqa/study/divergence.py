"""Stopping a run whose loss blew up, and only then.

A healthy run's loss falls, often close to zero, and then jumps by large factors from step to
step (0.002 -> 0.06 is a 30x jump and perfectly normal; so is 0.003 -> 0.09 when uptraining
starts from a model that already fits its data). A guard relative to the running mean, or to
a small starting loss, stops such runs at random. A blow-up is a loss that is not finite, or
one far above both where the run started and chance level: the guard compares each loss
with ``factor`` times the largest of its running mean, the mean loss of the run's first
:data:`WARMUP_STEPS` steps and the loss of a uniform prediction (``ln C`` for C classes), so a
loss below chance level never stops a run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

__all__ = ["WARMUP_STEPS", "DivergenceGuard", "TrainingDiverged"]

#: Steps whose mean loss is "what the run started from"; nothing is judged before they pass.
WARMUP_STEPS = 20


class TrainingDiverged(RuntimeError):
    """The loss became non-finite or exploded; the message says when and what was kept."""


@dataclass
class DivergenceGuard:
    """Watches a run's losses (one call per step, in order); raises on a blow-up."""

    factor: float
    #: The loss of a uniform prediction (``ln C``); nothing below ``factor`` times it stops.
    chance: float = 0.0
    running: float | None = None
    start_sum: float = 0.0
    start_steps: int = 0

    @property
    def start(self) -> float | None:
        """The mean loss of the run's first steps (None before any)."""
        return self.start_sum / self.start_steps if self.start_steps else None

    def limit(self) -> float:
        """The largest loss the next step may have (inf while warming up)."""
        if self.start_steps < WARMUP_STEPS or self.running is None:
            return math.inf
        return self.factor * max(self.running, self.start or 0.0, self.chance)

    def check(self, loss: float, grad_norm: float, *, where: str) -> None:
        """Record ``loss``; raise :class:`TrainingDiverged` when it or ``grad_norm`` is not
        finite or it exceeds :meth:`limit` (the message: ``loss X <where> ...``)."""
        if not math.isfinite(loss) or not math.isfinite(grad_norm):
            raise TrainingDiverged(f"loss {loss:.4g} {where} is not finite (gradient norm "
                                   f"{grad_norm:.4g})")
        limit = self.limit()
        if loss > limit:
            raise TrainingDiverged(
                f"loss {loss:.4g} {where} exceeds {self.factor:g} x the largest of its running "
                f"mean {self.running:.4g}, its starting loss {self.start:.4g} and chance level "
                f"{self.chance:.4g}")
        if self.start_steps < WARMUP_STEPS:
            self.start_sum += loss
            self.start_steps += 1
        self.running = loss if self.running is None else 0.95 * self.running + 0.05 * loss

    def state(self) -> dict[str, Any]:
        return {"running": self.running, "start_sum": self.start_sum,
                "start_steps": self.start_steps}

    def load_state(self, state: Any) -> None:
        """Restore :meth:`state`; a checkpoint of an older kdgqa held only the running mean."""
        if isinstance(state, dict):
            self.running = state.get("running")
            self.start_sum = float(state.get("start_sum", 0.0))
            self.start_steps = int(state.get("start_steps", 0))
        else:  # the running mean alone: treat it as the start, warm-up over
            self.running = None if state is None else float(state)
            self.start_sum = 0.0 if state is None else float(state) * WARMUP_STEPS
            self.start_steps = 0 if state is None else WARMUP_STEPS
