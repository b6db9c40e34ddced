"""X-Slim through xFuser's real pipelines on 2 gloo ranks (CPU), against diffusers on one device.

- ``xFuserPixArtSigmaPipeline`` with CFG parallelism (degree 2): each rank runs one guidance
  branch; the single device runs both as one batch.
- ``xFuserFluxPipeline`` with Ulysses degree 2: each rank holds half of the image tokens (and,
  as xFuser's FLUX pipeline does, half of the text tokens); the single device uses
  ``token_groups=2`` so that it selects tokens per half, as each rank does within its shard.
- HunyuanVideo, which xfuser 0.7.0 runs only through its runner: xfuser's
  ``xFuserHunyuanVideoTransformer3DWrapper`` with Ulysses degree 2 (it drops padded text tokens
  and splits the rest across ranks), sampled by a plain loop, against the diffusers transformer.

Both pipelines are loaded with ``from_pretrained`` from tiny random checkpoints written by
:func:`xslim_xdit.testing.pipelines.save_tiny_pipeline`. One spawn runs both layouts (importing
xfuser costs most of a spawn's ~30 s on this machine); the tests below read its results.
"""

from __future__ import annotations

import pytest
import torch
from _dist import run_ranks
from _xdit_pipeline_workers import LAYOUTS, hunyuan_single_device, pipelines, single_device

from xslim_xdit.testing.pipelines import save_tiny_pipeline

pytestmark = pytest.mark.multiproc

# Output tolerance, relative to the largest latent magnitude. The parallel runs compute the same
# float32 math in another order (CFG: two batch-1 forwards instead of one batch-2 forward;
# Ulysses: attention over all-to-all-exchanged heads, text split across ranks), so they differ
# from one device by round-off: measured <= 4.2e-7 of the max over 10 steps, for plain xfuser and
# for X-Slim alike. 1e-5 leaves 20x headroom and is still 12x (PixArt) to 490x (FLUX) below the
# effect of caching itself (X-Slim vs plain: 1.2e-4 and 4.9e-3), so a wrong decision or a wrong
# cached tensor fails it. Relative, because PixArt's DPM-Solver divides the random tiny model's
# prediction by sqrt(alpha_bar) ~ 6e-3 at the first step: its latents reach ~700.
RTOL_OF_MAX = 1e-5
FAMILIES = tuple(LAYOUTS)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("xdit_pipelines")
    paths = {f: str(save_tiny_pipeline(f, root / f)) for f in FAMILIES}
    refs = {f: single_device(f, p) for f, p in paths.items()}
    refs["hunyuan_video"] = hunyuan_single_device()
    ranks = run_ranks(pipelines, 2, root, paths, timeout=240)
    return refs, ranks


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _outputs(ranks, family, key):
    """The output of every rank that returns one (xFuser returns images on the last DP group's
    output rank only; the others get None)."""
    outs = [r[family][key] for r in ranks if r[family][key] is not None]
    assert outs, f"no rank returned {key}"
    return outs


@pytest.mark.parametrize("family", FAMILIES)
def test_xfuser_pipeline_is_wrapped_for_parallelism(runs, family):
    _, ranks = runs
    expected = {"pixart": "xFuserPixArtTransformer2DWrapper", "flux": "xFuserFluxTransformer2DWrapper"}
    assert all(r[family]["transformer"] == expected[family] for r in ranks)


@pytest.mark.parametrize("family", FAMILIES)
def test_decision_logs_agree_across_ranks_and_with_single_device(runs, family):
    refs, ranks = runs
    log = refs[family]["log"]
    assert ranks[0][family]["log"] == ranks[1][family]["log"] == log
    assert {k for k, _, _ in log} == {"skip", "block", "token", "full"}  # every level ran
    assert ranks[0][family]["collectives"] > 0  # decided together, not alone


@pytest.mark.parametrize("family", FAMILIES)
def test_xslim_output_matches_single_device(runs, family):
    refs, ranks = runs
    for x in _outputs(ranks, family, "x"):
        assert _rel(x, refs[family]["x"]) < RTOL_OF_MAX
    # the tolerance can fail: caching moves the output far more than round-off does
    assert _rel(refs[family]["x"], refs[family]["plain"]) > 10 * RTOL_OF_MAX


@pytest.mark.parametrize("family", FAMILIES)
def test_plain_xfuser_matches_diffusers(runs, family):
    refs, ranks = runs
    for x in _outputs(ranks, family, "plain"):
        assert _rel(x, refs[family]["plain"]) < RTOL_OF_MAX


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("key", ["wrapped_off", "all_full", "after_disable"])
def test_caching_off_is_bit_identical_to_plain_xfuser(runs, family, key):
    """X-Slim wrapper without a config, X-Slim with every step full, and X-Slim removed: each
    is exactly xfuser's own output."""
    _, ranks = runs
    for r in ranks:
        if r[family]["plain"] is not None:
            assert torch.equal(r[family][key], r[family]["plain"])


def test_hunyuan_video_wrapper_ulysses_matches_single_device(runs):
    refs, ranks = runs
    ref = refs["hunyuan_video"]
    assert ranks[0]["hunyuan_video"]["log"] == ranks[1]["hunyuan_video"]["log"] == ref["log"]
    assert {k for k, _, _ in ref["log"]} == {"skip", "block", "token", "full"}
    for r in ranks:
        r = r["hunyuan_video"]
        # plain Euler loop on latents of magnitude ~1-4: measured 2.4e-7 for both
        assert _rel(r["plain"], ref["plain"]) < RTOL_OF_MAX
        assert _rel(r["x"], ref["x"]) < RTOL_OF_MAX
        assert torch.equal(r["after_disable"], r["plain"])
        assert r["collectives"] > 0
    assert _rel(ref["x"], ref["plain"]) > 10 * RTOL_OF_MAX
