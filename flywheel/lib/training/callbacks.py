"""Trainer callbacks (transformers' ``TrainerCallback``): progress lines and step timing.

The trainers run with ``disable_tqdm=True``; transformers then adds its ``PrinterCallback``, which
prints every log as a raw ``{'loss': ...}`` dict. :func:`progress_lines` swaps it for
:class:`ProgressLinesCallback`, which reports through the project's one progress helper
(``flywheel.lib.progress.Progress``): "train: 40/120 steps (33%), 0.83/s, ~96s left, loss 0.81".
:class:`StepTimer` measures optimizer steps (the first carries warm-up costs and is left out of
the average); the bi-encoder's time budget is planned from it.
"""

from __future__ import annotations

import time
from typing import Callable, Optional

from transformers import PrinterCallback, TrainerCallback

from flywheel.lib.progress import Progress, Say


class StepTimer(TrainerCallback):
    """Seconds per optimizer step; ``seconds_per_step`` averages steps 2..n (warm-up excluded)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.times: list[float] = []
        self._started: float | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        self._started = self.clock()

    def on_step_end(self, args, state, control, **kwargs):
        if self._started is not None:
            self.times.append(self.clock() - self._started)

    @property
    def seconds_per_step(self) -> float:
        steady = self.times[1:] or self.times
        return sum(steady) / len(steady) if steady else float("nan")


class ProgressLinesCallback(StepTimer):
    """Training progress as the project's progress lines: steps done, rate, time left, loss.

    After ``estimate_after`` steps it also says the measured seconds per step and the estimate for
    the whole run (against ``budget_s`` when given)."""

    def __init__(self, label: str, say: Optional[Say], *, every_s: float = 10.0, estimate_after: int = 3,
                 budget_s: float | None = None) -> None:
        super().__init__()
        self.label = label
        self.say = say
        self.every_s = every_s
        self.estimate_after = estimate_after
        self.budget_s = budget_s
        self.meter: Progress | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.meter = Progress(self.label, state.max_steps, self.say, every_s=self.every_s, unit="steps")

    def on_step_end(self, args, state, control, **kwargs):
        super().on_step_end(args, state, control, **kwargs)
        if self.say and self.estimate_after and len(self.times) == self.estimate_after:
            per_step = self.seconds_per_step
            budget = f" (budget {self.budget_s:.0f}s)" if self.budget_s else ""
            self.say(f"{self.label}: measured {per_step:.1f}s/step over steps 2-{self.estimate_after}; "
                     f"estimate {per_step * state.max_steps:.0f}s for {state.max_steps} steps{budget}")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.meter is not None and logs and "loss" in logs:
            self.meter.update(state.global_step, force=state.global_step >= state.max_steps,
                              detail=f"loss {logs['loss']:.4f}")


def progress_lines(trainer, callback: TrainerCallback | None = None):
    """Remove the trainer's raw-dict printer; add ``callback`` (e.g. a ProgressLinesCallback)."""
    trainer.remove_callback(PrinterCallback)
    if callback is not None:
        trainer.add_callback(callback)
    return trainer
