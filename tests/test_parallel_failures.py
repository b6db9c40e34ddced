"""A failing rank ends every rank, in every layout the xDiT integration sets up.

The matrix: one rank is killed, hangs, or is configured differently, under Ulysses 2, CFG
parallel 2 and PipeFusion 2 (xfuser's own FLUX wrapper and pipeline, gloo, CPU). All nine
2-process cells run at once under torch.multiprocessing (``start_processes`` and its ``join``,
the launcher's policy: once a process fails, the others get a grace period to exit by
themselves, then SIGTERM). Each cell must be completely gone within the stated bound,
``timeout_s + EXIT_MARGIN_S`` after the failure, and the rank that did not fail must have
exited by itself (not been terminated by the launcher) with X-Slim's message.

X-Slim's timeout is 5 s here (300 s by default). The processes fork from a server that has
imported torch, diffusers and xfuser once (``tests/_fail_workers.py``).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch.multiprocessing as tmp
from _dist import free_port

from xslim_xdit.parallel.failure import EXIT_MARGIN_S, HANG_EXIT_CODE

pytestmark = pytest.mark.multiproc

LAYOUTS = ("usp", "cfg", "pipefusion")
MODES = ("kill", "hang", "misconfig")
FAILING_RANK = 1
TIMEOUT_S = 5.0
BOUND_S = TIMEOUT_S + EXIT_MARGIN_S
#: the whole matrix, start-up included, or the test fails (a hang must not hang CI)
HARD_LIMIT_S = 240.0


def _cell(rank: int, *args: object) -> None:
    """The rank's entry: the fork server has imported ``_fail_workers`` (and xfuser) already; this
    test process never does."""
    from _fail_workers import failing_cell

    failing_cell(rank, *args)  # type: ignore[arg-type]


def _run_cell(layout: str, mode: str, out_dir: Path, result: dict) -> None:
    """Start one cell's two ranks and join them as torch.multiprocessing.spawn does."""
    out_dir.mkdir(parents=True)
    ctx = tmp.start_processes(
        _cell,
        args=(2, free_port(), layout, mode, FAILING_RANK, TIMEOUT_S, str(out_dir)),
        nprocs=2,
        join=False,
        start_method="forkserver",
    )
    result["processes"] = ctx.processes
    # The rank that did not fail must exit by itself within the bound; a hung rank never does
    # (it waits on nobody), so the launcher ends it after a short grace.
    grace = 1.0 if mode == "hang" else BOUND_S
    try:
        while not ctx.join(timeout=0.2, grace_period=grace):
            pass
        result["raised"] = None
    except Exception as e:  # noqa: BLE001 - ProcessRaisedException / ProcessExitedException
        result["raised"] = e
    result["gone_at"] = time.time()
    result["exitcodes"] = [p.exitcode for p in ctx.processes]


def took_from(out: Path, started: float) -> float:
    """Seconds from the matrix's start to the cell's injected failure."""
    return float((out / "inject").read_text()) - started


def test_every_failure_in_every_layout_ends_every_rank(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    # The fork server imports its preload modules from PYTHONPATH (Python 3.11 does not pass it
    # the parent's sys.path), and skips one it cannot import without a word: put tests/ there.
    here = str(Path(__file__).parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([here, os.environ.get("PYTHONPATH", "")]))
    multiprocessing.get_context("forkserver").set_forkserver_preload(["_fail_workers"])
    cells = [(layout, mode) for layout in LAYOUTS for mode in MODES]
    if os.environ.get("XSLIM_FAILURE_CELLS"):  # debugging one cell: "usp-hang,cfg-kill"
        cells = [tuple(c.split("-")) for c in os.environ["XSLIM_FAILURE_CELLS"].split(",")]  # type: ignore[misc]
    results: dict[tuple[str, str], dict] = {c: {} for c in cells}
    started = time.time()
    threads = [
        threading.Thread(target=_run_cell, args=(*c, tmp_path / f"{c[0]}-{c[1]}", results[c]), daemon=True)
        for c in cells
    ]
    for t in threads:
        t.start()
    deadline = time.monotonic() + HARD_LIMIT_S
    for t in threads:
        t.join(timeout=max(0.0, deadline - time.monotonic()))
    hung = [c for c, t in zip(cells, threads, strict=True) if t.is_alive()]
    for r in results.values():
        for p in r.get("processes", []):
            if p.is_alive():
                p.kill()
    assert not hung, f"cells still running after {HARD_LIMIT_S}s: {hung}"
    print(f"\nmatrix of {len(cells)} cells done in {time.time() - started:.1f}s")

    problems = []
    report = []
    for (layout, mode), r in results.items():
        out = tmp_path / f"{layout}-{mode}"
        other = 1 - FAILING_RANK
        codes = r["exitcodes"]
        if not (out / "inject").exists():
            problems.append(
                f"{layout}/{mode}: the failure was never injected (exit codes {codes}): {r['raised']}"
            )
            continue
        took = r["gone_at"] - float((out / "inject").read_text())
        up = max(float((out / f"started{k}").read_text()) for k in (0, 1)) - started
        cpu = max(float((out / f"cpu_at_start{k}").read_text()) for k in (0, 1))
        if cpu > 2.0:  # the preload failed: every rank imported xfuser again (slow, not wrong)
            report.append(f"{layout}/{mode}: ranks spent {cpu:.1f}s CPU before starting (preload missed)")
        report.append(
            f"{layout}/{mode}: exit codes {codes}, ranks started after {up:.1f}s, failure at "
            f"{took_from(out, started):.1f}s, gone {took:.1f}s after it"
        )
        if took > BOUND_S:
            problems.append(
                f"{layout}/{mode}: processes gone {took:.1f}s after the failure (bound {BOUND_S}s)"
            )
        error = (out / f"error{other}").read_text() if (out / f"error{other}").exists() else ""
        if mode == "misconfig":
            # both ranks raise the same error at the run's start, naming the field and the ranks
            for rank in (0, 1):
                text = (out / f"error{rank}").read_text() if (out / f"error{rank}").exists() else ""
                if "RankMismatchError" not in text or "'polish' differs" not in text or "[0]" not in text:
                    problems.append(f"{layout}/{mode}: rank {rank} did not raise the mismatch: {text[-600:]}")
            if codes != [1, 1]:
                problems.append(f"{layout}/{mode}: exit codes {codes}, expected both 1")
            continue
        # The surviving rank exited by itself: 1 after an exception (X-Slim's timeout, or the
        # peer's closed connection), or the watchdog's status; never the launcher's SIGTERM.
        if codes[other] not in (1, HANG_EXIT_CODE):
            problems.append(f"{layout}/{mode}: rank {other} exit code {codes[other]} (error: {error[-400:]})")
        if codes[other] == 1 and mode == "hang" and "XSlimCollectiveError" not in error:
            problems.append(f"{layout}/{mode}: rank {other} raised something else: {error[-600:]}")
        expected_failing = -9 if mode == "kill" else -15  # killed; or hung, then ended by the launcher
        if codes[FAILING_RANK] != expected_failing:
            problems.append(f"{layout}/{mode}: failing rank exit code {codes[FAILING_RANK]}")
    print("\n".join(report))  # shown with -s: the measured times, for docs/parallel.md
    assert not problems, "\n".join(problems)


def test_under_torchrun_a_hung_rank_ends_the_job(tmp_path):
    """The case of the issue: the xDiT integration's own decision group, one Ulysses rank hangs.
    The other rank exits by itself within the bound (X-Slim's timeout, or the watchdog), and
    torchrun then ends the hung rank and exits with an error."""
    out = tmp_path / "torchrun"
    out.mkdir()
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")
    }
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += ["--master_port", str(free_port()), str(Path(__file__).parent / "_fail_workers.py")]
    cmd += ["usp", "hang", str(TIMEOUT_S), str(out)]
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        text, _ = proc.communicate(timeout=HARD_LIMIT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        text, _ = proc.communicate()
        raise AssertionError(f"torchrun still running after {HARD_LIMIT_S}s:\n{text[-3000:]}") from None
    gone = time.time()
    assert proc.returncode != 0, text[-3000:]
    assert (out / "inject").exists(), text[-3000:]
    took = gone - float((out / "inject").read_text())
    print(f"\ntorchrun usp/hang: job gone {took:.1f}s after the failure")
    assert took <= BOUND_S, text[-3000:]
    assert "X-Slim" in text and ("timed out" in text or "no progress" in text), text[-3000:]
    # no process of the job is left (torchrun's own group: the agent and both ranks)
    try:
        os.killpg(proc.pid, 0)
        left = True
    except ProcessLookupError:
        left = False
    assert not left, "processes of the torchrun job are still alive"
