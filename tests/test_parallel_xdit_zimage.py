"""X-Slim on xfuser 0.7's ``xFuserZImageTransformer2DWrapper`` (bare, tiny model, CPU, 2 gloo ranks):
Ulysses 2 and Ring 2 with a schedule (full, block and skip steps) and the online controller (block
polish), and CFG parallel 2 (a batch of two samples, one per rank), online; diffusers'
``ZImagePipeline`` with the wrapper as its transformer under Ulysses 2 and CFG parallel 2. Every rank's decision
log (kinds, block masks) equals the single device's ``ZImageTransformer2DModel`` with the same
weights, the indicators agree within round-off, and the outputs within ``ATOL``; the token level
is refused under sequence parallelism before any work.

One launch runs every case (module-scoped fixture): starting two ranks that import xfuser is most
of the cost."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest
import torch
from _dist import run_ranks
from _xdit_zimage_workers import (
    CASES,
    LAYOUTS,
    PIPE_LAYOUTS,
    single_device,
    single_device_pipeline,
    zimage_cases,
)

pytestmark = pytest.mark.multiproc

# other reduction and key orders than one device's (measured: below 1e-5 on these latents)
ATOL = 1e-4
# the indicator is a ratio of sums reduced over the ranks in float64 from float32 partials
INDICATOR_RTOL = 1e-5


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out: Path = tmp_path_factory.mktemp("zimage_xdit")
    return run_ranks(zimage_cases, 2, out, timeout=400)


@functools.cache
def _single_device(which: str, batch: int) -> dict[str, Any]:
    return single_device(which, batch)


@pytest.mark.parametrize("case", CASES)
def test_z_image_wrapper_ranks_agree_with_single_device(ranks, case):
    """Each rank's decision log equals one device's; indicators and outputs agree; xfuser's own
    output (X-Slim off) too."""
    layout, which = case.split("/")
    ulysses, ring, cfg, _, batch = LAYOUTS[layout]
    ref = _single_device(which, batch)
    assert {k for k, _, _ in ref["log"]} == {"full", "block", "skip"}  # every level that runs under SP
    for r in ranks:
        assert "error" not in r[layout], r[layout].get("error")
        got = r[layout][which]
        assert r[layout]["degrees"] == (ulysses, ring, 2 if cfg else 1)  # the layout xfuser really ran
        assert got["log"] == ref["log"]
        assert [i is None for i in got["indicators"]] == [i is None for i in ref["indicators"]]
        for a, b in zip(got["indicators"], ref["indicators"], strict=True):
            if a is not None:
                assert a == pytest.approx(b, rel=INDICATOR_RTOL, abs=1e-9)
        torch.testing.assert_close(r[layout]["plain"], ref["plain"], rtol=0, atol=ATOL)  # xfuser itself
        torch.testing.assert_close(got["x"], ref["x"], rtol=0, atol=ATOL)
        assert not torch.equal(got["x"], r[layout]["plain"])  # steps were really reused
        assert got["collectives"] > 0


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_z_image_wrapper_left_as_it_was(ranks, layout):
    """After X-Slim is disabled the wrapper's plain output is bit-identical to before, weights untouched."""
    for r in ranks:
        assert "error" not in r[layout], r[layout].get("error")
        assert torch.equal(r[layout]["after"], r[layout]["plain"])
        assert r[layout]["weights_kept"]


@pytest.mark.parametrize("layout", PIPE_LAYOUTS)
def test_z_image_pipeline_with_the_wrapper_agrees_with_single_device(ranks, layout):
    """diffusers' ``ZImagePipeline`` (CFG batched in one call) with xfuser's wrapper as its
    transformer: under CFG parallel the wrapper puts one guidance half on each rank, under Ulysses
    it shards both; each rank's log equals the single device's pipeline, latents agree."""
    ref = _single_device_pipeline()
    assert {k for k, _, _ in ref["log"]} == {"full", "block", "skip"}
    for r in ranks:
        got = r[f"{layout}/pipeline"]
        assert "error" not in got, got.get("error")
        assert got["log"] == ref["log"]
        for a, b in zip(got["indicators"], ref["indicators"], strict=True):
            assert (a is None) == (b is None)
            if a is not None:
                assert a == pytest.approx(b, rel=INDICATOR_RTOL, abs=1e-9)
        torch.testing.assert_close(got["plain"], ref["plain"], rtol=0, atol=ATOL)  # xfuser itself
        torch.testing.assert_close(got["x"], ref["x"], rtol=0, atol=ATOL)


@functools.cache
def _single_device_pipeline() -> dict[str, Any]:
    return single_device_pipeline()


def test_z_image_token_level_refused_under_sequence_parallelism(ranks):
    """A config with token steps is refused under Ulysses 2 with a ConfigError naming the family."""
    for r in ranks:
        message = r["ulysses2/token"]
        assert message is not None
        assert "z_image" in message and "token" in message
