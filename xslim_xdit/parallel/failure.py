"""Failures end every rank: the exit guard and the communication watchdog.

Two ways a multi-rank run could outlive a failure, and what this module does about each:

1. **A process that raised cannot exit.** A collective that timed out is still pending inside
   its process group, and the group's destructor (run when the interpreter exits) waits for it
   until the group's own timeout, 30 minutes by default. Measured with gloo: a rank whose
   all-reduce timed out after 3 s exited only when the silent peer woke up 40 s later. X-Slim
   creates its own groups with its timeout (so gloo drops the pending operation by then), and on
   any X-Slim collective failure arms the *exit guard*: if the process has not exited
   ``grace_s`` seconds later, it is ended (``SIGALRM`` with its default action, which the kernel
   carries out even while the interpreter is stuck in a destructor holding the GIL; a daemon
   thread calling ``os._exit`` where no signal can be set).
2. **A rank waits forever outside X-Slim.** Under PipeFusion the first stage waits for the
   last stage's latents in xfuser's own receive, and under a schedule no X-Slim collective runs
   at all; those waits have xfuser's timeout, not ours. The *watchdog* (a daemon thread, armed
   from a run's start to its last transformer call and fed at every call boundary) ends the
   process when the thread that runs the model has made no progress for ``timeout_s`` and is,
   at that moment, inside a communication call (a frame of ``torch.distributed``, xfuser's
   distributed code, yunchang or :mod:`xslim_xdit.parallel`). A rank that is merely slow in
   its own computation is left alone: it is not waiting on anyone.

Either way the process ends with a message on stderr naming the rank and the cause, and the
launcher (``torchrun``, ``torch.multiprocessing``) then ends the ranks that are still alive.
The bound, from the failure to every process gone, is ``timeout_s + EXIT_MARGIN_S``
(``docs/parallel.md``).
"""

from __future__ import annotations

import atexit
import faulthandler
import os
import signal
import sys
import threading
import time
from types import FrameType

#: seconds a process that hit a failure gets to exit by itself before the exit guard ends it
EXIT_GRACE_S = 10.0
#: how often the watchdog looks (seconds): a hang is seen at most this late
WATCHDOG_POLL_S = 1.0
#: the watchdog waits this much longer than X-Slim's collective timeout (which then fires first)
WATCHDOG_SLACK_S = 2.0
#: the stated bound is ``timeout_s + EXIT_MARGIN_S``: the watchdog's slack and poll (3 s), or the
#: exit grace (10 s), and a few seconds for the launcher to end the ranks still alive once one
#: has exited
EXIT_MARGIN_S = 15.0
#: exit status of a process ended by the watchdog (as ``timeout(1)``)
HANG_EXIT_CODE = 124

#: file-name fragments of code that waits on other ranks
_COMM_FRAGMENTS = (
    os.sep + os.path.join("torch", "distributed") + os.sep,
    os.sep + os.path.join("xfuser", "core", "distributed") + os.sep,
    os.sep + "yunchang" + os.sep,
    os.sep + os.path.join("xslim_xdit", "parallel") + os.sep,
)


def _rank() -> str:
    return os.environ.get("RANK", "?")


def _say(message: str) -> None:
    try:
        sys.stderr.write(f"[X-Slim rank {_rank()}] {message}\n")
        sys.stderr.flush()
    except Exception:  # noqa: BLE001 - a closed stderr must not stop the exit
        pass


class _ExitGuard:
    """Ends this process ``grace_s`` seconds after :meth:`arm`, unless it exits first."""

    def __init__(self) -> None:
        self.deadline: float | None = None
        self._lock = threading.Lock()

    def arm(self, grace_s: float, reason: str) -> None:
        with self._lock:
            deadline = time.monotonic() + grace_s
            if self.deadline is not None and self.deadline <= deadline:
                return  # an earlier deadline stands
            self.deadline = deadline
        _say(f"{reason}; this process ends within {grace_s:.0f}s if it has not exited by then")
        if threading.current_thread() is threading.main_thread():
            try:
                # The default action of SIGALRM terminates the process from the kernel: it works
                # even while the interpreter is blocked in a C++ destructor holding the GIL.
                signal.signal(signal.SIGALRM, signal.SIG_DFL)
                signal.setitimer(signal.ITIMER_REAL, max(grace_s, 0.01))
                return
            except (ValueError, OSError, AttributeError):  # no SIGALRM on this platform
                pass
        timer = threading.Timer(grace_s, self._expire)
        timer.daemon = True
        timer.start()

    def _expire(self) -> None:
        _say("the exit guard ends this process (it did not exit after the failure)")
        os._exit(1)


_GUARD = _ExitGuard()


def arm_exit_guard(reason: str, grace_s: float = EXIT_GRACE_S) -> None:
    """After a failure that leaves process groups unusable: end this process ``grace_s``
    seconds from now if it has not exited by then (the failure's exception still propagates,
    so the launcher sees the error). Idempotent; the earliest deadline wins.

    Example:
        >>> arm_exit_guard("X-Slim all-reduce timed out")  # doctest: +SKIP
    """
    _GUARD.arm(grace_s, reason)


def _frame_in_comm(frame: FrameType | None) -> str | None:
    """The innermost frame of ``frame``'s stack that belongs to communication code, as
    ``file:line function``; None when the thread is not waiting on other ranks."""
    while frame is not None:
        name = frame.f_code.co_filename
        if any(f in name for f in _COMM_FRAGMENTS):
            return f"{name}:{frame.f_lineno} {frame.f_code.co_name}"
        frame = frame.f_back
    return None


class _Watchdog:
    """One daemon thread per process; owners (engines) arm it with a deadline."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # owner -> (deadline, timeout_s, thread ident that runs the model, what is running)
        self._armed: dict[int, tuple[float, float, int, str]] = {}
        self._thread: threading.Thread | None = None
        self._atexit = False

    def arm(self, owner: int, timeout_s: float, what: str) -> None:
        with self._lock:
            self._armed[owner] = (time.monotonic() + timeout_s, timeout_s, threading.get_ident(), what)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="xslim-watchdog", daemon=True)
                self._thread.start()
            if not self._atexit:
                atexit.register(self._at_exit)
                self._atexit = True

    def disarm(self, owner: int) -> None:
        with self._lock:
            self._armed.pop(owner, None)

    def armed(self, owner: int) -> bool:
        with self._lock:
            return owner in self._armed

    def _loop(self) -> None:
        while True:
            time.sleep(WATCHDOG_POLL_S)
            now = time.monotonic()
            with self._lock:
                expired = [(o, v) for o, v in self._armed.items() if v[0] <= now]
            for owner, (_, timeout_s, ident, what) in expired:
                where = _frame_in_comm(sys._current_frames().get(ident))
                if where is None:
                    # Busy in its own computation (or finished without telling us): not a wait on
                    # another rank. Look again one timeout later.
                    with self._lock:
                        if owner in self._armed:
                            self._armed[owner] = (now + timeout_s, timeout_s, ident, what)
                    continue
                _say(
                    f"no progress for {timeout_s:.0f}s during {what}, waiting on other ranks in {where}: "
                    "a peer is hung or gone; ending this process (exit status "
                    f"{HANG_EXIT_CODE}) so that the launcher ends the job"
                )
                try:
                    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
                except Exception:  # noqa: BLE001 - the exit matters more than the trace
                    pass
                os._exit(HANG_EXIT_CODE)

    def _at_exit(self) -> None:
        """The interpreter exits during a run (an exception ended it): pending communication may
        block the process groups' destructors, so the exit guard bounds the exit."""
        with self._lock:
            in_run = bool(self._armed)
            self._armed.clear()
        if in_run:
            arm_exit_guard("exiting in the middle of a multi-rank run")


_WATCHDOG = _Watchdog()


def watchdog_arm(owner: object, timeout_s: float, what: str) -> None:
    """(Re)start ``owner``'s deadline: ``timeout_s`` seconds from now, for the calling thread.

    Example:
        >>> watchdog_arm(engine, 300.0, "step 3 of 28")  # doctest: +SKIP
    """
    _WATCHDOG.arm(id(owner), timeout_s, what)


def watchdog_disarm(owner: object) -> None:
    """``owner`` has no run in progress: its deadline is dropped."""
    _WATCHDOG.disarm(id(owner))


def watchdog_armed(owner: object) -> bool:
    """Whether ``owner`` has a deadline running."""
    return _WATCHDOG.armed(id(owner))
