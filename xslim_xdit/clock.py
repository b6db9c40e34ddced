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

**A run abandoned in its first step** (an exception or an interrupt after one call, then a new
run from the first timestep) looks, by the timestep alone, exactly like guidance as separate
calls: the new run's first call has the abandoned call's timestep. The fallback reads it as a
guidance branch; if the second step then has fewer calls than the first, that reading was wrong
(the first step held an abandoned call, whose caches the second step may have reused) and the
third step's first call raises :class:`AmbiguousRunError` (the engine raises it as an
``XSlimRuntimeError``), so the run never completes on the abandoned run's caches; the clock is
reset and the next run starts clean. Nothing is guessed when runs are started explicitly
(``engine.start_run(n)`` before each run, or a pipeline's ``set_timesteps``): do that if a run
can be abandoned in its first step, or if a run guides only its first step.

Example:
    >>> clock = StepClock()
    >>> [clock.tick(t) for t in (900.0, 900.0, 500.0, 500.0, 100.0, 100.0, 900.0)]
    [(True, 0, 0), (False, 0, 1), (False, 1, 0), (False, 1, 1), (False, 2, 0), (False, 2, 1), (True, 0, 0)]
    >>> [clock.tick(t) for t in (900.0, 500.0)]  # abandoned after its first call, then a new run
    [(False, 0, 1), (False, 1, 0)]
    >>> clock.tick(100.0)  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    ...
    AmbiguousRunError: the first step had 2 transformer calls at the same timestep ...
"""

from __future__ import annotations

from typing import Any


class AmbiguousRunError(RuntimeError):
    """The timestep fallback cannot tell whether the first step held an abandoned run's call."""


class StepClock:
    """Step and branch of each transformer call (see the module docstring for the rules)."""

    def __init__(self) -> None:
        #: the pipeline's scheduler counts steps (set by :meth:`follow_scheduler`)
        self.scheduler_driven = False
        #: the current call's ``cache_context`` name (``"cond"``, ``"uncond"``, ...), or None:
        #: which guidance branch the call holds, whatever its index (under CFG parallelism each
        #: rank's only branch is its branch 0, so the index cannot say)
        self.name: str | None = None
        self._reset()

    def _reset(self) -> None:
        self.step = -1
        self.branch = 0
        self.name = None
        self._steps_done = 0  # scheduler.step() calls since the run started
        self._calls_this_step = 0
        self._names: dict[str, int] = {}
        self._last_t: float | None = None
        self._step_t: float | None = None
        self._fresh = True
        self._explicit = False  # the run was started by start_run(explicit=True)
        self._calls_per_step: list[int] = []  # calls of steps 0 and 1 (the timestep fallback)

    def follow_scheduler(self, driven: bool = True) -> None:
        """Count steps from the scheduler's ``step()`` calls (reported with :meth:`step_done`)."""
        self.scheduler_driven = driven

    def start_run(self, explicit: bool = True) -> None:
        """A run starts: step 0 comes next. ``explicit``: the caller knows a run starts here (a
        scheduler's ``set_timesteps``, the user's ``engine.start_run``), so a first step with
        several calls is several guidance branches, not an abandoned call plus a new run."""
        self._reset()
        self._explicit = explicit

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
            elif step != self.step and len(self._calls_per_step) < 2:
                self._check_first_steps()
        if step != self.step:
            self._calls_this_step = 0
            self._step_t = timestep
        if name is not None:
            branch = self._names.setdefault(str(name), len(self._names))
        else:
            branch = self._calls_this_step
        self._calls_this_step += 1
        self.step, self.branch, self._last_t, self._fresh = step, branch, timestep, False
        self.name = None if name is None else str(name)
        return new_run, step, branch

    def _check_first_steps(self) -> None:
        """At the end of step 0 or 1 (fallback only): step 1 with fewer calls than step 0 means
        step 0 held a call of an abandoned run (see the module docstring)."""
        if self.step >= 0:
            self._calls_per_step.append(self._calls_this_step)
        calls = self._calls_per_step
        if not self._explicit and len(calls) == 2 and calls[1] < calls[0]:
            self._reset()
            raise AmbiguousRunError(
                f"the first step had {calls[0]} transformer calls at the same timestep and the second "
                f"{calls[1]}: the first step probably held the last call of an abandoned run, whose "
                "caches would be reused now. Call engine.start_run(num_steps) before each run of a bare "
                "transformer (or enable X-Slim on the pipeline); the engine has been reset"
            )

    def _timestep_step(self, t: float | None) -> int:
        if self.step < 0:
            return 0
        if t is not None and t == self._last_t:
            return self.step  # another guidance branch of this step
        if t is not None and self._step_t is not None and t > self._step_t:
            return -1  # back to a higher noise level: a new run
        return self.step + 1
