"""The emoji FLUX testbed (issue 13): committed data, checkpoint and classifier load; sampling is fast,
deterministic, batched CFG in one transformer call per step."""

from __future__ import annotations

import torch

from benchmarks.suites import TESTBEDS
from benchmarks.testbeds.emoji import CLASS_NAMES, DEFAULT_CACHE, load_emoji_images
from benchmarks.testbeds.emoji_flux import DEFAULT_CHECKPOINT, TOKENS, EmojiFluxPipeline, pack, unpack


def _size(path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def test_committed_files_are_small() -> None:
    assert DEFAULT_CACHE.stat().st_size < 5e6
    assert _size(DEFAULT_CHECKPOINT) < 16 * 2**20


def test_dataset_splits_and_classes() -> None:
    x, y = load_emoji_images("train")
    xt, yt = load_emoji_images("test")
    assert x.shape[1:] == (3, 32, 32) and xt.shape[1:] == (3, 32, 32)
    assert len(x) > 1800 and len(xt) > 200
    assert x.min() >= -1 and x.max() <= 1
    assert set(y.tolist()) == set(range(len(CLASS_NAMES)))
    assert torch.equal(unpack(pack(x[:3]), 32, 32), x[:3])
    assert pack(x[:1]).shape == (1, TOKENS, 12)


def test_checkpoint_samples_fast_and_deterministic() -> None:
    pipe = EmojiFluxPipeline.from_checkpoint()
    calls = []
    hook = pipe.transformer.register_forward_hook(
        lambda m, a, k, o: calls.append(k["hidden_states"].shape[0]), with_kwargs=True
    )
    try:
        a = pipe([0, 7], num_inference_steps=3, generator=torch.Generator().manual_seed(0), progress=False)
    finally:
        hook.remove()
    b = pipe([0, 7], num_inference_steps=3, generator=torch.Generator().manual_seed(0), progress=False)
    assert a.shape == (2, 3, 32, 32)
    assert 0 <= a.min() and a.max() <= 1
    assert torch.equal(a, b)
    assert calls == [4, 4, 4]  # one call per step on [cond; uncond]


def test_registered_testbed_and_classifier() -> None:
    tb = TESTBEDS["emoji_flux"]()
    pipe = tb.load(None)
    conds = tb.conditions(8)
    assert conds == list(range(8))
    x, y = load_emoji_images("test")
    q = tb.sample_quality((x + 1) / 2, y.tolist())
    assert q["accuracy"] > 0.45  # the classifier reads real emoji: 0.52 on the test split (docs/testbeds.md)
    img = tb.generate(pipe, conds[:1], 2, seed=0)
    assert img.shape == (1, 3, 32, 32)
