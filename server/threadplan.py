"""How many torch threads a lone forward pass gets: all usable ones, or one when that proved faster.

A multi-thread pass waits at every OpenMP barrier for its slowest thread. When a neighbour (another pod
on the node, a noisy process) keeps a core busy, one of our threads is descheduled for whole time slices
and every barrier waits for it: on 2 cores with a busy loop beside the server, a one-sentence request
went from ~22 ms on one thread to 124-937 ms on two. So the plan measures both: it keeps a running
average of seconds per estimated token for each choice, uses the faster one, and tries the other one
every `explore_every` passes, so it moves back once the neighbour is gone.
"""

from __future__ import annotations


class ThreadPlan:
    def __init__(self, threads: int, *, explore_every: int = 32, smoothing: float = 0.3) -> None:
        self.options = sorted({max(1, threads), 1}, reverse=True)
        self._cost: dict[int, float | None] = dict.fromkeys(self.options)
        self._explore_every = explore_every
        self._smoothing = smoothing
        self._passes = 0

    def choose(self) -> int:
        """Threads for the next lone pass."""
        if len(self.options) == 1:
            return self.options[0]
        self._passes += 1
        untried = [option for option in self.options if self._cost[option] is None]
        if untried:
            return untried[0]
        best = self.best()
        if self._passes % self._explore_every == 0:
            return next(option for option in self.options if option != best)
        return best

    def best(self) -> int:
        measured = {option: cost for option, cost in self._cost.items() if cost is not None}
        return min(measured, key=measured.__getitem__) if measured else self.options[0]

    def observe(self, threads: int, seconds: float, tokens: int) -> None:
        """A lone pass on `threads` took `seconds` for about `tokens` tokens."""
        if threads not in self._cost:
            return
        per_token = seconds / max(tokens, 1)
        old = self._cost[threads]
        # An exploring pass replaces the other choice's stale average: the neighbour may have come or gone
        # since. The choice in use is measured on every pass, so its average smooths out the noise.
        if old is None or threads != self.best():
            self._cost[threads] = per_token
        else:
            self._cost[threads] = old + self._smoothing * (per_token - old)
