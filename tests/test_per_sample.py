"""Per-sample decisions in a batch (``XSlimConfig(per_sample=True)``): each sample of a batch
decides, caches and computes as it does alone with the same seed.

Exactness: on this CPU a batched matmul differs from the single-sample one in the last bits (the
full computation of a batch of 3 vs each sample alone differs by 2e-7 to 5e-7 after 10 steps,
measured), so a sample's output is compared with its single run within ``ATOL`` = 1e-5 (measured
at most 1e-6 with caching); its decisions must be equal. A sample run under another sample's
decisions is off by more than 1e-3 (asserted below), so the tolerance tells them apart.
"""

from __future__ import annotations

import pytest
import torch
from _batch_workers import ONLINE, STEPS, batch_inputs, run

from xslim_xdit import ConfigError, Schedule, XSlimConfig, disable_xslim, enable_xslim
from xslim_xdit.testing import tiny_model

ATOL = 1e-5
SEEDS = [0, 1, 2]


def _differ_somewhere(kinds: list[list[str]]) -> bool:
    """At some step one sample skips or reuses blocks where another computes more."""
    return any(len({row[s] for row in kinds}) > 1 for s in range(len(kinds[0])))


@pytest.mark.parametrize("family", ["dit", "flux"])
def test_online_batch_of_three_equals_single_runs(family):
    model = tiny_model(family)
    cfg = XSlimConfig(per_sample=True, guidance_pairs="none", **ONLINE[family])
    x, cond = batch_inputs(family, SEEDS)
    plain = run(model, family, x, cond)
    eng = enable_xslim(model, cfg, num_inference_steps=STEPS)
    out = run(model, family, x, cond)
    stats = eng.statistics
    kinds = stats.sample_kinds()
    assert _differ_somewhere(kinds), kinds  # otherwise this test proves nothing
    mixed = [r for r in stats.run_records() if len(set(r.sample_kinds)) > 1]
    assert mixed and all(0 < r.flops < r.flops_full for r in mixed)
    # FLOPs follow the rows computed: a call where more rows compute costs more
    by_rows = {r.tokens_computed: r.flops for r in stats.run_records() if r.sample_kinds}
    counts = sorted(by_rows)
    assert all(by_rows[a] < by_rows[b] for a, b in zip(counts, counts[1:], strict=False))
    for i, seed in enumerate(SEEDS):
        xi, ci = batch_inputs(family, [seed])
        eng.start_run(STEPS)
        alone = run(model, family, xi, ci)
        assert stats.sample_kinds() == [kinds[i]]
        torch.testing.assert_close(out[i : i + 1], alone, rtol=0, atol=ATOL)
    # the yardstick: the full computation of the batch vs each sample alone
    disable_xslim(model)
    for i, seed in enumerate(SEEDS):
        xi, ci = batch_inputs(family, [seed])
        assert (run(model, family, xi, ci) - plain[i : i + 1]).abs().max() < 1e-6


def test_whole_batch_decisions_would_not_equal_single_runs():
    """The control: one decision per call for the batch makes some sample run other steps than
    alone, and its output moves by far more than ATOL."""
    model = tiny_model("dit")
    x, cond = batch_inputs("dit", SEEDS)
    eng = enable_xslim(model, XSlimConfig(**ONLINE["dit"]), num_inference_steps=STEPS)
    shared = run(model, "dit", x, cond)
    shared_kinds = eng.statistics.summary()["kinds"]
    eng = enable_xslim(model, XSlimConfig(per_sample=True, **ONLINE["dit"]), num_inference_steps=STEPS)
    own = run(model, "dit", x, cond)
    rows = [i for i, k in enumerate(eng.statistics.sample_kinds()) if k != shared_kinds]
    assert rows
    assert max((shared[i] - own[i]).abs().max().item() for i in rows) > 1e-3
    disable_xslim(model)


def test_schedule_each_sample_equals_single_run_block_masks_per_sample():
    """A schedule gives every sample the same kinds; block sets come from each sample's own block
    statistics (the whole-batch path sums them over the batch)."""
    model = tiny_model("pixart")
    sched = Schedule(STEPS, (0, 1, 5, 9), block_steps=(2, 3, 6, 7))
    cfg = XSlimConfig(mode="schedule", schedule=sched, per_sample=True, block_thresh=1.5, block_first_n=0)
    x, cond = batch_inputs("pixart", SEEDS)
    eng = enable_xslim(model, cfg, num_inference_steps=STEPS)
    out = run(model, "pixart", x, cond)
    kinds = eng.statistics.sample_kinds()
    assert all(k == kinds[0] for k in kinds) and "block" in kinds[0] and "skip" in kinds[0]
    masks = [eng.statistics.run_records()[s].sample_masks for s in sched.block_steps]
    for i, seed in enumerate(SEEDS):
        xi, ci = batch_inputs("pixart", [seed])
        eng.start_run(STEPS)
        alone = run(model, "pixart", xi, ci)
        assert [eng.statistics.run_records()[s].sample_masks[0] for s in sched.block_steps] == [
            m[i] for m in masks
        ]
        torch.testing.assert_close(out[i : i + 1], alone, rtol=0, atol=ATOL)
    disable_xslim(model)


def test_guidance_halves_share_decisions():
    """Batched guidance: rows i and i + B/2 (one prompt's two branches) always decide together;
    ``"auto"`` finds them from their identical image inputs. DiT's probe reads the class label,
    so the two branches' own indicators differ (with ``"none"`` they decide apart)."""
    model = tiny_model("dit")
    x, cond = batch_inputs("dit", [0, 1])
    labels = torch.cat([torch.full((2,), 9), cond["class_labels"]])  # uncond (class 9), cond
    logs = {}
    for pairs in ("none", "auto", "halves"):
        cfg = XSlimConfig(per_sample=True, guidance_pairs=pairs, **ONLINE["dit"])
        eng = enable_xslim(model, cfg, num_inference_steps=STEPS)
        _run_guided(model, x, labels)
        logs[pairs] = eng.statistics.sample_kinds()
    assert logs["none"][0] != logs["none"][2] or logs["none"][1] != logs["none"][3]
    for pairs in ("auto", "halves"):
        kinds = logs[pairs]
        assert kinds[0] == kinds[2] and kinds[1] == kinds[3]
    assert logs["auto"] == logs["halves"]
    disable_xslim(model)


@torch.no_grad()
def _run_guided(model, x, labels):
    """A batched-CFG loop: the two halves get the same latents at every step."""
    from xslim_xdit.adapters import adapter_named

    ad = adapter_named("dit")
    for t in ad.timesteps(STEPS):
        out = ad.tiny_forward(
            model, torch.cat([x, x]), ad.timestep_input(t, 2 * x.shape[0]), {"class_labels": labels}
        )
        u, c = out.chunk(2)
        x = x - (1.0 / STEPS) * (u + 2.0 * (c - u))
    return x


def test_pipeline_two_prompts_with_batched_guidance_equal_single_runs():
    """A real diffusers pipeline (PixArt-Sigma, batched CFG): two prompts with a generator each;
    each image equals the one the prompt gets alone with its generator."""
    from xslim_xdit.testing.pipelines import TINY_CALL_KWARGS, tiny_pipeline

    pipe = tiny_pipeline("pixart")
    prompts, seeds, steps = ["a red cat", "two blue dogs on grass"], [3, 4], 8
    kw = dict(TINY_CALL_KWARGS["pixart"], num_inference_steps=steps, output_type="latent")
    cfg = XSlimConfig(per_sample=True, warmup_steps=2, warn=0.1, crit=0.3)
    eng = enable_xslim(pipe, cfg)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    both = pipe(prompts, generator=gens, **kw).images
    kinds = eng.statistics.sample_kinds()
    assert len(kinds) == 4 and kinds[0] == kinds[2] and kinds[1] == kinds[3]  # the CFG pairs
    assert kinds[0] != kinds[1]  # the two prompts decided differently
    for i, (prompt, seed) in enumerate(zip(prompts, seeds, strict=True)):
        alone = pipe(prompt, generator=torch.Generator().manual_seed(seed), **kw).images
        assert eng.statistics.sample_kinds()[0] == kinds[i]
        torch.testing.assert_close(both[i : i + 1], alone, rtol=0, atol=ATOL)
    disable_xslim(pipe)


def test_per_sample_off_keeps_records_as_before():
    model = tiny_model("dit")
    eng = enable_xslim(model, XSlimConfig(**ONLINE["dit"]), num_inference_steps=STEPS)
    run(model, "dit", *batch_inputs("dit", SEEDS))
    assert all(r.sample_kinds is None for r in eng.statistics.records)
    assert all(len(entry) == 3 for entry in eng.statistics.decision_log())
    disable_xslim(model)


def test_batch_change_within_a_run_is_refused():
    model = tiny_model("dit")
    enable_xslim(model, XSlimConfig(per_sample=True, **ONLINE["dit"]), num_inference_steps=STEPS)
    from xslim_xdit.adapters import adapter_named

    ad = adapter_named("dit")
    x, cond = batch_inputs("dit", SEEDS)
    with torch.no_grad():
        model(x, timestep=ad.timestep_input(999.0, 3), **cond)
        with pytest.raises(RuntimeError, match="batch changed within a run"):
            model(x[:2], timestep=ad.timestep_input(899.0, 2), class_labels=cond["class_labels"][:2])
    disable_xslim(model)


@pytest.mark.parametrize(
    "fields, name",
    [
        (dict(per_sample=1), "per_sample"),
        (dict(per_sample=True, polish="token"), "per_sample"),
        (dict(per_sample=True, polish="auto"), "per_sample"),
        (
            dict(per_sample=True, mode="schedule", schedule=Schedule(4, (0, 3), token_steps=(1,))),
            "per_sample",
        ),
        (dict(guidance_pairs="pairs"), "guidance_pairs"),
    ],
)
def test_config_refuses(fields, name):
    with pytest.raises(ConfigError, match=f"^{name} must be"):
        XSlimConfig(**fields)


def test_flux_pipeline_true_cfg_by_separate_calls_equals_single_runs():
    """FLUX with true CFG calls the transformer once per branch (``cache_context``): the uncond
    call follows each sample's decision of the cond call, with caches of its own."""
    from xslim_xdit.testing.pipelines import TINY_CALL_KWARGS, tiny_pipeline

    pipe = tiny_pipeline("flux")
    pipe.set_progress_bar_config(disable=True)
    kw = dict(TINY_CALL_KWARGS["flux"], num_inference_steps=8, output_type="latent", true_cfg_scale=2.0)
    prompts, negatives, seeds = ["a red cat", "two blue dogs"], ["blurry", "ugly"], [3, 4]
    eng = enable_xslim(pipe, XSlimConfig(per_sample=True, **ONLINE["flux"]))
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    both = pipe(prompts, negative_prompt=negatives, generator=gens, **kw).images
    kinds = eng.statistics.sample_kinds()
    assert kinds[0] != kinds[1]
    assert len(eng.statistics.run_records()) == 2 * len(kinds[0])  # two branches per step
    for i in range(2):
        gen = torch.Generator().manual_seed(seeds[i])
        alone = pipe(prompts[i], negative_prompt=negatives[i], generator=gen, **kw).images
        assert eng.statistics.sample_kinds() == [kinds[i]]
        torch.testing.assert_close(both[i : i + 1], alone, rtol=0, atol=ATOL)
    disable_xslim(pipe)


@pytest.mark.parametrize(
    "indicator, thresholds",
    [("modulated_input", {}), ("first_block_residual", dict(warn=0.4, crit=1.0))],
)
def test_one_sample_is_the_whole_batch_path_bit_for_bit(indicator, thresholds):
    """A batch of one decides and computes exactly as the default path does."""
    model = tiny_model("flux")
    x, cond = batch_inputs("flux", [1])
    outs, logs = [], []
    for per_sample in (False, True):
        fields = {**ONLINE["flux"], **thresholds}
        cfg = XSlimConfig(per_sample=per_sample, step_indicator=indicator, **fields)
        eng = enable_xslim(model, cfg, num_inference_steps=STEPS)
        outs.append(run(model, "flux", x, cond))
        logs.append([(r.kind, r.indicator, r.blocks_computed, r.flops) for r in eng.statistics.run_records()])
    disable_xslim(model)
    assert {k for k, *_ in logs[0]} >= {"skip", "block", "full"}, logs[0]
    assert logs[0] == logs[1]
    assert torch.equal(outs[0], outs[1])
