"""A training run's time left, estimated so that it reads right: smooth, and following real changes.

Dividing the time so far by the steps so far gives an ETA that jumps about (1:02, 0:57, 0:36, 0:01,
0:24 over ten steps): the first steps' model load and compilation weigh on it for the whole run, and
every slow step (a checkpoint written, an evaluation) shows at once. Here:

- The first `warmup_steps` steps of a session are not timed: they load kernels, compile, capture
  CUDA graphs, and say nothing about the steps to come.
- The rate comes from samples of at least `min_sample_s` of wall time (one step when a step takes
  longer). On a GPU most steps only queue work and return at once, and the step that reads the loss
  back waits for all of it: timed one by one, steps alternate between ~0 and many times their cost.
  Timed over a second or more, the queue evens out.
- Until the first whole sample, the part gathered so far gives the rate, read at the steps that end in a
  host sync: the logging steps (every `log_every`-th, and the last; every step on a CPU). There the queue
  has drained, so the time is the steps' real cost. A short job (a few steps, or a few seconds) thus
  shows an ETA from its first logging step after the warm-up, not only at the end.
- A sample's seconds per step is smoothed exponentially (`alpha`), after clipping it to at most
  `max_ratio` times (and at least 1/`max_ratio` of) the smoothed value: one checkpoint write moves the
  rate a little, not by its whole length, while a lasting change still gets through in a few samples.
- What is shown is damped: between two updates it counts down with the clock, and it moves from that
  towards the raw estimate (steps left x smoothed step time) by at most `max_rise` of itself upwards
  (plus two steps' time, so that small values can move) and `max_fall` downwards, per update.
  A rising ETA is what erodes trust ("it said a minute, now it says two"), so it may rise slowly and
  fall faster; a real slowdown is still followed, geometrically, within a few tens of steps.

The estimator keeps no clock of its own: callers pass the time (`time.perf_counter()`), and tests
pass made-up times.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class EtaEstimator:
    total_steps: int
    warmup_steps: int = 2  # untimed at the start of each session (a resumed run starts a new estimator)
    min_sample_s: float = 2.0
    alpha: float = 0.2  # weight of the newest sample: ~5 samples of memory
    max_ratio: float = 2.0
    max_rise: float = 0.05  # of the shown value, per update
    max_fall: float = 0.25
    log_every: int = 1  # the loop's: every `log_every`-th step reads the loss back, so its time is real
    _seen: int = field(default=0, init=False)  # updates so far
    _last_at: float | None = field(default=None, init=False)  # time of the last update
    _last_step: int = field(default=0, init=False)
    _sample_steps: int = field(default=0, init=False)  # the sample being gathered
    _sample_s: float = field(default=0.0, init=False)
    _step_s: float | None = field(default=None, init=False)  # smoothed seconds per step
    _early_step_s: float | None = field(default=None, init=False)  # the partial first sample's, at a sync
    _shown: float | None = field(default=None, init=False)

    def update(self, step: int, now: float) -> float | None:
        """The ETA (seconds) after `step` (1-based, across epochs) finished at time `now`; None while the
        rate is not known yet (the warm-up steps, then until a timed step ends at a logging step). 0 once
        the last step is done."""
        self._seen += 1
        steps = step - self._last_step
        elapsed = 0.0 if self._last_at is None else max(now - self._last_at, 0.0)
        first = self._last_at is None
        self._last_at, self._last_step = now, step
        if step >= self.total_steps:
            self._shown = 0.0
            return 0.0
        if self._seen <= self.warmup_steps or first or steps <= 0:
            return None  # a warm-up step (or the first step seen): its time is not a rate
        self._sample_steps += steps
        self._sample_s += elapsed
        if self._sample_s >= self.min_sample_s:
            self._add_sample(self._sample_s / self._sample_steps)
            self._sample_steps, self._sample_s = 0, 0.0
        elif self._step_s is None and step % self.log_every == 0:
            # No whole sample yet, but this step waited for the queue: the part so far is a real rate.
            self._early_step_s = self._sample_s / self._sample_steps
        step_s = self._step_s if self._step_s is not None else self._early_step_s
        if step_s is None:
            return None  # no synced step timed yet: the steps so far may only have queued GPU work
        raw = (self.total_steps - step) * step_s
        if self._shown is None:
            self._shown = raw
            return raw
        expected = max(self._shown - elapsed, 0.0)  # the clock went on
        # Two steps' time on top: one for the clock's count-down, one so that a value shown too low (the
        # clock ran past it) still climbs, where a bound relative to itself alone would keep it near 0.
        high = expected * (1 + self.max_rise) + 2 * step_s
        low = expected * (1 - self.max_fall)
        self._shown = min(max(raw, low), high)
        return self._shown

    def _add_sample(self, step_s: float) -> None:
        if self._step_s is None:
            self._step_s = step_s
            return
        clipped = min(max(step_s, self._step_s / self.max_ratio), self._step_s * self.max_ratio)
        self._step_s += self.alpha * (clipped - self._step_s)
