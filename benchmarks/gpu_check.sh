#!/usr/bin/env bash
# The full-size GPU check of issue #13: benchmarks.scale at the real shapes on one GPU, in under
# 8 minutes on one H200 (time limits 160 + 160 + 120 s). FLUX.1-dev (the real 1024x1024 shape, and
# its two presets run end to end against 50 plain steps) first, then HunyuanVideo and Wan 2.1
# 14B at the real width and depth but a shorter 720p clip (25 and 21 frames) so that the whole
# check fits; each model has its own time limit, and its results are copied to OUT as soon as it
# ends, so a model cut short never loses the ones before it.
#
#   bash benchmarks/gpu_check.sh [OUT]            # default OUT: gpu_check_out
#   FULL_CLIPS=1 bash benchmarks/gpu_check.sh     # the real 129/81-frame clips (about 30+ minutes)
#
# OUT receives at most 7 plain files, no folder (what the device tool brings back: at most 8 files):
# env.txt, summary.md (every model's scale.md), {flux,hunyuan_video,wan}.json (scale.json) and
# log.txt (the three runs' output, and pip's).
#
# The GPU machine of this workplace has torch but not diffusers (python3 is 3.12 there). Carry the
# diffusers wheel in .whl/ (pure Python; its other requirements are installed there), from the
# repository root here:
#   echo /.whl/ >> "$(git rev-parse --git-path info/exclude)"
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 -d .whl diffusers==0.42.1
# and run, through the device tool: command 'bash benchmarks/gpu_check.sh "$OUT"', carry ['.whl'],
# timeout_s 560. The script installs whatever .whl/ holds into /tmp/site (no network, no
# dependency resolution) when diffusers is missing; xslim_xdit and benchmarks come from this
# checkout through PYTHONPATH (the scale benchmark does not import xfuser).
set -u -o pipefail
OUT=${1:-gpu_check_out}
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}
mkdir -p "$OUT"
WORK=$(mktemp -d)
LOG="$OUT/log.txt"
: >"$LOG"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"   # this checkout's xslim_xdit and benchmarks win
export PYTHONUNBUFFERED=1
if ! "$PY" -c "import diffusers" 2>/dev/null && compgen -G "$WHEELS/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "$WHEELS"/*.whl >>"$LOG" 2>&1 || echo "pip install of $WHEELS failed" | tee -a "$LOG"
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
"$PY" - <<'PY' 2>&1 | tee "$OUT/env.txt"
import torch, diffusers
print("torch", torch.__version__, "cuda", torch.version.cuda, "diffusers", diffusers.__version__)
print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NO CUDA DEVICE")
PY
FRAMES_HY=25; FRAMES_WAN=21; LIMIT_HY=160; LIMIT_WAN=120
if [ "${FULL_CLIPS:-0}" = 1 ]; then FRAMES_HY=129; FRAMES_WAN=81; LIMIT_HY=1500; LIMIT_WAN=900; fi
# SCALE_EXTRA: flags appended to every run (a CPU smoke test of this script, as the test does:
#   SCALE_EXTRA="--device cpu --width 128 --blocks 2 --tokens 16 --repeats 1" bash benchmarks/gpu_check.sh /tmp/gc)
COMMON="--dtype bf16 --warmup 1 --repeats 2 --no-progress ${SCALE_EXTRA:-}"
status=0
: >"$OUT/summary.md"
run_model() {  # MODEL LIMIT FLAGS...: one model, its results copied to OUT whatever happened
    local model=$1 limit=$2
    shift 2
    echo "== $model (limit ${limit} s)" | tee -a "$LOG"
    # shellcheck disable=SC2086  # COMMON is a list of flags
    timeout "$limit" "$PY" -m benchmarks.scale --models "$model" "$@" $COMMON --out "$WORK/$model" 2>&1 \
        | tee -a "$LOG" || { rc=${PIPESTATUS[0]}; status=1; echo "== $model: exit status $rc" | tee -a "$LOG"; }
    [ -f "$WORK/$model/scale.json" ] && cp "$WORK/$model/scale.json" "$OUT/$model.json"
    [ -f "$WORK/$model/scale.md" ] && cat "$WORK/$model/scale.md" >>"$OUT/summary.md"
}
for model in ${GPU_CHECK_MODELS:-flux hunyuan_video wan}; do  # GPU_CHECK_MODELS: a subset, in order
    case $model in
        flux) run_model flux 160 --preset-runs ;;
        hunyuan_video) run_model hunyuan_video "$LIMIT_HY" --frames "$FRAMES_HY" ;;
        wan) run_model wan "$LIMIT_WAN" --frames "$FRAMES_WAN" ;;
        *) echo "GPU_CHECK_MODELS: unknown model $model (flux, hunyuan_video, wan)" | tee -a "$LOG"; status=2 ;;
    esac
done
rm -rf "$WORK"
ls -la "$OUT"
exit $status
