"""Which step and which guidance branch a transformer call belongs to.

The pipeline says it, in this order of trust:

1. diffusers' ``transformer.cache_context(name, step_index=...)``: a step index given there is
   the step; the context's name (``"cond"``, ``"uncond"``, ...) is the branch (in the order the
   names first appear in the run);
2. the pipeline's scheduler: X-Slim counts its ``step()`` calls (one per step, whatever the
   scheduler: a Heun-type scheduler, which repeats timesteps, calls it after each of its two
   evaluations, so each evaluation is a step of its own); calls between two ``step()`` calls are
   the step's guidance branches;
3. **fallback, for a bare transformer** (no pipeline scheduler, or xfuser's scheduler wrappers,
   which step once per PipeFusion patch): the timestep. A call with the same timestep as the
   previous call is another branch of the same step, a larger timestep than the last step's
   starts a new run (denoising runs from high to low timesteps), anything else is the next step.
   Heun-type schedulers cannot be told apart from guidance branches this way: enable X-Slim on
   the pipeline for them.

Example:
    >>> clock = StepClock()
    >>> [clock.tick(t) for t in (900.0, 900.0, 500.0, 100.0, 900.0)]
    [(True, 0, 0), (False, 0, 1), (False, 1, 0), (False, 2, 0), (True, 0, 0)]
"""

from __future__ import annotations

from typing import Any


class StepClock:
    """Step and branch of each transformer call (see the module docstring for the rules)."""

    def __init__(self) -> None:
        #: the pipeline's scheduler counts steps (set by :meth:`follow_scheduler`)
        self.scheduler_driven = False
        self._reset()

    def _reset(self) -> None:
        self.step = -1
        self.branch = 0
        self._steps_done = 0  # scheduler.step() calls since the run started
        self._calls_this_step = 0
        self._names: dict[str, int] = {}
        self._last_t: float | None = None
        self._step_t: float | None = None
        self._fresh = True

    def follow_scheduler(self, driven: bool = True) -> None:
        """Count steps from the scheduler's ``step()`` calls (reported with :meth:`step_done`)."""
        self.scheduler_driven = driven

    def start_run(self) -> None:
        """A run starts (the scheduler's timesteps were set): step 0 comes next."""
        self._reset()

    def step_done(self) -> None:
        """The scheduler finished a step."""
        self._steps_done += 1

    def tick(self, timestep: float | None, context: Any = None) -> tuple[bool, int, int]:
        """For a new transformer call: ``(starts_a_new_run, step, branch)``."""
        name = getattr(context, "name", None)
        given_step = getattr(context, "step_index", None)
        new_run = self._fresh
        if given_step is not None:
            step = int(given_step)
        elif self.scheduler_driven:
            step = self._steps_done
        else:
            step = self._timestep_step(timestep)
            if step < 0:  # back to a higher noise level: a new run
                new_run = True
                self._reset()
                step = 0
        if step != self.step:
            self._calls_this_step = 0
            self._step_t = timestep
        if name is not None:
            branch = self._names.setdefault(str(name), len(self._names))
        else:
            branch = self._calls_this_step
        self._calls_this_step += 1
        self.step, self.branch, self._last_t, self._fresh = step, branch, timestep, False
        return new_run, step, branch

    def _timestep_step(self, t: float | None) -> int:
        if self.step < 0:
            return 0
        if t is not None and t == self._last_t:
            return self.step  # another guidance branch of this step
        if t is not None and self._step_t is not None and t > self._step_t:
            return -1  # back to a higher noise level: a new run
        return self.step + 1
