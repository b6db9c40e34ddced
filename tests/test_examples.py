"""The torchrun examples run end to end on CPU with ``--tiny``: each on one process, FLUX also on
two Ulysses ranks and on two Ring ranks (default attention backend), and ``--help`` on each. All
subprocesses start together (most of their time is importing xfuser) and each has a hard timeout
that kills its process group."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.multiproc

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
TIMEOUT = 240
CAL_DIR = Path(tempfile.mkdtemp(prefix="xslim-cal-"))  # the calibration JSONs the examples write
# block polish: its decisions are global, so one process and two SP ranks must agree exactly
XSLIM = ["--xslim", "--xslim-polish", "block", "--xslim-warmup", "2"]


def _distinct_ports(n: int) -> list[int]:
    """``n`` free ports, all different: every socket is held open until all are chosen (ports
    taken one at a time, each released before the next, can come back twice, and the
    simultaneous launches below then fail with EADDRINUSE)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


_PORTS: list[int] = []


def _free_port() -> int:
    """The next of this module's distinct ports (a world of one gets one too: its rendezvous is
    a TCP store, and the examples would otherwise each pick a port at start-up, racing the rest)."""
    if not _PORTS:
        _PORTS.extend(_distinct_ports(16))
    return _PORTS.pop()


def _one_process_env() -> dict[str, str]:
    return dict(
        RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port())
    )


def _env() -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")
    }
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}")
    return env


def _commands() -> dict[str, list[str]]:
    py = [sys.executable]
    run2 = py + ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port())]
    cmds = {
        f"{name}-1": py + [str(EXAMPLES / f"{name}_example.py"), "--tiny", *XSLIM]
        for name in ("flux", "pixart", "hunyuan_video", "wan")
    }
    cmds["flux-ulysses2"] = run2 + [
        str(EXAMPLES / "flux_example.py"),
        "--tiny",
        "--ulysses_degree",
        "2",
        *XSLIM,
    ]
    # Ring with the default attention backend: the example picks the one Ring needs on CPU
    run2_ring = py + [
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(_free_port()),
    ]
    cmds["flux-ring2"] = run2_ring + [
        str(EXAMPLES / "flux_example.py"),
        "--tiny",
        "--ring_degree",
        "2",
        *XSLIM,
    ]
    # --xslim-calibrate: calibrate on 2 seeded runs, save the JSON, generate with it (one process
    # and 2 Ulysses ranks; no baseline or warm-up runs: only the calibration is compared)
    cal = ["--tiny", "--xslim", "--xslim-calibrate", "2", "--xslim-target-speedup", "2"]
    cal += ["--skip_baseline", "--no_warmup", "--xslim-save"]
    cmds["flux-cal-1"] = py + [str(EXAMPLES / "flux_example.py"), *cal, str(CAL_DIR / "one.json")]
    cmds["flux-cal-ulysses2"] = run2_cal = py + [
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(_free_port()),
    ]
    run2_cal += [str(EXAMPLES / "flux_example.py"), "--ulysses_degree", "2", *cal, str(CAL_DIR / "two.json")]
    for name in ("flux", "pixart", "hunyuan_video", "wan"):
        cmds[f"{name}-help"] = py + [str(EXAMPLES / f"{name}_example.py"), "--help"]
    return cmds


@pytest.fixture(scope="module")
def runs() -> dict[str, tuple[int, str]]:
    procs = {
        key: subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=_env()
            if "torch.distributed.run" in cmd or key.endswith("-help")
            else {**_env(), **_one_process_env()},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        for key, cmd in _commands().items()
    }
    out: dict[str, tuple[int, str]] = {}
    try:
        for key, p in procs.items():
            try:
                text, _ = p.communicate(timeout=TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                text, _ = p.communicate()
                text = f"TIMEOUT after {TIMEOUT}s\n{text}"
            out[key] = (p.returncode, text)
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    return out


def _result(runs, key) -> dict:
    code, text = runs[key]
    assert code == 0, text[-4000:]
    lines = [ln for ln in text.splitlines() if ln.startswith("RESULT ")]
    assert len(lines) == 1, text[-4000:]  # printed by the last rank only
    return json.loads(lines[0][len("RESULT ") :])


@pytest.mark.parametrize("name", ["flux", "pixart", "hunyuan_video", "wan"])
def test_example_runs_tiny_on_one_process(runs, name):
    res = _result(runs, f"{name}-1")
    assert res["example"] == name
    assert res["kinds"][0] == "full" and res["kinds"][-1] == "full"
    assert len(res["kinds"]) == 10
    assert 0 < res["flops_fraction"] < 1  # X-Slim reused something
    assert res["seconds_baseline"] > 0 and res["seconds_xslim"] > 0 and res["speedup"] > 0
    assert 0 < res["max_abs_diff_vs_baseline"] < 1
    assert res["collectives"] == 0  # a world of one decides alone
    assert "step kind" in runs[f"{name}-1"][1]  # the statistics table


def test_wan_example_runs_two_experts_and_the_switch_step_in_full(runs):
    res = _result(runs, "wan-1")
    assert "2experts" in res["parallel"]
    # 10 steps of the tiny pipeline's scheduler: transformer_2 takes over at step 6 with nothing
    # cached (no previous probe of its own: indicator "-"), so it runs in full
    table = runs["wan-1"][1].splitlines()
    assert res["kinds"][6] == "full" and any(re.match(r"^\s+6 full\s+- ", ln) for ln in table)
    assert {"skip", "block"} & set(res["kinds"][7:9])  # and caches of its own afterwards


def test_flux_example_ulysses2_decides_like_one_process(runs):
    one, two = _result(runs, "flux-1"), _result(runs, "flux-ulysses2")
    assert "ulysses2" in two["parallel"]
    assert two["collectives"] > 0
    # this run has no token steps, so the per-shard token selection plays no part: same decisions
    assert "token" not in one["kinds"]
    assert two["kinds"] == one["kinds"]
    assert two["max_abs_diff_vs_baseline"] == pytest.approx(one["max_abs_diff_vs_baseline"], abs=1e-2)


def test_flux_example_ring2_runs_on_cpu_with_the_default_backend(runs):
    """``--ring_degree 2`` without ``--attention_backend``: xDiT's default (SDPA) refuses Ring, so
    on CPU the example picks SDPA_FLASH, says so, and decides like one process."""
    one, two = _result(runs, "flux-1"), _result(runs, "flux-ring2")
    assert "ring2" in two["parallel"]
    assert "using --attention_backend SDPA_FLASH" in runs["flux-ring2"][1]
    assert "does not support ring parallelism" not in runs["flux-ring2"][1]
    assert two["collectives"] > 0
    assert two["kinds"] == one["kinds"]
    assert two["max_abs_diff_vs_baseline"] == pytest.approx(one["max_abs_diff_vs_baseline"], abs=1e-2)


def test_flux_example_calibrates_on_two_ulysses_ranks_like_one_process(runs):
    """``--xslim-calibrate 2 --xslim-target-speedup 2 --xslim-save PATH``: rank 0 writes the
    JSON, which equals the one process's (same plan, profile within round-off), and the run
    follows the calibrated schedule."""
    from _cal_workers import assert_same_calibration

    one, two = _result(runs, "flux-cal-1"), _result(runs, "flux-cal-ulysses2")
    assert "ulysses2" in two["parallel"] and two["calibration_saved"].endswith("two.json")
    saved_one = (CAL_DIR / "one.json").read_text()
    saved_two = (CAL_DIR / "two.json").read_text()
    assert_same_calibration(saved_one, saved_two)
    schedule = json.loads(saved_two)["schedule"]
    assert two["calibrated_schedule"] == schedule
    assert [i for i, k in enumerate(two["kinds"]) if k == "full"] == schedule["full_steps"]
    assert two["kinds"] == one["kinds"] and 0 < two["flops_fraction"] < 0.6  # target 2x


@pytest.mark.parametrize("name", ["flux", "pixart", "hunyuan_video", "wan"])
def test_example_help(runs, name):
    code, text = runs[f"{name}-help"]
    assert code == 0, text[-3000:]
    for flag in ("--ulysses_degree", "--xslim-warn", "--tiny", "--model"):
        assert flag in text
