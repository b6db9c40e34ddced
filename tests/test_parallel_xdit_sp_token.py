"""Token refresh under xDiT's sequence parallelism (xfuser 0.7, Ulysses 2 and Ring 2, CPU, gloo)
for CogVideoX (through ``xFuserCogVideoXPipeline``) and Qwen-Image (through xfuser's bare
``xFuserQwenImageTransformerWrapper``) and LTX-2 (through xfuser's bare
``xFuserLTX2VideoTransformer3DWrapper``, the audio whole on every rank): every rank's decision log equals the single
device's (``token_groups`` = 2 there), each token step's token set on a rank is the single
device's set within that rank's shard, the output agrees with the single device's, and forced
full with every level offered equals plain xfuser.

One 2-rank launch runs every case (module-scoped fixture): starting two ranks that import xfuser
is most of the cost."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from _dist import run_ranks
from _xdit_sp_token_workers import (
    LAYOUTS,
    single_device_cogvideox,
    single_device_ltx2,
    single_device_qwen_image,
    sp_token_cases,
)

pytestmark = pytest.mark.multiproc

#: as tests/test_parallel_xdit_more.py: other reduction and key orders (the gathered keys are in
#: rank-major order); measured below 1e-5 (see docs/parallel.md)
ATOL = 1e-4


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out: Path = tmp_path_factory.mktemp("sp_token")
    return run_ranks(sp_token_cases, 2, out, timeout=300)


#: family -> (its single-device reference, xfuser's transformer wrapper, image tokens per rank)
FAMILIES = {
    "cogvideox": (single_device_cogvideox, "xFuserCogVideoXTransformer3DWrapper", 8),
    "qwen_image": (single_device_qwen_image, "xFuserQwenImageTransformerWrapper", 8),
    "ltx2": (single_device_ltx2, "xFuserLTX2VideoTransformer3DWrapper", 16),
}


@pytest.fixture(scope="module")
def refs() -> dict[str, dict[str, Any]]:
    return {}


def _ref(refs: dict[str, dict[str, Any]], family: str) -> dict[str, Any]:
    if family not in refs:
        refs[family] = FAMILIES[family][0]()
    return refs[family]


def _got(ranks: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    got = [r[key] for r in ranks]
    for g in got:
        assert "error" not in g, g.get("error")
    return got


def _shard_picks(picks: list[torch.Tensor], rank: int, shard: int) -> list[torch.Tensor]:
    """The single device's token sets (token groups = ranks) restricted to ``rank``'s shard, in
    the shard's own positions."""
    out = []
    for index in picks:
        half = index.shape[1] // 2
        out.append(index[:, rank * half : (rank + 1) * half] - rank * shard)
    return out


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_token_refresh_under_usp_matches_single_device(ranks, refs, family, layout):
    ref_all = _ref(refs, family)
    _, wrapper, shard = FAMILIES[family]
    got = _got(ranks, f"{family}/{layout}")
    for g in got:
        assert g["degrees"] == LAYOUTS[layout]  # (Ulysses, Ring) as xfuser ran it
        assert g["transformer"] == wrapper
    outputs = [g for g in got if g["plain"] is not None]  # xfuser returns the latents on the last rank
    assert outputs
    for g in outputs:
        torch.testing.assert_close(g["plain"], ref_all["plain"], rtol=0, atol=ATOL)  # xfuser itself
    for which in ("schedule", "online"):
        ref = ref_all[which]
        kinds = {k for k, _, _ in ref["log"]}
        assert "token" in kinds and "full" in kinds
        if which == "schedule":
            assert kinds == {"skip", "block", "token", "full"}
        assert ref["picks"]
        for rank, g in enumerate(got):
            r = g[which]
            assert r["log"] == ref["log"], which
            assert len(r["picks"]) == len(ref["picks"])
            for mine, theirs in zip(r["picks"], _shard_picks(ref["picks"], rank, shard), strict=True):
                assert torch.equal(mine, theirs), which
            assert r["collectives"] > 0 and r["gathers"] > 0  # the other shard's K/V really came
        for g in outputs:
            torch.testing.assert_close(g[which]["x"], ref["x"], rtol=0, atol=ATOL)
    # forced full with every level offered (run under Ulysses): plain xfuser, bit for bit
    for g in outputs if layout == "ulysses2" else []:
        assert {k for k, _, _ in g["forced"]["log"]} == {"full"}
        assert torch.equal(g["forced"]["x"], g["plain"])
