"""The pieces that end a failed rank, one process each, without torch.distributed: the exit
guard ends a process that cannot exit, and the watchdog tells a wait on other ranks from a rank
busy in its own computation."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from xslim_xdit.parallel.failure import _frame_in_comm

GUARDED = """
import time
from xslim_xdit.parallel.failure import arm_exit_guard
arm_exit_guard("test failure", grace_s=0.5)
time.sleep(60)  # a process that cannot exit (as one stuck in a process group's destructor)
"""


def test_exit_guard_ends_a_process_that_cannot_exit():
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", GUARDED], capture_output=True, text=True, timeout=120)
    # ended by SIGALRM's default action 0.5 s after arming, not by the 60 s sleep
    assert done.returncode == -signal.SIGALRM, done.stderr[-2000:]
    assert "test failure; this process ends within" in done.stderr
    assert time.monotonic() - start < 60


def test_watchdog_sees_a_wait_on_other_ranks_and_not_a_computation():
    assert _frame_in_comm(sys._getframe()) is None  # a test function: not communication code
    import torch.distributed.distributed_c10d as c10d

    # code compiled under torch.distributed's file name stands for a rank blocked in a collective
    scope = {"_frame_in_comm": _frame_in_comm, "sys": sys}
    exec(compile("where = _frame_in_comm(sys._getframe())", c10d.__file__, "exec"), scope)
    assert scope["where"] is not None and "distributed_c10d" in scope["where"]


def test_xslim_timeout_flag():
    """``--xslim-timeout`` sets ``enable_xslim_xdit``'s timeout; it needs ``--xslim`` like every
    X-Slim flag, and a bound that is not positive is refused naming the flag."""
    import argparse

    import pytest

    from xslim_xdit import ConfigError
    from xslim_xdit.integrations.cli import add_xslim_args, config_from_args, timeout_from_args

    parser = add_xslim_args(argparse.ArgumentParser())
    assert timeout_from_args(parser.parse_args([])) == 300.0
    assert timeout_from_args(parser.parse_args(["--xslim", "--xslim_timeout", "5"])) == 5.0
    with pytest.raises(ConfigError, match="^--xslim-timeout is given without --xslim"):
        config_from_args(parser.parse_args(["--xslim-timeout", "5"]))
    with pytest.raises(ConfigError, match="^--xslim-timeout must be a number of seconds > 0"):
        timeout_from_args(parser.parse_args(["--xslim", "--xslim-timeout", "-1"]))
