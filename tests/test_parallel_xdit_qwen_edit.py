"""X-Slim on Qwen-Image-Edit under xDiT's CFG parallel 2: xfuser's ``xFuserQwenImageEditPipeline``
(its transformer xfuser's ``xFuserQwenImageTransformerWrapper``) on 2 gloo ranks against diffusers'
``QwenImageEditPipeline`` on one device, same weights and seed.

xfuser's pipeline runs one guidance branch per rank but names both ranks' calls ``"cond"``;
``enable_xslim_xdit`` names them by CFG rank (``"uncond"`` on rank 0, ``"cond"`` on rank 1, as
xfuser's pipeline assigns them), so that the rank holding one device's first call of each step
supplies the statistics (the lead-branch rule, docs/parallel.md).

One 2-rank launch runs every case (module-scoped fixture): starting two ranks that import xfuser
is most of the cost."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from _dist import run_ranks
from _xdit_qwen_edit_workers import CASES, qwen_edit_cfg_cases, single_device

pytestmark = pytest.mark.multiproc

#: each branch is the same batch-1 computation on either side (no SP): measured bit-identical
ATOL = 1e-6


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out: Path = tmp_path_factory.mktemp("qwen_edit_xdit")
    return run_ranks(qwen_edit_cfg_cases, 2, out, tuple(CASES), ("strong",), timeout=300)


def _assert_indicators_equal(got: list[float | None], ref: list[float | None]) -> None:
    assert len(got) == len(ref)
    for a, b in zip(got, ref, strict=True):
        assert (a is None) == (b is None) and (a is None or abs(a - b) <= 1e-9 * max(1.0, abs(b)))


@pytest.mark.parametrize("which", ["online", "schedule", "unguided"])
def test_qwen_edit_cfg_parallel_ranks_agree_with_single_device(ranks, which):
    """Each rank runs one branch (half the single device's calls; both ranks the same unguided
    branch without a negative prompt), reads the branch its CFG rank holds, and logs the single
    device's kinds, block masks, token counts and indicators; the latents agree, and disabling
    leaves xfuser's pipeline as it was."""
    ref = single_device(which)
    got = [r[f"cfg2/{which}"] for r in ranks]
    assert [r["cfg"] for r in ranks] == [(2, 0), (2, 1)]  # CFG parallel 2, as xfuser ran it
    assert [g["branch"] for g in got] == ["uncond", "cond"]
    calls = ref["calls"] if which == "unguided" else ref["calls"] // 2
    assert got[0]["calls"] == got[1]["calls"] == calls
    assert got[0]["log"] == got[1]["log"] == ref["log"]
    kinds = {k for k, _, _ in ref["log"]}
    assert kinds == ({"full", "block", "token", "skip"} if which == "schedule" else {"full", "block", "skip"})
    for g in got:
        _assert_indicators_equal(g["indicators"], ref["indicators"])
        torch.testing.assert_close(g["x"], ref["x"], rtol=0, atol=ATOL)
        assert torch.equal(g["after"], g["plain"])  # enabling then disabling left the model as it was
    torch.testing.assert_close(got[0]["plain"], ref["plain"], rtol=0, atol=ATOL)  # xfuser itself
    assert got[0]["collectives"] > 0


def test_qwen_edit_cfg_parallel_block_masks_follow_the_lead_branch(ranks):
    """A long, channel-skewed negative prompt: the unconditional branch ranks the blocks
    differently. With the names by CFG rank, both ranks' logs and indicators equal the single
    device's and the latents agree; with xfuser's own names (both ``"cond"``) the ranks add both
    branches' block statistics, agree with each other, and choose another block mask."""
    ref = single_device("strong")
    got = [r["cfg2/strong"] for r in ranks]
    assert got[0]["log"] == got[1]["log"] == ref["log"]
    assert any(k == "block" and not all(m) for k, m, _ in ref["log"])  # blocks left out
    for g in got:
        _assert_indicators_equal(g["indicators"], ref["indicators"])
        torch.testing.assert_close(g["x"], ref["x"], rtol=0, atol=ATOL)
    unwired = [r["cfg2/strong/unwired"] for r in ranks]
    assert [u["branch"] for u in unwired] == ["cond", "cond"]
    assert unwired[0]["log"] == unwired[1]["log"] != ref["log"]  # the ranks agreed, wrongly
    assert (unwired[0]["x"] - ref["x"]).abs().max() > 1e-3
