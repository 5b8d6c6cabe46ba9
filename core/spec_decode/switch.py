"""Speculation only while it pays.

A verifying step is synchronous (proposals need the newest token on the host) and a draft model costs forward
passes of its own; when proposals are rarely accepted, plain decoding (asynchronous where the platform allows)
is faster. Every WINDOW speculating steps the tokens they emitted per decoding row (1 + accepted) are weighed
against what proposing cost (the step's time over its time without proposing); below `margin` times that cost
the engine decodes without proposals for a pause of steps, doubled at each failed try (up to MAX_PAUSE), then
tries again; a try with nothing at all accepted after EARLY steps ends there. An engine that runs dry starts the
next batch speculating, the pause still as long as the last failures made it. The margin stands for what synchronous steps lose: 1.1 where plain decoding would be asynchronous,
1.02 where it is synchronous anyway (the CPU). The output is the same either way: only its speed depends on the
switch.
"""
from __future__ import annotations


class SpecSwitch:
    WINDOW, EARLY, FIRST_PAUSE, MAX_PAUSE = 16, 4, 64, 1024

    def __init__(self, margin: float = 1.1):
        self.margin = margin
        self.pause = self.FIRST_PAUSE
        self.wake()

    def wake(self) -> None:
        """Speculate from the next step (the engine ran dry); the pause keeps its length."""
        self.on = True
        self.steps_off = 0  # steps still to run without proposals
        self._clear()

    def _clear(self) -> None:
        self.steps = self.rows = self.accepted = 0
        self.t_step = self.t_propose = 0.0

    def record(self, rows: int, accepted: int, t_step: float, t_propose: float) -> None:
        """One step: decoding rows that sampled, proposals accepted, the step's wall time and the part of it spent
        proposing. May turn speculation off, or back on once a pause is over."""
        if not self.on:
            self.steps_off -= 1
            self.on = self.steps_off <= 0
            return
        if rows == 0:
            return
        self.steps += 1
        self.rows += rows
        self.accepted += accepted
        self.t_step += t_step
        self.t_propose += t_propose
        if self.steps < self.WINDOW and not (self.steps == self.EARLY and self.accepted == 0):
            return
        gain = (self.rows + self.accepted) / self.rows
        cost = self.t_step / max(1e-9, self.t_step - self.t_propose)
        if gain < self.margin * cost:
            self.on, self.steps_off = False, self.pause
            self.pause = min(2 * self.pause, self.MAX_PAUSE)
        else:
            self.pause = self.FIRST_PAUSE
        self._clear()
