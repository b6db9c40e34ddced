"""X-Slim composes with the hooks already on a model (issue 9, item 5).

Enabling and then disabling X-Slim must leave every hook and attribute that was there before
exactly as it was: diffusers ``ModelHook`` s registered on blocks, group offloading and layerwise
casting (diffusers' ``HookRegistry``), accelerate's hooks (``add_hook_to_module``,
``cpu_offload``), a block ``forward`` that was already an instance attribute, and the
scheduler's ``set_timesteps`` (also when the user had replaced it on the instance). Each check
runs the same sampling loop three times (before enabling, enabled with every step forced full,
after disabling): the hooks fire exactly as often each time, and the three outputs are
bit-identical.
"""

from __future__ import annotations

import functools
from collections import Counter

import pytest
import torch

from xslim_xdit import Schedule, XSlimConfig, disable_xslim, enable_xslim, get_engine
from xslim_xdit import testing as tiny_models  # tiny random transformers and a sampling loop
from xslim_xdit.testing import pipelines as tiny_pipelines  # tiny complete diffusers pipelines

STEPS = 4
#: every step computed in full, so the output while enabled must equal the plain one bit for bit
ALL_FULL = XSlimConfig(warmup_steps=STEPS)


def transformer_blocks(model):
    """The transformer blocks of a tiny model, in call order (double then single stream)."""
    blocks = []
    for name in ("transformer_blocks", "single_transformer_blocks"):
        blocks.extend(getattr(model, name, None) or ())
    return blocks


def three_phases(model, family, on_phase=None):
    """Sample before enabling, while enabled (all steps full) and after disabling X-Slim.

    ``on_phase(name)`` is called before each phase (to reset counters) and its return value
    collected after it; returns ``(outputs, collected)``, each a dict by phase name.
    """
    outputs, collected = {}, {}
    for phase in ("before", "while", "after"):
        reset = on_phase(phase) if on_phase is not None else None
        if phase == "while":
            engine = enable_xslim(model, ALL_FULL, num_inference_steps=STEPS)
        outputs[phase] = tiny_models.sample(model, family, steps=STEPS, batch=1)
        if phase == "while":
            assert engine.statistics.summary()["kinds"] == ["full"] * STEPS
            disable_xslim(model)
            assert get_engine(model) is None
        collected[phase] = reset() if reset is not None else None
    return outputs, collected


def assert_bit_identical(outputs):
    assert torch.equal(outputs["while"], outputs["before"]), "all-full run differs from the plain one"
    assert torch.equal(outputs["after"], outputs["before"]), "output after disable_xslim differs"


def assert_fired_as_before(fired, exact_while, probe_block=None):
    """Hooks fire after disabling exactly as before enabling; while enabled on the same modules,
    exactly as often (``exact_while``: hooks on blocks, one call per block and step) or at least
    as often (hooks on leaf layers: X-Slim's step indicator may run block 0's modulation again).

    ``probe_block``: a block whose weight-placement hooks (offloading, casting) also wrap X-Slim's
    step probe, so they fire once more per step while enabled, and no more."""
    assert fired["after"] == fired["before"], "hooks after disable_xslim differ from before"
    if exact_while:
        expected = dict(fired["before"])
        if probe_block is not None:
            expected[probe_block] = 2 * expected[probe_block]
        assert fired["while"] == expected, "hooks while enabled differ from before"
    else:
        assert set(fired["while"]) == set(fired["before"]), "hooks while enabled differ from before"
        assert all(fired["while"][name] >= n for name, n in fired["before"].items())


def forward_attributes(model):
    """Each module's instance-level ``forward`` (None where the class method is used)."""
    return {name: mod.__dict__.get("forward") for name, mod in model.named_modules()}


# ---------------------------------------------------------------------- diffusers ModelHook


def _diffusers_counting_hook():
    from diffusers.hooks import ModelHook

    class CountingHook(ModelHook):
        def __init__(self):
            super().__init__()
            self.calls = 0

        def pre_forward(self, module, *args, **kwargs):
            self.calls += 1
            return args, kwargs

    return CountingHook()


@pytest.mark.parametrize("family", ["dit", "flux"])
def test_diffusers_model_hook_on_blocks_fires_once_per_block_call(family):
    from diffusers.hooks import HookRegistry

    model = tiny_models.tiny_model(family)
    blocks = transformer_blocks(model)
    hooks = []
    for block in blocks:
        hook = _diffusers_counting_hook()
        HookRegistry.check_if_exists_or_initialize(block).register_hook(hook, "count_calls")
        hooks.append(hook)
    attrs = forward_attributes(model)

    def on_phase(_phase):
        for h in hooks:
            h.calls = 0
        return lambda: [h.calls for h in hooks]

    outputs, calls = three_phases(model, family, on_phase)
    one_per_step = [STEPS] * len(blocks)
    assert calls == {"before": one_per_step, "while": one_per_step, "after": one_per_step}
    assert_bit_identical(outputs)
    assert forward_attributes(model) == attrs


def test_diffusers_model_hook_survives_enable_disable_twice():
    from diffusers.hooks import HookRegistry

    model = tiny_models.tiny_model("dit")
    block = transformer_blocks(model)[1]
    hook = _diffusers_counting_hook()
    HookRegistry.check_if_exists_or_initialize(block).register_hook(hook, "count_calls")
    for _ in range(2):
        enable_xslim(model, ALL_FULL, num_inference_steps=STEPS)
        disable_xslim(model)
    hook.calls = 0
    tiny_models.sample(model, "dit", steps=STEPS)
    assert hook.calls == STEPS
    # and the registry can still remove its own hook, leaving the class forward (diffusers itself
    # leaves it bound in the instance's __dict__, with or without X-Slim)
    HookRegistry.check_if_exists_or_initialize(block).remove_hook("count_calls")
    assert block.forward.__func__ is type(block).forward


# ---------------------------------------------------------------------- HookRegistry users


def count_hook_class(monkeypatch, hook_class, model):
    """Count ``hook_class.pre_forward`` calls per module name (patched on the class before the
    hooks are registered: the registry binds ``pre_forward`` when a hook is registered)."""
    fired = Counter()
    original = hook_class.pre_forward

    def pre_forward(self, module, *args, **kwargs):
        fired[names.get(id(module), "?")] += 1
        return original(self, module, *args, **kwargs)

    names = {id(mod): name for name, mod in model.named_modules()}
    monkeypatch.setattr(hook_class, "pre_forward", pre_forward)

    def on_phase(_phase):
        fired.clear()
        return lambda: dict(fired)

    return on_phase


@pytest.mark.parametrize("family", ["dit", "flux"])
@pytest.mark.parametrize("offload_type", ["block_level", "leaf_level"])
def test_group_offloading_keeps_firing(monkeypatch, family, offload_type):
    from diffusers.hooks import apply_group_offloading
    from diffusers.hooks.group_offloading import GroupOffloadingHook

    model = tiny_models.tiny_model(family)
    on_phase = count_hook_class(monkeypatch, GroupOffloadingHook, model)
    cpu = torch.device("cpu")
    extra = {"num_blocks_per_group": 1} if offload_type == "block_level" else {}
    apply_group_offloading(model, onload_device=cpu, offload_device=cpu, offload_type=offload_type, **extra)
    attrs = forward_attributes(model)
    outputs, fired = three_phases(model, family, on_phase)
    if offload_type == "block_level":
        assert any(name.startswith("transformer_blocks.") for name in fired["before"]), fired["before"]
        assert_fired_as_before(fired, exact_while=True, probe_block="transformer_blocks.0")
    else:  # hooks on the leaf layers: the probe runs block 0's norm layers once more per step
        assert_fired_as_before(fired, exact_while=False)
    assert_bit_identical(outputs)
    assert forward_attributes(model) == attrs


@pytest.mark.parametrize(
    "family, where",
    # DiT's forward calls block 0's embedder outside the block, so whole-block casting is FLUX only
    [("dit", "model"), ("flux", "model"), ("flux", "blocks")],
)
def test_layerwise_casting_keeps_firing(monkeypatch, family, where):
    from diffusers.hooks.layerwise_casting import LayerwiseCastingHook, apply_layerwise_casting_hook

    model = tiny_models.tiny_model(family)
    on_phase = count_hook_class(monkeypatch, LayerwiseCastingHook, model)
    if where == "model":  # diffusers' own entry point: hooks on the leaf layers
        model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    else:  # the same hook on each whole block
        for block in transformer_blocks(model):
            apply_layerwise_casting_hook(block, torch.float8_e4m3fn, torch.float32, False)
    attrs = forward_attributes(model)
    outputs, fired = three_phases(model, family, on_phase)
    assert fired["before"], "layerwise casting never ran"
    probe_block = "transformer_blocks.0" if where == "blocks" else None
    assert_fired_as_before(fired, exact_while=where == "blocks", probe_block=probe_block)
    assert_bit_identical(outputs)
    assert forward_attributes(model) == attrs


# ---------------------------------------------------------------------- accelerate


def _accelerate_counting_hook():
    from accelerate.hooks import ModelHook

    class CountingAccelerateHook(ModelHook):
        def __init__(self):
            self.calls = 0

        def pre_forward(self, module, *args, **kwargs):
            self.calls += 1
            return args, kwargs

    return CountingAccelerateHook()


def test_accelerate_hooks_on_transformer_and_blocks_keep_firing():
    from accelerate.hooks import add_hook_to_module

    model = tiny_models.tiny_model("dit")
    hooks = {"": _accelerate_counting_hook()}
    add_hook_to_module(model, hooks[""])
    for i, block in enumerate(transformer_blocks(model)):
        hooks[f"transformer_blocks.{i}"] = _accelerate_counting_hook()
        add_hook_to_module(block, hooks[f"transformer_blocks.{i}"])
    attrs = forward_attributes(model)

    def on_phase(_phase):
        for h in hooks.values():
            h.calls = 0
        return lambda: {name: h.calls for name, h in hooks.items()}

    outputs, calls = three_phases(model, "dit", on_phase)
    expected = dict.fromkeys(hooks, STEPS)
    assert calls == {"before": expected, "while": expected, "after": expected}
    assert_bit_identical(outputs)
    assert forward_attributes(model) == attrs


def test_accelerate_cpu_offload_keeps_firing(monkeypatch):
    import accelerate
    from accelerate.hooks import AlignDevicesHook

    model = tiny_models.tiny_model("dit")
    on_phase = count_hook_class(monkeypatch, AlignDevicesHook, model)
    accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
    attrs = forward_attributes(model)
    outputs, fired = three_phases(model, "dit", on_phase)
    assert fired["before"].get("", 0) == STEPS, fired["before"]
    assert_fired_as_before(fired, exact_while=False)
    assert_bit_identical(outputs)
    assert forward_attributes(model) == attrs


# ---------------------------------------------------------------------- attributes restored


def test_block_forward_instance_attribute_is_restored():
    model = tiny_models.tiny_model("dit")
    block = transformer_blocks(model)[2]
    calls = []
    class_forward = functools.partial(type(block).forward, block)

    def user_forward(*args, **kwargs):  # e.g. a user's own wrapper, set before X-Slim
        calls.append(1)
        return class_forward(*args, **kwargs)

    block.forward = user_forward
    attrs = forward_attributes(model)

    def on_phase(_phase):
        calls.clear()
        return lambda: len(calls)

    outputs, counted = three_phases(model, "dit", on_phase)
    assert block.__dict__.get("forward") is user_forward
    assert forward_attributes(model) == attrs
    assert counted == {"before": STEPS, "while": STEPS, "after": STEPS}
    assert_bit_identical(outputs)


def same_objects(now, before):
    """The same keys, each bound to the very same object."""
    return set(now) == set(before) and all(now[k] is before[k] for k in before)


def _pixart_pipeline():
    pipe = tiny_pipelines.tiny_pipeline("pixart")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run_pipeline(pipe, steps=2):
    with torch.no_grad():
        return pipe(
            "a cat",
            num_inference_steps=steps,
            output_type="latent",
            generator=torch.Generator().manual_seed(0),
            **tiny_pipelines.TINY_CALL_KWARGS["pixart"],
        ).images


def test_disable_restores_scheduler_set_timesteps():
    pipe = _pixart_pipeline()
    scheduler = pipe.scheduler
    before = dict(vars(scheduler))
    enable_xslim(pipe, ALL_FULL)
    disable_xslim(pipe)
    assert same_objects(vars(scheduler), before)
    assert "set_timesteps" not in vars(scheduler)
    assert scheduler.set_timesteps.__func__ is type(scheduler).set_timesteps


def test_disable_restores_a_user_set_timesteps_instance_attribute():
    pipe = _pixart_pipeline()
    scheduler = pipe.scheduler
    calls = []
    class_set_timesteps = scheduler.set_timesteps

    def user_set_timesteps(*args, **kwargs):  # a user's own instance-level override
        calls.append(1)
        return class_set_timesteps(*args, **kwargs)

    scheduler.set_timesteps = user_set_timesteps
    ref = _run_pipeline(pipe)
    before = dict(vars(scheduler))

    engine = enable_xslim(pipe, ALL_FULL)
    out = _run_pipeline(pipe)
    assert len(calls) == 2  # the user's override still ran while enabled
    assert engine.statistics.summary()["steps"] == 2  # and the engine saw the run's step count
    disable_xslim(pipe)

    assert vars(scheduler).get("set_timesteps") is user_set_timesteps
    assert set(vars(scheduler)) == set(before)
    after = _run_pipeline(pipe)
    assert len(calls) == 3
    assert torch.equal(out, ref) and torch.equal(after, ref)


def torch_hooks_and_processors(model):
    """Per module: its torch forward (pre-)hooks (by id, the very objects) and, for attention
    modules, the processor object."""
    state = {}
    for name, mod in model.named_modules():
        state[name] = (
            tuple(mod._forward_pre_hooks.items()),
            tuple(mod._forward_hooks.items()),
            getattr(mod, "processor", None),
        )
    return state


def test_token_level_leaves_processors_and_torch_hooks_as_they_were():
    from xslim_xdit import Schedule

    model = tiny_models.tiny_model("flux")
    attn = transformer_blocks(model)[0].attn
    seen = []
    attn.register_forward_pre_hook(lambda mod, args: seen.append("pre"))
    attn.register_forward_hook(lambda mod, args, out: seen.append("post"))
    before = torch_hooks_and_processors(model)
    ref = tiny_models.sample(model, "flux", steps=STEPS)
    seen.clear()
    config = XSlimConfig(
        mode="schedule", schedule=Schedule(STEPS, (0, 1, 3), token_steps=(2,)), token_ratio=0.5
    )
    engine = enable_xslim(model, config, num_inference_steps=STEPS)
    tiny_models.sample(model, "flux", steps=STEPS)
    disable_xslim(model)
    assert engine.statistics.summary()["kinds"] == ["full", "full", "token", "full"]
    assert seen.count("pre") == STEPS and seen.count("post") == STEPS
    after_state = torch_hooks_and_processors(model)
    assert after_state.keys() == before.keys()
    changed = [name for name in before if after_state[name] != before[name]]
    assert not changed, changed
    assert torch.equal(tiny_models.sample(model, "flux", steps=STEPS), ref)


def test_pipeline_model_cpu_offload_composes():
    """diffusers' ``enable_model_cpu_offload`` (accelerate hooks on each component): forced full
    equals the offloaded pipeline without X-Slim bit for bit, a cached run works, and after
    disabling, the offloaded pipeline computes exactly what it did before. (Sequential offload
    fails here without X-Slim: accelerate 1.15 cannot re-create the tiny T5's parameters on CPU.)"""
    pipe = _pixart_pipeline()
    pipe.enable_model_cpu_offload(device="cpu")
    plain = _run_pipeline(pipe, steps=4)
    engine = enable_xslim(pipe, ALL_FULL)
    forced = _run_pipeline(pipe, steps=4)
    disable_xslim(pipe)
    engine = enable_xslim(pipe, XSlimConfig(mode="schedule", schedule=Schedule(4, full_steps=(0, 3))))
    cached = _run_pipeline(pipe, steps=4)
    kinds = engine.statistics.summary()["kinds"]
    disable_xslim(pipe)
    assert torch.equal(forced, plain)
    assert kinds == ["full", "skip", "skip", "full"] and torch.isfinite(cached).all()
    assert torch.equal(_run_pipeline(pipe, steps=4), plain)
