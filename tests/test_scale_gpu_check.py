"""``benchmarks/gpu_check.sh`` on the CPU at a tiny shape, HunyuanVideo only (the scale
test runs FLUX and Wan): what it leaves in OUT is what the device tool brings back (at most 8 plain
files, no folder), and the model's kinds and composed presets are there."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_leaves_few_flat_files(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHON": sys.executable,
        "GPU_CHECK_MODELS": "hunyuan_video bogus",
        "SCALE_EXTRA": "--device cpu --width 128 --blocks 2 --tokens 16 --repeats 1",
    }
    proc = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]  # the unknown model
    files = sorted(p.name for p in out.iterdir())
    assert files == ["env.txt", "hunyuan_video.json", "log.txt", "summary.md"]  # flat, at most 8
    hy = json.loads((out / "hunyuan_video.json").read_text())["models"]["hunyuan_video"]
    # full, skip, block refresh at the presets' thresholds and at stack_mean 2, token refresh at
    # 0.5, 0.7 and the presets' own 0.8
    kinds = {"full", "skip", "block@12,25", "block@mean2", "token@0.5", "token@0.7", "token@0.8"}
    assert kinds <= set(hy["kinds"]), set(hy["kinds"])
    assert all(hy["kinds"][k]["output_finite"] for k in kinds)
    assert set(hy["presets"]) == {"hunyuan_video-fast", "hunyuan_video-slow"}
    for preset in hy["presets"].values():
        assert preset["flop_speedup"] > 1 and preset["wall_over_flop"] > 0
    assert hy["cache_memory_per_level"]["block"]["storage_bytes"] > 0
    assert (out / "summary.md").read_text().startswith("# X-Slim at scale")
    assert "GPU_CHECK_MODELS: unknown model bogus" in (out / "log.txt").read_text()
