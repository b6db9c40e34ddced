"""LoRA through diffusers/peft with every reuse level (issue 10, point 2).

Token refresh records each attention's K/V with hooks on ``to_k``/``to_v``. Loading a LoRA with
peft wraps those layers in new modules; a recorder left on the old module records the base
layer's K/V, without the adapter's update, and token steps then attend to wrong keys. The engine
re-installs its recorders (and its token processor, if ``set_attn_processor`` replaced it) at
the next call, so the order of ``enable_xslim`` and ``load_lora_weights`` does not matter.
"""

from __future__ import annotations

import pytest
import torch

from xslim_xdit import Schedule, XSlimConfig, disable_xslim, enable_xslim
from xslim_xdit.testing import pipelines as tiny_pipelines

STEPS = 6
LEVELS = {
    "skip": XSlimConfig(mode="schedule", schedule=Schedule(STEPS, full_steps=(0, 1, 3, 5))),
    "block": XSlimConfig(
        mode="schedule", schedule=Schedule(STEPS, full_steps=(0, 1, 3, 5), block_steps=(2, 4))
    ),
    "token": XSlimConfig(
        mode="schedule",
        schedule=Schedule(STEPS, full_steps=(0, 1, 3, 5), token_steps=(2, 4)),
        token_ratio=0.5,
    ),
}


def _pipeline():
    pipe = tiny_pipelines.tiny_pipeline("flux")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _lora_file(tmp_path):
    """A LoRA on the tiny FLUX transformer's attention projections, saved as diffusers does."""
    from diffusers import FluxPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = _pipeline()
    torch.manual_seed(7)
    config = LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False)
    pipe.transformer.add_adapter(config, adapter_name="style")
    layers = get_peft_model_state_dict(pipe.transformer, adapter_name="style")
    FluxPipeline.save_lora_weights(tmp_path, transformer_lora_layers=layers, safe_serialization=True)
    return tmp_path


def _run(pipe):
    with torch.no_grad():
        return pipe(
            "a cat",
            num_inference_steps=STEPS,
            output_type="latent",
            generator=torch.Generator().manual_seed(0),
            **tiny_pipelines.TINY_CALL_KWARGS["flux"],
        ).images


@pytest.mark.parametrize("level", sorted(LEVELS))
def test_lora_loaded_after_enabling_equals_loaded_before(tmp_path, level):
    path = _lora_file(tmp_path)
    before = _pipeline()
    before.load_lora_weights(path, adapter_name="style")
    enable_xslim(before, LEVELS[level])
    want = _run(before)
    after = _pipeline()
    enable_xslim(after, LEVELS[level])
    _run(after)  # a run before the LoRA exists
    after.load_lora_weights(path, adapter_name="style")
    got = _run(after)
    assert torch.equal(got, want)
    disable_xslim(after)
    disable_xslim(before)


def test_adapter_weights_fuse_and_unload(tmp_path):
    """``set_adapters`` with new weights between calls, ``fuse_lora`` and ``unload_lora_weights``:
    forced-full X-Slim equals the plain pipeline at each stage, token steps keep running, and
    after disabling the pipeline computes what it computes without X-Slim."""
    path = _lora_file(tmp_path)
    pipe = _pipeline()
    pipe.load_lora_weights(path, adapter_name="style")
    reference = {}
    for weight in (1.0, 0.3):
        pipe.set_adapters(["style"], adapter_weights=[weight])
        reference[weight] = _run(pipe)
    assert not torch.equal(reference[1.0], reference[0.3])  # the weight matters
    engine = enable_xslim(pipe, XSlimConfig(warmup_steps=STEPS))
    for weight in (1.0, 0.3):
        pipe.set_adapters(["style"], adapter_weights=[weight])
        assert torch.equal(_run(pipe), reference[weight])
    disable_xslim(pipe)
    engine = enable_xslim(pipe, LEVELS["token"])
    pipe.set_adapters(["style"], adapter_weights=[1.0])
    pipe.fuse_lora()
    fused_cached = _run(pipe)
    pipe.unfuse_lora()
    pipe.unload_lora_weights()
    unloaded_cached = _run(pipe)
    kinds = engine.statistics.summary()["kinds"]
    disable_xslim(pipe)
    assert kinds.count("token") == 2 and torch.isfinite(fused_cached).all()
    assert not torch.equal(fused_cached, unloaded_cached)

    # unloaded while X-Slim is on, then disabled: exactly the base pipeline (no fuse here: fusing
    # and unfusing leaves the base weights rounded)
    pipe = _pipeline()
    pipe.load_lora_weights(path, adapter_name="style")
    engine = enable_xslim(pipe, LEVELS["token"])
    _run(pipe)
    pipe.unload_lora_weights()
    assert torch.equal(_run(pipe), _run_with(_pipeline(), LEVELS["token"]))
    disable_xslim(pipe)
    assert torch.equal(_run(pipe), _run(_pipeline()))


def _run_with(pipe, config):
    enable_xslim(pipe, config)
    try:
        return _run(pipe)
    finally:
        disable_xslim(pipe)


def test_processor_set_after_enabling_is_wrapped_again():
    """``set_attn_processor`` after ``enable_xslim`` displaces the token processor; the next call
    wraps the new processor, so token steps still attend to the whole K/V, and disabling leaves
    the user's processor in place."""
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    want = _run_with(_pipeline(), LEVELS["token"])
    pipe = _pipeline()
    enable_xslim(pipe, LEVELS["token"])
    chosen = FluxAttnProcessor()
    pipe.transformer.set_attn_processor(chosen)
    assert torch.equal(_run(pipe), want)
    disable_xslim(pipe)
    assert all(p is chosen for p in pipe.transformer.attn_processors.values())
