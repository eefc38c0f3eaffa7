"""From live stage signals to replica counts, within bounds and with hysteresis.

Each round the controller sees every stage's instances and their ``load_*`` signals. A stage
needs as many instances as its summed busy fraction divided by the target utilisation, one
more while requests queue beyond `queue_per_instance` on each; never fewer than its minimum nor
more than its maximum.

Hysteresis keeps a split from flapping on noise:

- **up** only after `up_rounds` consecutive rounds asked for more, by the largest count those
  rounds agreed on;
- **down** only after `down_rounds` consecutive rounds in which the stage's load would fit in
  one instance fewer below `scale_down_utilisation` (a lower band than the target), one
  instance at a time;
- after a change of a stage, `cooldown_s` passes before the next change of that stage (new
  instances need time to load and take traffic before their signals mean anything).
"""

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from triptych.components.planner.placement import Bounds
from triptych.protocol.load import StageLoad
from triptych.protocol.settings import setting


@dataclass(frozen=True)
class Policy:
    """How the controller decides (see the module docstring)."""

    target_utilisation: float = setting(0.7, "busy share of an instance the split aims at")
    scale_down_utilisation: float = setting(
        0.4, "a stage shrinks only when one instance fewer stays below this busy share"
    )
    queue_per_instance: float = 2.0
    up_rounds: int = setting(2, "rounds in a row that ask for more before a stage grows")
    down_rounds: int = setting(5, "rounds in a row that ask for fewer before a stage shrinks")
    cooldown_s: float = setting(30.0, "seconds after a change before the stage changes again")


@dataclass
class Decision:
    """One stage's outcome of a round."""

    stage: str
    current: int
    desired: int
    """What this round's signals alone ask for (within bounds)."""
    target: int
    """What the controller sets (after hysteresis)."""
    reason: str


@dataclass
class _History:
    wants_up: list[int] = field(default_factory=list)
    fits_down: int = 0
    changed_at: float = -math.inf


class Controller:
    """Replica counts per stage from their signals, round after round."""

    def __init__(
        self,
        bounds: dict[str, Bounds],
        policy: Policy | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.bounds = bounds
        self.policy = policy or Policy()
        self._clock = clock
        self._history: dict[str, _History] = {stage: _History() for stage in bounds}

    def desired(self, stage: str, loads: list[StageLoad], current: int) -> tuple[int, str]:
        """What `loads` ask for, within bounds, and why."""
        policy = self.policy
        bounds = self.bounds[stage]
        busy = sum(load.busy_fraction for load in loads)
        queued = sum(load.queue_depth for load in loads)
        need = math.ceil(busy / policy.target_utilisation - 1e-9) if busy > 0 else 0
        reason = f"busy {busy:.2f} over {max(current, 1)} instance(s), {queued} queued"
        if current and queued > policy.queue_per_instance * current:
            need = max(need, current + 1)
            reason += " (queue)"
        return max(bounds.min, min(bounds.max, max(need, 1 if bounds.min else 0))), reason

    def decide(self, stage: str, loads: list[StageLoad], current: int) -> Decision:
        """This round's decision for `stage`, whose `current` instances reported `loads`."""
        policy = self.policy
        bounds = self.bounds[stage]
        history = self._history.setdefault(stage, _History())
        desired, reason = self.desired(stage, loads, current)
        now = self._clock()
        target = max(bounds.min, min(bounds.max, current))
        if target != current:
            history.changed_at = now
            history.wants_up.clear()
            history.fits_down = 0
            return Decision(
                stage, current, desired, target, f"out of bounds [{bounds.min}, {bounds.max}]"
            )
        if desired > current:
            history.wants_up.append(desired)
            history.fits_down = 0
        else:
            history.wants_up.clear()
            busy = sum(load.busy_fraction for load in loads)
            fits = current - 1 >= max(bounds.min, 1 if busy > 0 else 0) and busy <= (
                policy.scale_down_utilisation * (current - 1)
            )
            history.fits_down = history.fits_down + 1 if fits else 0
        cooling = now - history.changed_at < policy.cooldown_s
        if len(history.wants_up) >= policy.up_rounds and not cooling:
            target = min(history.wants_up[-policy.up_rounds :])
            reason += f"; up after {policy.up_rounds} rounds"
        elif history.fits_down >= policy.down_rounds and not cooling:
            target = current - 1
            reason += f"; down after {policy.down_rounds} rounds below the lower band"
        elif cooling and (history.wants_up or history.fits_down):
            reason += "; cooling down"
        if target != current:
            history.changed_at = now
            history.wants_up.clear()
            history.fits_down = 0
        return Decision(stage, current, desired, target, reason)
