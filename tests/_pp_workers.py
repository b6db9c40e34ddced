"""PipeFusion rank functions: tiny FLUX through xfuser's own xFuserFluxPipeline and tiny
PixArt-Sigma through xFuserPixArtSigmaPipeline (CPU, gloo)."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from xslim_xdit import Schedule, XSlimConfig, disable_xslim, enable_xslim
from xslim_xdit.testing.pipelines import (
    TINY_CALL_KWARGS,
    tiny_flux_embeds_call,
    tiny_flux_embeds_pipeline,
    tiny_pipeline,
)
from xslim_xdit.testing.xfuser import xfuser_engine_config

STEPS = 8
HEIGHT = WIDTH = 64
TXT = 8
CONFIGS = {
    "online": dict(warn=0.12, crit=0.3, polish="block", warmup_steps=2, partial_reset=0.5, block_thresh=2.0),
    "schedule": dict(
        mode="schedule", schedule=Schedule(STEPS, (0, 1, 4, 7), block_steps=(2, 5)), block_thresh=2.0
    ),
    # token refresh under PipeFusion (FLUX): a schedule with every kind, and the online controller
    "token": dict(
        mode="schedule", schedule=Schedule(STEPS, (0, 1, 4, 7), token_steps=(2, 5, 6)), token_ratio=0.5
    ),
    # every step forced full with every level on: the token processors only delegate
    "forced_full": dict(warn=1e-12, crit=2e-12, polish="auto"),
    "token_online": dict(
        warn=0.12, crit=0.3, polish="token", warmup_steps=2, partial_reset=0.5, token_ratio=0.5
    ),
}


def _call(family: str = "flux") -> dict[str, Any]:
    if family == "pixart":  # 64 px: 8x8 latents, 4x4 = 16 image tokens; batched CFG (batch 2)
        kw = dict(TINY_CALL_KWARGS["pixart"], max_sequence_length=TXT)
        return dict(kw, prompt="a cat", num_inference_steps=STEPS, output_type="latent")
    return tiny_flux_embeds_call(STEPS, HEIGHT, WIDTH, TXT)


def _pipeline(family: str) -> Any:
    """The family's tiny diffusers pipeline (the same weights on every rank)."""
    return tiny_pipeline("pixart") if family == "pixart" else tiny_flux_embeds_pipeline()


def _calls(eng: Any) -> list[tuple]:
    """Per transformer call: ``(step, branch, kind, indicator)`` (what a failing test prints)."""
    return [(r.step, r.branch, r.kind, r.indicator) for r in eng.statistics.run_records()]


def _tokens(eng: Any) -> list[tuple]:
    """Per transformer call: ``(step, branch, token count of the step, tokens this call computed)``."""
    return [(r.step, r.branch, r.token_count, r.tokens_computed) for r in eng.statistics.run_records()]


class _TokenSpy:
    """Records every token set the room selects, per call: ``(step, branch, index)``."""

    def __init__(self, eng: Any) -> None:
        self.eng, self.sets = eng, []
        self.orig = eng.room._select_tokens
        eng.room._select_tokens = self

    def __call__(self, caches: Any, change: torch.Tensor | None = None) -> torch.Tensor:
        idx = self.orig(caches, change)
        if change is None:  # the room's call (PipeFusion's first stage calls back with the change)
            self.sets.append((self.eng.step, self.eng.branch, idx.tolist()))
        return idx


def single_device(
    which: str, token_group_sizes: list[int] | None = None, family: str = "flux", **overrides: Any
) -> dict:
    """The single device's run of config ``which`` (``overrides``: more config fields;
    ``token_group_sizes``: explicit token groups, PipeFusion's patches)."""
    pipe = _pipeline(family)
    with torch.no_grad():
        plain = pipe(generator=torch.Generator().manual_seed(3), **_call(family)).images
    eng = enable_xslim(pipe, XSlimConfig(**{**CONFIGS[which], **overrides}))
    eng.room.token_group_sizes = token_group_sizes
    spy = _TokenSpy(eng)
    with torch.no_grad():
        out = pipe(generator=torch.Generator().manual_seed(3), **_call(family)).images
    log = eng.statistics.decision_log()
    calls, tokens = _calls(eng), _tokens(eng)
    disable_xslim(pipe)
    return {"log": log, "x": out, "plain": plain, "calls": calls, "tokens": tokens, "sets": spy.sets}


def pipefusion(
    rank: int, world: int, which: str, warmup_steps: int, patches: int, ulysses: int = 1, family: str = "flux"
) -> dict:
    """One PipeFusion run of config ``which`` on this rank (2 stages x ``ulysses``)."""
    dist.init_process_group("gloo")
    try:
        return _pipefusion_run(which, warmup_steps, patches, ulysses, family)
    finally:
        dist.destroy_process_group()


def pipefusion_cases(rank: int, world: int, family: str, cases: list[tuple[str, int, int]]) -> dict:
    """Several PipeFusion runs in one launch (xfuser's groups rebuilt between them): per
    ``(which, warmup_steps, patches)`` of ``cases``, :func:`pipefusion`'s result."""
    from xslim_xdit.integrations.xfuser_runtime import reset_xfuser_parallel_state

    dist.init_process_group("gloo")
    try:
        out = {}
        for which, warmup_steps, patches in cases:
            out[(which, warmup_steps, patches)] = _pipefusion_run(which, warmup_steps, patches, 1, family)
            reset_xfuser_parallel_state()
        out["refusal"] = _refused_up_front(family)
        return out
    finally:
        dist.destroy_process_group()


def _engine_config(warmup_steps: int, patches: int, ulysses: int) -> Any:
    """xfuser's engine config of PipeFusion 2 (x ``ulysses``) for the tiny pipelines' calls."""
    engine_config, _ = xfuser_engine_config(
        torch.float32,
        height=HEIGHT,
        width=WIDTH,
        num_inference_steps=STEPS,
        max_sequence_length=TXT,
        pipefusion_parallel_degree=2,
        ulysses_degree=ulysses,
        num_pipeline_patch=patches,
        warmup_steps=warmup_steps,
    )
    return engine_config


def _refused_up_front(family: str) -> dict:
    """``enable_xslim_xdit`` with token refresh under PipeFusion, ``family`` taken off the
    supported list: the refusal's message, and whether anything was attached before it."""
    from xfuser import xFuserFluxPipeline, xFuserPixArtSigmaPipeline

    import xslim_xdit.stage as stage
    from xslim_xdit.api import get_engines
    from xslim_xdit.integrations.xfuser import enable_xslim_xdit

    cls = xFuserPixArtSigmaPipeline if family == "pixart" else xFuserFluxPipeline
    xpipe = cls(_pipeline(family), _engine_config(1, 2, 1))
    processors = [type(m.processor).__name__ for m in xpipe.transformer.modules() if hasattr(m, "processor")]
    supported, stage.TOKEN_REFRESH_FAMILIES = stage.TOKEN_REFRESH_FAMILIES, ("other",)
    try:
        enable_xslim_xdit(xpipe, XSlimConfig(**CONFIGS["token"]))
        message = None
    except NotImplementedError as e:
        message = str(e)
    finally:
        stage.TOKEN_REFRESH_FAMILIES = supported
    after = [type(m.processor).__name__ for m in xpipe.transformer.modules() if hasattr(m, "processor")]
    return {"message": message, "engines": len(get_engines(xpipe)), "untouched": processors == after}


def _pipefusion_run(which: str, warmup_steps: int, patches: int, ulysses: int, family: str) -> dict:
    from xslim_xdit.integrations.xfuser_compat import apply_xfuser_cpu_compat

    apply_xfuser_cpu_compat()  # before xfuser is imported (an import sorter would reorder imports)
    from xfuser import xFuserFluxPipeline, xFuserPixArtSigmaPipeline
    from xfuser.core.distributed import get_runtime_state

    from xslim_xdit.integrations.xfuser import enable_xslim_xdit

    cls = xFuserPixArtSigmaPipeline if family == "pixart" else xFuserFluxPipeline
    xpipe = cls(_pipeline(family), _engine_config(warmup_steps, patches, ulysses))
    with torch.no_grad():
        plain = xpipe(generator=torch.Generator().manual_seed(3), **_call(family))
    eng = enable_xslim_xdit(xpipe, XSlimConfig(**CONFIGS[which]))
    spy = _TokenSpy(eng)
    buffered = []  # token calls whose K/V went through PipeFusion's buffer: (rows in, rows back)
    landed = []  # and whether the buffer that came back holds the call's K/V at its patch's rows
    if eng.token_ctx is not None and eng.token_ctx.kv_buffer is not None:
        kv_buffer = eng.token_ctx.kv_buffer

        def counted(attn: Any, k: torch.Tensor, v: torch.Tensor, seq_dim: int = 1) -> tuple:
            k2, v2 = kv_buffer(attn, k, v, seq_dim)
            n = k.shape[seq_dim]
            state = get_runtime_state()
            start = (
                state.pp_patches_token_start_idx_local[state.pipeline_patch_idx] if state.patch_mode else 0
            )
            buffered.append((n, k2.shape[seq_dim]))
            landed.append(
                torch.equal(k2.narrow(seq_dim, start, n), k) and torch.equal(v2.narrow(seq_dim, start, n), v)
            )
            return k2, v2

        eng.token_ctx.kv_buffer = counted
    with torch.no_grad():
        out = xpipe(generator=torch.Generator().manual_seed(3), **_call(family))
    res = {
        "log": eng.statistics.decision_log(),
        "calls": _calls(eng),
        "tokens": _tokens(eng),
        "sets": spy.sets,
        "patch_tokens": list(get_runtime_state().pp_patches_token_num or []),
        "buffered": buffered,
        "landed": landed,
        "blocks": len(eng.blocks),
        "x": None if out is None else out.images,
        "plain": None if plain is None else plain.images,
        "messages": eng.pipeline.messages,
        "stage": eng.pipeline.stage,
    }
    eng.pipeline.close()
    disable_xslim(xpipe)
    if which == "forced_full":  # disabled: plain PipeFusion again, bit for bit
        with torch.no_grad():
            after = xpipe(generator=torch.Generator().manual_seed(3), **_call(family))
        res["after_disable"] = None if after is None else after.images
    return res


def global_token_sets(sets: list[tuple], sizes: list[int] | None) -> dict[int, list[list[int]]]:
    """Per step, each sample's refreshed tokens over the whole image: a PipeFusion patch's
    positions (one call per patch: branch = patch) moved to the patch's rows."""
    by_step: dict[int, list[tuple[int, list[list[int]]]]] = {}
    for step, branch, idx in sets:
        by_step.setdefault(step, []).append((branch, idx))
    out: dict[int, list[list[int]]] = {}
    for step, calls in by_step.items():
        if len(calls) == 1:
            out[step] = calls[0][1]
            continue
        assert sizes is not None
        rows = [[] for _ in calls[0][1]]
        for branch, idx in sorted(calls):
            start = sum(sizes[:branch])
            for r, sample in enumerate(idx):
                rows[r] += [start + i for i in sample]
        out[step] = rows
    return out
