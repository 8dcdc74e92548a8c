"""Which step shapes get a CUDA graph: the most used ones, each on its own.

A captured graph holds its shape's activations in the graph pool, so only `capacity` are kept. A
shape earns a graph by being seen (its first step runs eagerly to warm up, so a shape is captured from
its second step on) and, when the job said in advance how often each shape comes
(`expected`: the loop counts its batches' shapes before step one), by coming often enough that the
capture repays itself (`min_steps`). When every slot is taken, a shape that has been (or will be)
used more than the least used graph takes that graph's place, so a long job ends up with the graphs
it replays most, not the first shapes it happened to see.

A shape whose capture failed, or whose first replay disagreed with the eager step, is disabled: it
runs eagerly for the rest of the job while every other graph keeps working.

This module only keeps the books (no CUDA calls), so its policy is tested on any machine.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Generic, TypeVar

Key = tuple[int, int]  # (packed tokens, loss rows) of a static step
G = TypeVar("G")


class GraphCache(Generic[G]):
    def __init__(self, capacity: int, *, expected: Mapping[Key, int] | None = None, min_steps: int = 3) -> None:
        if capacity < 0 or min_steps < 2:
            raise ValueError("capacity must be >= 0 and min_steps >= 2 (a shape's first step warms it up)")
        self.capacity, self.min_steps = capacity, min_steps
        self.expected: Mapping[Key, int] = expected or {}
        self.seen: Counter[Key] = Counter()
        self.graphs: dict[Key, G] = {}
        self.disabled: dict[Key, str] = {}  # shape -> why it stays eager
        self.evicted = 0

    def count(self, key: Key) -> None:
        """One step of `key` is about to run."""
        self.seen[key] += 1

    def get(self, key: Key) -> G | None:
        return self.graphs.get(key)

    def priority(self, key: Key) -> int:
        """How much a graph of `key` is worth: its expected steps when known, else the steps seen so far."""
        return max(self.expected.get(key, 0), self.seen[key])

    def wants(self, key: Key) -> bool:
        """Whether to capture `key` now (it was warmed up by an eager step, and it pays or was not planned)."""
        if key in self.graphs or key in self.disabled or self.seen[key] < 2 or self.capacity == 0:
            return False
        if self.expected and self.expected.get(key, 0) < self.min_steps:
            return False  # planned, and too rare to repay a capture
        if len(self.graphs) < self.capacity:
            return True
        return self.priority(key) > self.priority(self._least_used())

    def make_room(self) -> G | None:
        """Free a slot for a capture (`wants` said yes): the least used graph, returned to be released."""
        if len(self.graphs) < self.capacity:
            return None
        victim = self._least_used()
        self.evicted += 1
        return self.graphs.pop(victim)

    def add(self, key: Key, graph: G) -> None:
        self.graphs[key] = graph

    def disable(self, key: Key, reason: str) -> G | None:
        """`key` runs eagerly from now on; its graph (if any) is returned to be released."""
        self.disabled[key] = reason
        return self.graphs.pop(key, None)

    def _least_used(self) -> Key:
        return min(self.graphs, key=self.priority)
