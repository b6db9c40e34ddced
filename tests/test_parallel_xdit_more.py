"""X-Slim under xDiT (xfuser 0.7) for SD3, HunyuanVideo 1.5, LTX-2 and CogVideoX, on CPU
(gloo, 2 ranks). Through xfuser's bare transformer wrappers: HunyuanVideo 1.5 under Ulysses 2 and
Ring 2 (schedule with every level, and the online controller), LTX-2 under Ulysses 2 and Ring 2
(online, step and block levels) (Z-Image: tests/test_parallel_xdit_zimage.py). Through
xfuser's pipelines: SD3 (``xFuserStableDiffusion3Pipeline``) under Ulysses 2 (schedule with every
level, online), Ring 2, CFG parallel 2 and synchronous PipeFusion 2 (online, block polish), and
CogVideoX (``xFuserCogVideoXPipeline``) under Ulysses 2, Ring 2 and CFG parallel 2 (online, block
polish). Every rank's decision log (kinds, block masks, token counts) equals the single device's
(``token_groups`` = the SP degree there); outputs agree within round-off.

One 2-rank launch runs every case (module-scoped fixture): starting two ranks that import xfuser
is most of the cost."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from _dist import run_ranks
from _xdit_more_workers import LAYOUTS, PIPE_CASES, more_cases, single_device, single_device_pipeline

pytestmark = pytest.mark.multiproc

# As tests/test_parallel_xdit_wan.py: other reduction and key orders, ~1e-6 measured
ATOL = 1e-4


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out: Path = tmp_path_factory.mktemp("more_xdit")
    return run_ranks(more_cases, 2, out, timeout=500)


def _got(ranks: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    got = [r[key] for r in ranks]
    for g in got:
        assert "error" not in g, g.get("error")
    return got


@pytest.mark.parametrize("layout", ["ulysses2", "ring2"])
@pytest.mark.parametrize("which", ["schedule", "online"])
def test_hunyuan_video15_usp_ranks_agree_with_single_device(ranks, layout, which):
    """HunyuanVideo 1.5 through ``xFuserHunyuanVideo15Transformer3DWrapper``: every level."""
    ref = single_device("hunyuan_video15", which)
    got = _got(ranks, f"hunyuan_video15/{layout}/{which}")
    assert got[0]["degrees"] == got[1]["degrees"] == LAYOUTS[layout]  # (Ulysses, Ring) as xfuser ran it
    assert got[0]["log"] == got[1]["log"] == ref["log"]
    assert {k for k, _, _ in ref["log"]} == {"skip", "block", "token", "full"}  # every level ran
    torch.testing.assert_close(got[0]["plain"], ref["plain"], rtol=0, atol=ATOL)  # xfuser itself
    for g in got:
        torch.testing.assert_close(g["x"], ref["x"], rtol=0, atol=ATOL)
    assert got[0]["collectives"] > 0


@pytest.mark.parametrize("layout", ["ulysses2", "ring2"])
def test_ltx2_usp_ranks_agree_with_single_device(ranks, layout):
    """LTX-2 through ``xFuserLTX2VideoTransformer3DWrapper`` (video sharded, audio whole on every
    rank): the step and block levels (its token level: tests/test_parallel_xdit_sp_token.py)."""
    ref = single_device("ltx2", "online")
    got = _got(ranks, f"ltx2/{layout}/online")
    assert got[0]["degrees"] == got[1]["degrees"] == LAYOUTS[layout]
    assert got[0]["log"] == got[1]["log"] == ref["log"]
    assert {k for k, _, _ in ref["log"]} == {"skip", "block", "full"}
    torch.testing.assert_close(got[0]["plain"], ref["plain"], rtol=0, atol=ATOL)
    for g in got:
        torch.testing.assert_close(g["x"], ref["x"], rtol=0, atol=ATOL)
    assert got[0]["collectives"] > 0


#: the xfuser transformer wrapper each family's xFuser pipeline installs
PIPE_WRAPPERS = {"sd3": "xFuserSD3Transformer2DWrapper", "cogvideox": "xFuserCogVideoXTransformer3DWrapper"}


@pytest.mark.parametrize("key", list(PIPE_CASES))
def test_xfuser_pipelines_ranks_agree_with_single_device(ranks, key):
    """SD3 and CogVideoX through xfuser's own pipelines (the pipeline shards the latents by rows,
    puts one guidance branch on each rank, or (SD3, synchronous PipeFusion) splits the blocks into
    two stages): each rank's decision log equals the single device's diffusers pipeline (batched
    CFG there); the output rank's latents agree."""
    family, xargs, which, _ = PIPE_CASES[key]
    ref = single_device_pipeline(key)
    got = _got(ranks, key)
    pp = xargs.get("pipefusion_parallel_degree", 1)
    cfg = 2 if xargs.get("use_cfg_parallel") else 1
    expected = (xargs.get("ulysses_degree", 1), xargs.get("ring_degree", 1), cfg, pp)
    for g in got:
        assert g["transformer"] == PIPE_WRAPPERS[family]
        assert g["degrees"] == expected  # (Ulysses, Ring, CFG, PipeFusion) as xfuser ran it
        assert g["log"] == ref["log"]
        if pp > 1:  # one stage per rank: no decision-group collective, the decisions travel
            assert g["messages"] > 0
        else:
            assert g["collectives"] > 0
    if pp > 1:
        assert [g["stage"] for g in got] == [0, 1]
    kinds = {k for k, _, _ in ref["log"]}
    assert kinds == ({"skip", "block", "token", "full"} if which == "schedule" else {"skip", "block", "full"})
    outputs = [g for g in got if g["x"] is not None]  # xfuser returns the latents on the last rank
    assert outputs
    for g in outputs:
        torch.testing.assert_close(g["plain"], ref["plain"], rtol=0, atol=ATOL)  # xfuser itself
        torch.testing.assert_close(g["x"], ref["x"], rtol=0, atol=ATOL)
