"""Shared timing of the benchmarks: the sides alternate in rounds (ABBA), one ratio per round.

On a shared machine the load changes while a benchmark runs, so timing one side after the other
in separate blocks measures the load as much as the code. Here every round runs the sides in a
palindromic order (two sides: A B B A; three: A B C C B A), so that a load rising or falling
linearly during a round weighs on each side alike; each round gives one cost per side (the sum of
its two runs) and one ratio per pair of sides, and the report is the median ratio over the rounds
with its range (lowest, highest). The machine's load average at the start is printed, so that a
reader can discount a run made on a busy machine.

Used by every ``bench/*.py``; a side is a function that does its work once and returns the
seconds it spent on the measured part (so that a side can leave its own set-up out of the
timing, e.g. a loader's worker start-up).
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable, Sequence


def load_line() -> str:
    """``load average 1.23 0.98 0.75 (1, 5, 15 min) on 2 CPUs, <cpu model>``: for the first line of a bench."""
    one, five, fifteen = os.getloadavg()
    return (f"load average {one:.2f} {five:.2f} {fifteen:.2f} (1, 5, 15 min) on {os.cpu_count()} CPUs, "
            f"{cpu_model()}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (``platform.processor()`` elsewhere)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def timed(fn: Callable[[], object]) -> Callable[[], float]:
    """A side that times the whole of ``fn()`` (its return value is dropped)."""

    def side() -> float:
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    return side


def run_rounds(sides: dict[str, Callable[[], float]], rounds: int, warmup: int = 0,
               log: Callable[[str], None] | None = print, first: int = 1) -> list[dict[str, float]]:
    """Run ``rounds`` rounds of the ``sides`` in palindromic order; per round, each side's seconds.

    ``warmup`` untimed calls of each side come first (first passes pay one-off set-up costs).
    ``log``: called with one line per round (None: silent), rounds numbered from ``first``. Returns one ``{side: seconds}`` per
    round, the seconds being the sum of the side's two runs in that round.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    names = list(sides)
    for _ in range(warmup):
        for name in names:
            sides[name]()
    out = []
    for r in range(rounds):
        spent = dict.fromkeys(names, 0.0)
        for name in names + names[::-1]:
            spent[name] += sides[name]()
        out.append(spent)
        if log:
            log(f"  round {first + r}: " + ", ".join(f"{n} {s:.3f} s" for n, s in spent.items()))
    return out


def ratios(per_round: Sequence[dict[str, float]], baseline: str, side: str) -> list[float]:
    """Per round: baseline seconds / side seconds (> 1: ``side`` is faster, for equal work)."""
    return [r[baseline] / r[side] for r in per_round]


def summary(values: Sequence[float]) -> tuple[float, float, float]:
    """(median, lowest, highest)."""
    return statistics.median(values), min(values), max(values)


def ratio_line(label: str, values: Sequence[float], goal: str = "", digits: int = 2) -> str:
    """``label: 1.18x (range 1.05-1.30, 5 rounds) goal``: the line a bench prints for a ratio."""
    med, lo, hi = summary(values)
    f = f".{digits}f"
    tail = f"  [{goal}]" if goal else ""
    return f"{label}: {med:{f}}x (range {lo:{f}}-{hi:{f}}, median of {len(values)} rounds){tail}"
