"""When each fragment starts and finishes its outer sync (Streaming DiLoCo, docs/design.md §3).

Conventions, shared by every caller:
- `step` counts COMPLETED inner steps: after the first inner step, step == 1. Step 0 is
  "before training" and nothing happens there.
- Fragment p has offset t_p = (p * H) // P and STARTS its outer sync after inner step t when
  t > 0 and (t - t_p) % H == 0. So every fragment syncs once every H steps, and the P starts
  are spread evenly over the round: peak traffic is about 1/P of DiLoCo's.
- It FINISHES (wait, outer step, mix) after inner step t + τ. With τ = 0 it finishes at the
  very step it starts.
- τ < H/P guarantees that a fragment finishes no later than the step the next one starts, so
  at most one fragment is in flight between steps. With eager updates τ may reach H (the
  fragment's whole period): a fragment then finishes at the step of its next start, before it,
  and up to P fragments are in flight at once.
- `events(step)` is THE order of a step's work, for every caller (the engine's outer loop and
  the simulator): with τ > 0 a finish comes before a start on the same step; with τ = 0 a
  fragment starts and then finishes. Every replica must launch collectives in the same order
  or they deadlock, so never reorder them.

Example, H=4, P=2, τ=1 (offsets 0 and 2):

    step    1   2          3           4          5           6
    events  -   start 1    finish 1    start 0    finish 0    start 1 ...
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class SyncEvent:
    """One step of the outer loop's work: launch a fragment's exchange, or complete it."""

    kind: Literal["start", "finish"]
    fragment_id: int


def _check_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} ({value!r}) must be an integer")


@dataclass(frozen=True)
class FragmentSchedule:
    """The outer-sync timetable of P fragments, each synced every H steps with τ steps of overlap.

    Args:
        sync_every: H, inner steps between two syncs of the same fragment.
        num_fragments: P, the number of fragments; P = 1 is plain DiLoCo.
        sync_delay: τ, inner steps a fragment's collective overlaps with compute.
        eager_updates: allow τ up to H instead of below H/P (docs/design.md §3).
    """

    sync_every: int
    num_fragments: int = 1
    sync_delay: int = 0
    eager_updates: bool = False

    def __post_init__(self) -> None:
        H, P, tau = self.sync_every, self.num_fragments, self.sync_delay
        for name, value in (("sync_every", H), ("num_fragments", P), ("sync_delay", tau)):
            _check_int(name, value)
        if H < 1:
            raise ValueError(f"sync_every ({H}) must be >= 1 inner step")
        if P < 1:
            raise ValueError(f"num_fragments ({P}) must be >= 1; use 1 for plain DiLoCo")
        if P > H:
            raise ValueError(f"num_fragments ({P}) must be <= sync_every ({H}): each fragment needs its own "
                             f"start step; lower num_fragments or raise sync_every")
        if tau < 0:
            raise ValueError(f"sync_delay ({tau}) must be >= 0; use 0 for no overlap")
        if self.eager_updates:
            if tau > H:
                raise ValueError(f"sync_delay ({tau}) must be <= sync_every ({H}) with eager updates: a fragment's "
                                 f"average must arrive by its next sync point")
        elif tau >= H / P:
            raise ValueError(f"sync_delay ({tau}) must be < sync_every/num_fragments ({H / P:g}): a fragment "
                             f"must finish before the next one starts; lower sync_delay or num_fragments")

    def offset(self, fragment_id: int) -> int:
        """t_p = (p * H) // P: the step (mod H) at which fragment p starts its sync."""
        self._check_fragment(fragment_id)
        return (fragment_id * self.sync_every) // self.num_fragments

    def starts_at(self, step: int) -> list[int]:
        """Fragments whose outer sync starts after inner step `step`, ascending."""
        self._check_step(step)
        if step == 0:
            return []
        return [p for p in range(self.num_fragments)
                if step >= self.offset(p) and (step - self.offset(p)) % self.sync_every == 0]

    def finishes_at(self, step: int) -> list[int]:
        """Fragments whose outer sync finishes after inner step `step` (started τ steps earlier)."""
        self._check_step(step)
        start = step - self.sync_delay
        return self.starts_at(start) if start > 0 else []

    def events(self, step: int) -> list[SyncEvent]:
        """The outer-loop work after inner step `step`, in the order every replica must do it."""
        starts = [SyncEvent("start", p) for p in self.starts_at(step)]
        if self.sync_delay == 0:  # a fragment finishes at the step it starts
            return [e for s in starts for e in (s, SyncEvent("finish", s.fragment_id))]
        return [SyncEvent("finish", p) for p in self.finishes_at(step)] + starts

    def in_flight_after(self, step: int) -> list[int]:
        """Fragments launched but not yet finished once `step` is fully processed.

        A checkpoint taken between steps must save (or drain) exactly these. Always empty
        when τ = 0; at most one fragment when τ < H/P.
        """
        self._check_step(step)
        started = range(max(1, step - self.sync_delay + 1), step + 1)
        return sorted(p for s in started for p in self.starts_at(s))

    def next_start(self, fragment_id: int, step: int) -> int:
        """The first step strictly after `step` at which `fragment_id` starts its sync."""
        self._check_step(step)
        t_p, H = self.offset(fragment_id), self.sync_every
        k = max(0, (step - t_p) // H + 1)
        return t_p + H * k if t_p + H * k > 0 else H

    def table(self, steps: int) -> list[tuple[int, list[int], list[int]]]:
        """Rows (step, starts, finishes) for steps 1..steps, for logs and docs (order: `events`)."""
        self._check_step(steps)
        return [(t, self.starts_at(t), self.finishes_at(t)) for t in range(1, steps + 1)]

    def _check_fragment(self, fragment_id: int) -> None:
        if not 0 <= fragment_id < self.num_fragments:
            raise ValueError(f"fragment_id ({fragment_id}) must be in [0, {self.num_fragments})")

    @staticmethod
    def _check_step(step: int) -> None:
        if step < 0:
            raise ValueError(f"step ({step}) counts completed inner steps and must be >= 0")
