"""X-Slim on FLUX.2 and Qwen-Image under xDiT's real sequence parallelism (xfuser 0.7's wrappers),
on CPU with gloo: Ulysses 2 and Ring 2, each with a schedule and with the online controller (FLUX.2
every level, Qwen-Image step and block); both ranks make the single device's decisions
(``token_groups=2`` there) and produce its output.

One 2-rank launch runs every case (module-scoped fixture): starting two ranks that import xfuser
is most of the cost."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from _dist import run_ranks
from _xdit_image_workers import (
    LAYOUTS,
    image_cases,
    single_device,
    single_device_pipefusion,
    single_device_qwen,
)

pytestmark = pytest.mark.multiproc

ATOL = 1e-4  # as tests/test_parallel_xdit.py: other reduction and key orders, ~1e-6 measured


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out: Path = tmp_path_factory.mktemp("flux2_xdit")
    return run_ranks(image_cases, 2, out, timeout=400)


@pytest.mark.parametrize("layout", ["ulysses2", "ring2"])
@pytest.mark.parametrize("which", ["schedule", "online"])
def test_flux2_usp_ranks_agree_with_single_device(ranks, layout, which):
    ref = single_device(2, which)
    got = [r[f"flux2/{layout}/{which}"] for r in ranks]
    assert got[0]["degrees"] == got[1]["degrees"] == LAYOUTS[layout]  # (Ulysses, Ring) as xfuser ran it
    assert got[0]["log"] == got[1]["log"] == ref["log"]
    assert {k for k, _, _ in ref["log"]} == {"skip", "block", "token", "full"}  # every level ran
    torch.testing.assert_close(got[0]["plain"], ref["plain"], rtol=0, atol=ATOL)  # xfuser itself
    for g in got:
        torch.testing.assert_close(g["x"], ref["x"], rtol=0, atol=ATOL)
    assert got[0]["collectives"] > 0


@pytest.mark.parametrize("layout", ["ulysses2", "ring2"])
@pytest.mark.parametrize("which", ["schedule", "online"])
def test_qwen_image_usp_ranks_agree_with_single_device(ranks, layout, which):
    """Qwen-Image through ``xFuserQwenImageTransformerWrapper``: the step and block levels."""
    ref = single_device_qwen(which)
    got = [r[f"qwen_image/{layout}/{which}"] for r in ranks]
    assert got[0]["degrees"] == got[1]["degrees"] == LAYOUTS[layout]
    assert got[0]["log"] == got[1]["log"] == ref["log"]
    assert {k for k, _, _ in ref["log"]} == {
        "skip",
        "block",
        "full",
    }  # token level: test_parallel_xdit_sp_token.py
    torch.testing.assert_close(got[0]["plain"], ref["plain"], rtol=0, atol=ATOL)  # xfuser itself
    for g in got:
        torch.testing.assert_close(g["x"], ref["x"], rtol=0, atol=ATOL)
    assert got[0]["collectives"] > 0


@pytest.mark.parametrize("which", ["schedule", "online"])
def test_flux2_pipefusion_stages_agree_with_single_device(ranks, which):
    """FLUX.2 under PipeFusion 2 (xfuser's ``xFuserFlux2Pipeline``, synchronous): the first stage
    decides and forwards, both stages' logs (block masks over the whole depth) equal the single
    device's ``Flux2Pipeline``, and the last stage's latents agree with it."""
    ref = single_device_pipefusion(which)
    got = [r[f"flux2/pipefusion2/{which}"] for r in ranks]
    assert [g["stage"] for g in got] == [0, 1]
    assert got[0]["log"] == got[1]["log"] == ref["log"]
    assert "block" in {k for k, _, _ in ref["log"]}
    assert got[0]["messages"] > 0  # the decisions really travelled from stage to stage
    assert got[0]["x"] is None  # the first stage returns no latents
    torch.testing.assert_close(got[1]["plain"], ref["plain"], rtol=0, atol=ATOL)  # xfuser itself
    torch.testing.assert_close(got[1]["x"], ref["x"], rtol=0, atol=ATOL)
