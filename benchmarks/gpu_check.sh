#!/usr/bin/env bash
# The full-size GPU check of issue #13: benchmarks.scale at the real shapes on one GPU, in under
# 8 minutes on one H200 (time limits 160 + 160 + 120 s). FLUX.1-dev (the real 1024x1024 shape, and
# its two presets run end to end against 50 plain steps) first, then HunyuanVideo and Wan 2.1
# 14B at the real width and depth but a shorter 720p clip (25 and 21 frames) so that the whole
# check fits; each model has its own time limit and writes its own folder, so a model cut short
# never loses the ones before it.
#
#   bash benchmarks/gpu_check.sh [OUT]            # default OUT: gpu_check_out
#   FULL_CLIPS=1 bash benchmarks/gpu_check.sh     # the real 129/81-frame clips (about 30+ minutes)
#
# If the GPU machine lacks diffusers (or xfuser), build wheels here and carry them along:
#   pip wheel --no-deps -w wheels/ diffusers==0.42.1 .       # diffusers and this package
#   pip wheel -w wheels/ diffusers==0.42.1 tqdm              # ... with their own dependencies
# the script installs whatever wheels/ holds before it starts (no network needed).
set -u -o pipefail
OUT=${1:-gpu_check_out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"   # this checkout's xslim_xdit and benchmarks win
if ! python -c "import diffusers" 2>/dev/null && compgen -G "wheels/*.whl" >/dev/null; then
    pip install --no-index --find-links wheels/ wheels/*.whl >"$OUT/pip.log" 2>&1 || cat "$OUT/pip.log"
fi
python - <<'PY' | tee "$OUT/env.txt"
import torch, diffusers
print("torch", torch.__version__, "cuda", torch.version.cuda, "diffusers", diffusers.__version__)
print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NO CUDA DEVICE")
PY
FRAMES_HY=25; FRAMES_WAN=21; LIMIT_HY=160; LIMIT_WAN=120
if [ "${FULL_CLIPS:-0}" = 1 ]; then FRAMES_HY=129; FRAMES_WAN=81; LIMIT_HY=1500; LIMIT_WAN=900; fi
# SCALE_EXTRA: flags appended to every run (a CPU smoke test of this script:
#   SCALE_EXTRA="--device cpu --width 128 --blocks 2 --tokens 16 --repeats 1" bash benchmarks/gpu_check.sh /tmp/gc)
COMMON="--dtype bf16 --warmup 1 --repeats 2 --no-progress ${SCALE_EXTRA:-}"
status=0
timeout 160 python -m benchmarks.scale --models flux --preset-runs $COMMON --out "$OUT/flux" 2>&1 | tee "$OUT/flux.log" || status=1
timeout $LIMIT_HY python -m benchmarks.scale --models hunyuan_video --frames $FRAMES_HY $COMMON \
    --out "$OUT/hunyuan_video" 2>&1 | tee "$OUT/hunyuan_video.log" || status=1
timeout $LIMIT_WAN python -m benchmarks.scale --models wan --frames $FRAMES_WAN $COMMON \
    --out "$OUT/wan" 2>&1 | tee "$OUT/wan.log" || status=1
ls -R "$OUT" | head -40
exit $status
