"""The full-scale speed benchmark (``python -m benchmarks.scale``) at a tiny shape: structure and
sanity of what it writes. Wall-clock numbers are never asserted (a shared CPU makes them noise)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks import scale


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("scale")
    argv = ["--out", str(out), "--models", "flux,wan", "--device", "cpu", "--width", "128"]
    argv += [
        "--blocks",
        "4",
        "--tokens",
        "16",
        "--warmup",
        "1",
        "--repeats",
        "1",
        "--no-progress",
        "--preset-runs",
    ]
    assert scale.main(argv) == 0
    assert (out / "scale.md").read_text().startswith("# X-Slim at scale")
    return json.loads((out / "scale.json").read_text())


def test_every_kind_measured_through_the_engine(tiny_run: dict) -> None:
    assert set(tiny_run["models"]) == {"flux", "wan"}
    for name, m in tiny_run["models"].items():
        kinds = m["kinds"]
        assert {"plain", "full", "skip", "block@mean2", "token@0.5", "token@0.7"} <= set(kinds), name
        assert (
            m["shape"]["reduced"] and m["shape"]["width"] == 128 and sum(m["shape"]["blocks_per_stack"]) == 4
        )
        for label, k in kinds.items():
            assert k["output_finite"], (name, label)
            assert k["seconds_median"] > 0
        full, skip = kinds["full"]["flops"], kinds["skip"]["flops"]
        assert 0 < skip < full
        for r in ("0.5", "0.7"):
            assert skip < kinds[f"token@{r}"]["flops"] < full, (name, r)
        assert kinds["token@0.5"]["flops"] < kinds["token@0.7"]["flops"]
        # the engine ran the forced kind: the record says how much of the model it computed
        assert kinds["skip"]["blocks_computed"] == 0
        assert kinds["block@mean2"]["blocks_computed"] < kinds["block@mean2"]["blocks_total"]
        assert kinds["block@mean2"]["flops"] < full
        assert kinds["token@0.5"]["token_count"] == 8  # half of the 16 image tokens
    # block refresh at the FLUX presets' own block thresholds too
    assert tiny_run["models"]["flux"]["kinds"]["block@1.5,10"]["output_finite"]


def test_cache_memory_is_measured_per_level(tiny_run: dict) -> None:
    for m in tiny_run["models"].values():
        k = m["kinds"]
        assert "cache_storage_bytes" not in k["plain"]
        for label in ("skip", "block@mean2", "token@0.5"):
            assert k[label]["cache_storage_bytes"] > 0, label
        # block refresh keeps a residual per block, token refresh K/V per block: both above the
        # skip level's single stack residual
        assert k["block@mean2"]["cache_storage_bytes"] > k["skip"]["cache_storage_bytes"]
        assert k["token@0.5"]["cache_storage_bytes"] > k["skip"]["cache_storage_bytes"]
        levels = m["cache_memory_per_level"]
        assert levels["step"]["storage_bytes"] == k["skip"]["cache_storage_bytes"]
        assert levels["block"]["storage_bytes"] > levels["step"]["storage_bytes"] > 0
        assert levels["token"]["kind"] == "token@0.7"


def test_preset_ratios_and_fixed_cost(tiny_run: dict) -> None:
    flux = tiny_run["models"]["flux"]
    assert set(flux["presets"]) == {"flux-fast", "flux-slow"}
    for p in flux["presets"].values():
        assert sum(p["counts"].values()) == p["steps"] == 50
        assert p["flop_speedup"] > 1 and p["wall_speedup"] > 0
        assert p["wall_over_flop"] == pytest.approx(p["wall_speedup"] / p["flop_speedup"])
    # run end to end, each preset does what its schedule says, at the FLOPs the kinds add up to
    measured = flux["presets_measured"]
    assert set(measured) == {"flux-fast", "flux-slow"}
    for name, p in measured.items():
        assert p["counts"] == flux["presets"][name]["counts"]
        assert p["flop_speedup"] == pytest.approx(flux["presets"][name]["flop_speedup"], rel=0.1)
        assert p["seconds"] > 0 and p["plain_seconds"] > 0
    assert tiny_run["models"]["wan"]["presets"] == {}  # no published Wan preset
    assert tiny_run["models"]["wan"]["presets_measured"] == {}
    assert flux["fixed_cost"]["skip_step_seconds"] > 0
    assert tiny_run["meta"]["device"] == "cpu" and tiny_run["meta"]["dtype"] == "bf16"


def test_shapes_and_token_counts() -> None:
    flux = scale.SPECS["flux"]
    assert flux.grid(1).image_tokens == 4096 and flux.grid(1).text == 512
    assert scale.SPECS["hunyuan_video"].grid(129).image_tokens == 33 * 45 * 80
    assert scale.SPECS["wan"].grid(81).image_tokens == 21 * 45 * 80
    real = scale.resolve_shape(
        flux, scale=None, width=None, blocks=None, tokens=None, frames=None, on_gpu=True
    )
    assert not real.reduced and real.depths == (19, 38) and real.width == 3072
    cpu = scale.resolve_shape(
        flux, scale=None, width=None, blocks=None, tokens=None, frames=None, on_gpu=False
    )
    assert cpu.reduced and cpu.width == 256 and cpu.grid.image_tokens == 256
    hy = scale.SPECS["hunyuan_video"]
    clip = scale.resolve_shape(hy, scale=None, width=None, blocks=None, tokens=None, frames=25, on_gpu=True)
    assert (
        clip.reduced and clip.width == 3072 and clip.grid.image_tokens == 7 * 45 * 80
    )  # the GPU check's clip


def test_wan_rope_buffers_rebuilt_after_meta_init() -> None:
    spec = scale.SPECS["wan"]
    shape = scale.resolve_shape(spec, scale=None, width=128, blocks=1, tokens=16, frames=None, on_gpu=False)
    model = scale.build_model(spec, shape, torch.device("cpu"), torch.float32, seed=0)
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    ref = WanRotaryPosEmbed(128, (1, 2, 2), 1024)
    assert torch.equal(model.rope.freqs_cos, ref.freqs_cos)
    assert model.blocks[0].attn1.to_q.weight.std().item() == pytest.approx(128**-0.5, rel=0.1)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--width", "100"], "--width must be a positive multiple of 128"),
        (["--scale", "2"], "--scale must be in (0, 1]"),
        (["--blocks", "0"], "--blocks must be an integer >= 1"),
    ],
)
def test_bad_flags_name_the_flag(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        scale.main(argv)
    assert message in capsys.readouterr().err


def test_bad_model_list_names_the_flag(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="--models must be"):
        scale.main(["--models", "sdxl", "--out", str(tmp_path)])


def test_help_lists_the_shape_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        scale.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--width", "--blocks", "--tokens", "--scale", "--frames", "--dtype", "--preset-runs"):
        assert flag in out


def test_a_failing_kind_is_recorded_and_the_rest_measured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_measure = scale.measure_kind

    def measure(model, spec, kind, *args, **kwargs):  # noqa: ANN001, ANN202 - the wrapped signature
        if kind.label == "token@0.7":
            raise RuntimeError("simulated kernel failure")
        return real_measure(model, spec, kind, *args, **kwargs)

    monkeypatch.setattr(scale, "measure_kind", measure)
    argv = ["--out", str(tmp_path), "--models", "flux", "--device", "cpu", "--width", "128", "--blocks", "2"]
    assert scale.main([*argv, "--tokens", "16", "--repeats", "1", "--no-progress"]) == 0
    flux = json.loads((tmp_path / "scale.json").read_text())["models"]["flux"]
    assert flux["kinds"]["token@0.7"]["error"] == "RuntimeError: simulated kernel failure"
    assert "seconds_median" in flux["kinds"]["token@0.5"]  # measured after the failure
    assert "token@0.7" in flux["presets"]["flux-fast"]["error"]  # flux-fast refreshes tokens at 0.7
    assert flux["presets"]["flux-slow"]["flop_speedup"] > 1  # flux-slow (ratio 0.5) unaffected
    assert flux["cache_memory_per_level"]["token"]["kind"] == "token@0.5"
    assert "failed: RuntimeError: simulated kernel failure" in (tmp_path / "scale.md").read_text()
