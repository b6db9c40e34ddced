"""Rank functions running the newer video/image families through xfuser 0.7's own bare
sequence-parallel transformer wrappers, on CPU with gloo, and the single-device references they are
compared with:

- HunyuanVideo 1.5 (``xFuserHunyuanVideo15Transformer3DWrapper``: video tokens and their RoPE
  tables chunked over the SP group; the condition sequence's padding dropped, and the condition
  split over the SP group when its length divides, else kept whole), the full multi-rank case:
  Ulysses 2 and Ring 2, each with a schedule (every level, token refresh gathering the other
  shard's K/V) and the online controller;
- LTX-2 (``xFuserLTX2VideoTransformer3DWrapper``: video tokens chunked, audio whole on every rank),
  one Ulysses 2 case, online (step and block levels: X-Slim refuses LTX-2's token level anyway);
- Z-Image (``xFuserZImageTransformer2DWrapper``): xfuser itself runs under Ulysses 2 (compared with
  one device); X-Slim refuses the wrapper, and the refusal is recorded.

One launch runs every case (two spawned ranks importing xfuser take most of a minute on a loaded
CPU)."""

from __future__ import annotations

import copy
import importlib
import traceback
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist

from xslim_xdit import Schedule, XSlimConfig, disable_xslim, enable_xslim
from xslim_xdit.testing import sample, tiny_model

STEPS = 10
#: every level: full, block, token and skip steps
SCHEDULE = dict(mode="schedule", schedule=Schedule(STEPS, (0, 1, 5, 9), (2, 7), (3, 4, 6)), token_ratio=0.5)
#: online: on the tiny HunyuanVideo 1.5 (2 x 4 x 4 latents: 32 video tokens) full, skip, block and
#: token steps all occur (FFSBBBBTTF on one device)
ONLINE = dict(warn=0.12, crit=0.26, polish="auto", warmup_steps=2, partial_reset=0.3, token_ratio=0.5)
#: LTX-2 online, block polish (no token level): FFSBBBBBBF on one device
LTX2_ONLINE = dict(warn=0.12, crit=0.26, polish="block", warmup_steps=2, partial_reset=0.3)
#: (Ulysses, Ring) degrees, in the order one launch runs them
LAYOUTS = {"ulysses2": (2, 1), "ring2": (1, 2)}
#: LTX-2's tiny model with the "split" RoPE layout: with diffusers' default "interleaved" tables
#: ((batch, tokens, dim)), xfuser's video-to-audio processor gathers the key RoPE tables along
#: dim 2 (the feature dimension; the token dimension of "split" tables (batch, heads, tokens,
#: dim/2)) and fails (transformer_ltx2.py, xFuserLTX2AudioVideoAttnProcessor.__call__)
LTX2_OVERRIDES = {"rope_type": "split"}

#: family -> (xfuser module, wrapper class)
WRAPPERS = {
    "hunyuan_video15": ("transformer_hunyuan_video15", "xFuserHunyuanVideo15Transformer3DWrapper"),
    "ltx2": ("transformer_ltx2", "xFuserLTX2VideoTransformer3DWrapper"),
    "z_image": ("transformer_z_image", "xFuserZImageTransformer2DWrapper"),
}


def _model(family: str) -> torch.nn.Module:
    return tiny_model(family, **(LTX2_OVERRIDES if family == "ltx2" else {}))


def config(family: str, which: str, sp: int) -> XSlimConfig:
    """The run's config; ``sp`` token groups make the single device select tokens within each
    rank's shard, as the ranks do (contiguous chunks of the flattened video tokens)."""
    table = {
        ("hunyuan_video15", "schedule"): SCHEDULE,
        ("hunyuan_video15", "online"): ONLINE,
        ("ltx2", "online"): LTX2_ONLINE,
    }
    return XSlimConfig(token_groups=sp, **table[family, which])


def single_device(family: str, which: str) -> dict[str, Any]:
    """The diffusers transformer on one device, with X-Slim (``which``, token groups 2) and without."""
    m = _model(family)
    eng = enable_xslim(m, config(family, which, 2), num_inference_steps=STEPS)
    x = sample(m, family, steps=STEPS)
    log = eng.statistics.decision_log()
    disable_xslim(m)
    return {"log": log, "x": x, "plain": sample(m, family, steps=STEPS)}


def _wrap(family: str, model: torch.nn.Module) -> torch.nn.Module:
    """xfuser's wrapper of ``family`` with ``model``'s config and weights."""
    module, name = WRAPPERS[family]
    cls = getattr(importlib.import_module(f"xfuser.model_executor.models.transformers.{module}"), name)
    # Z-Image's wrapper takes **kwargs, which diffusers' from_config does not fill: pass the config
    wrapped = cls(**{k: v for k, v in model.config.items() if not k.startswith("_")})
    if family == "hunyuan_video15":
        # the tiny model narrows the ByT5 projection (the class fixes its width at 2048)
        wrapped.context_embedder_2 = copy.deepcopy(model.context_embedder_2)
    wrapped.load_state_dict(model.state_dict())
    return wrapped.eval()


def _init_runtime(model: torch.nn.Module, ulysses: int, ring: int) -> None:
    """xfuser's config, groups and runtime state as its runners build them for these bare wrappers
    (as for Wan: no ``set_input_parameters``; each wrapper shards its tokens itself). Ring gets
    SDPA_FLASH (it needs the log-sum-exp; the CPU compat layer routes it)."""
    from xslim_xdit.integrations.xfuser_compat import apply_xfuser_cpu_compat

    apply_xfuser_cpu_compat()
    from xfuser.config import xFuserArgs
    from xfuser.core.distributed import init_distributed_environment, initialize_runtime_state

    init_distributed_environment(rank=dist.get_rank(), world_size=dist.get_world_size())
    args = xFuserArgs(
        model="",
        ulysses_degree=ulysses,
        ring_degree=ring,
        attention_backend="SDPA_FLASH" if ring > 1 else None,
    )
    engine_config, _ = args.create_config()
    engine_config.runtime_config.dtype = torch.float32
    cfg = SimpleNamespace(**dict(model.config))
    initialize_runtime_state(SimpleNamespace(transformer=SimpleNamespace(config=cfg)), engine_config)


def _bare(family: str, which: str) -> dict[str, Any]:
    """One X-Slim run of the bare wrapped transformer under the current layout, and a plain one."""
    from xfuser.core.distributed import get_ring_parallel_world_size, get_ulysses_parallel_world_size

    from xslim_xdit.integrations.xfuser import enable_xslim_xdit

    xmodel = _wrap(family, _model(family))
    plain = sample(xmodel, family, steps=STEPS)
    eng = enable_xslim_xdit(xmodel, config(family, which, 1))  # each rank selects within its shard
    eng.default_steps = STEPS
    x = sample(xmodel, family, steps=STEPS)
    res = {
        "log": eng.statistics.decision_log(),
        "x": x,
        "plain": plain,
        "collectives": eng.sync.collectives,
        # the layout xfuser really ran (a Ring case must not silently run as Ulysses)
        "degrees": (get_ulysses_parallel_world_size(), get_ring_parallel_world_size()),
    }
    disable_xslim(xmodel)
    return res


def _z_image() -> dict[str, Any]:
    """Z-Image under Ulysses 2: xfuser's own output, and X-Slim's refusal of the wrapper."""
    from xslim_xdit.integrations.xfuser import enable_xslim_xdit

    xmodel = _wrap("z_image", _model("z_image"))
    res: dict[str, Any] = {"plain": sample(xmodel, "z_image", steps=2), "refusal": None}
    try:
        enable_xslim_xdit(xmodel, XSlimConfig(polish="block"))
    except NotImplementedError as e:
        res["refusal"] = str(e)
    return res


def more_cases(rank: int, world: int) -> dict[str, Any]:
    """Every case of one 2-rank launch, keyed ``"<family>/<layout>/<which>"``; a case that raises
    is recorded as ``{"error": traceback}`` (the others still run)."""
    from xslim_xdit.integrations.xfuser_runtime import reset_xfuser_parallel_state

    dist.init_process_group("gloo")
    out: dict[str, Any] = {}

    def case(key: str, fn: Any, *args: Any) -> None:
        try:
            out[key] = fn(*args)
        except Exception:  # recorded: the test shows it; the collectives of later cases still pair up
            out[key] = {"error": traceback.format_exc()}

    try:
        for layout, (ulysses, ring) in LAYOUTS.items():
            _init_runtime(_model("hunyuan_video15"), ulysses, ring)
            for which in ("schedule", "online"):
                case(f"hunyuan_video15/{layout}/{which}", _bare, "hunyuan_video15", which)
            if layout == "ulysses2":
                case("ltx2/ulysses2/online", _bare, "ltx2", "online")
                case("z_image/ulysses2/plain", _z_image)
            reset_xfuser_parallel_state()
        return out
    finally:
        dist.destroy_process_group()
