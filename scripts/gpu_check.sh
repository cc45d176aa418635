#!/usr/bin/env bash
# scripts/gpu_check.sh [PHASE ...]: every GPU figure of phi3v-recipes, on a CUDA machine that reaches no network
# (the lent H200: docs/performance.md, "On a lent GPU machine"). PHASE: tests | bench-full | bench-lora |
# bench-qlora | all (default: all, in that order). One phase per call fits a 10-minute device call.
#
#   0. no CUDA GPU: stops at once with one sentence (exit 2), before installing anything;
#   1. installs .whl/ (made by scripts/gpu_prepare.sh on a machine with the package index) with
#      `pip install --no-index --no-deps --target $GPU_SITE` and puts that folder on PYTHONPATH: never a network;
#   2. `tests`: the GPU tests (tests/test_gpu.py, marker gpu): packed rows against unpacked samples through
#      flash-attention's varlen path and through FlexAttention (loss and gradients), flash-attention against sdpa,
#      one short bf16 training run per strategy through `python -m phi3v_recipes`;
#   3. `bench-<strategy>`: the real-size benchmark (Phi-3.5-vision geometry, random weights) on the DocVQA
#      workload, ours against the cookbook loop, packed rows of up to $ROW_TOKENS tokens.
#
# Every figure is appended to the JSON-lines file $RESULTS as soon as it is measured (the environment, each
# test's outcome, each bench step, each bench's results), so a phase stopped at its limit keeps what it measured.
# What cannot run is recorded with its reason ({"kind": "skipped"}), not failed: without flash-attn, its tests
# skip and packed rows go through FlexAttention. Each phase prints its expected device time first and is stopped
# after $PHASE_LIMIT_S seconds.
#
# Environment knobs: PYTHON (default python3, the image's), RESULTS (default gpu_results/results.jsonl, logs
# beside it), GPU_SITE (default /tmp/phi3v-gpu-site), SKIP_INSTALL=1 (packages already importable),
# PHASE_LIMIT_S (510), ROW_TOKENS (16384), SAMPLES_PER_STEP (16), STEPS (4), HARDWARE (h100; for the H200 too).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
RESULTS=${RESULTS:-gpu_results/results.jsonl}
DIR=$(dirname "$RESULTS")
SITE=${GPU_SITE:-/tmp/phi3v-gpu-site}
LIMIT=${PHASE_LIMIT_S:-510}
ROW_TOKENS=${ROW_TOKENS:-16384}
SAMPLES_PER_STEP=${SAMPLES_PER_STEP:-16}
STEPS=${STEPS:-4}
HARDWARE=${HARDWARE:-h100}
# Expected device time of each phase on one H200 (seconds), wheels installed: `tests` as measured on the lent H200
# (116-119 s, 2026-11-30); the benches are still estimates (none has reached its first loss in the 255 s it was
# given: docs/performance.md). Each phase's figures carry their own seconds; every one is stopped at $PHASE_LIMIT_S.
declare -A EXPECTED=([tests]=120 [bench-full]=360 [bench-lora]=300 [bench-qlora]=390)
ALL=(tests bench-full bench-lora bench-qlora)

PHASES=("$@")
[ ${#PHASES[@]} -eq 0 ] && PHASES=(all)
[ "${PHASES[*]}" = all ] && PHASES=("${ALL[@]}")
for phase in "${PHASES[@]}"; do
  if [ -z "${EXPECTED[$phase]:-}" ]; then
    echo "error: unknown phase '$phase'; choose from: ${ALL[*]} all." >&2
    exit 2
  fi
done

# 0. a CUDA GPU, before anything else
"$PY" - <<'PYEOF' || exit 2
import sys
try:
    import torch
except Exception as err:  # noqa: BLE001
    sys.exit(f"error: {sys.executable} cannot import torch ({type(err).__name__}); run this with the GPU machine's "
             "python3 (or set PYTHON=).")
if not torch.cuda.is_available():
    sys.exit(f"error: no CUDA GPU is visible to {sys.executable} (torch {torch.__version__}); run "
             "scripts/gpu_check.sh on a CUDA machine, e.g. the lent H200.")
PYEOF

export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
  PYTHONUNBUFFERED=1 PIP_NO_INDEX=1
mkdir -p "$DIR"

# 1. the wheels of .whl/, from nothing but that folder
if [ "${SKIP_INSTALL:-0}" != 1 ]; then
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "error: .whl/ holds no wheels; run scripts/gpu_prepare.sh on a machine with the package index and carry .whl here." >&2
    exit 2
  fi
  if [ -f .whl/SOURCES.sha256 ] && [ "$(cat .whl/SOURCES.sha256)" != "$(scripts/gpu_prepare.sh --sources-hash)" ]; then
    echo "error: .whl/'s phi3v_recipes wheel was built from other sources than this working tree; run scripts/gpu_prepare.sh again." >&2
    exit 2
  fi
  stamp=$(ls -l .whl/*.whl | sha256sum)
  if [ "$(cat "$SITE/.phi3v-wheels" 2>/dev/null)" != "$stamp" ]; then
    echo "installing $(ls .whl/*.whl | wc -l) wheels from .whl/ into $SITE (no index, no dependencies) ..."
    rm -rf "$SITE"
    if ! "$PY" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl/*.whl \
        >"$DIR/install.log" 2>&1; then
      echo "error: installing .whl/ failed; see $DIR/install.log." >&2
      exit 1
    fi
    echo "$stamp" >"$SITE/.phi3v-wheels"
  fi
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi

record() {  # record PHASE KIND [key=value ...]: one JSON line in $RESULTS (values as given, strings quoted)
  "$PY" - "$RESULTS" "$@" <<'PYEOF'
import json, sys, time
path, phase, kind, *pairs = sys.argv[1:]
record = {"kind": kind, "phase": phase, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
for pair in pairs:
    key, _, value = pair.partition("=")
    try:
        record[key] = json.loads(value)
    except ValueError:
        record[key] = value
open(path, "a").write(json.dumps(record) + "\n")
PYEOF
}

environment() {  # the machine and the versions, once per call; flash-attn's absence as a skip with its reason
  "$PY" - "$RESULTS" "$1" <<'PYEOF'
import importlib, json, platform, sys, time
import torch
path, phase = sys.argv[1:]
now = time.strftime("%Y-%m-%dT%H:%M:%S")
packages = {}
for name in ("transformers", "peft", "accelerate", "deepspeed", "bitsandbytes", "liger_kernel", "hydra", "datasets",
             "phi3v_recipes", "flash_attn", "triton"):
    try:
        module = importlib.import_module(name)
        packages[name] = getattr(module, "__version__", "installed")
    except Exception as err:  # noqa: BLE001 - what is missing is recorded, not fatal
        packages[name] = f"not available ({type(err).__name__}: {str(err)[:200]})"
flash = not packages["flash_attn"].startswith("not available")
lines = [{"kind": "environment", "phase": phase, "time": now, "device": torch.cuda.get_device_name(0),
          "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
          "attn_implementation": "flash_attention_2" if flash else "flex_attention", "packages": packages}]
if not flash:
    lines.append({"kind": "skipped", "phase": phase, "time": now, "what": "flash-attention 2 (its tests; the bench)",
                  "reason": "flash-attn is not installed (no wheel for this torch; building it takes longer than a "
                            "device session): packed rows run through FlexAttention instead"})
with open(path, "a") as handle:
    handle.writelines(json.dumps(line) + "\n" for line in lines)
print(f"{lines[0]['device']}, torch {lines[0]['torch']}, attention {lines[0]['attn_implementation']}")
PYEOF
}

run_phase() {
  local phase=$1 start rc
  start=$(date +%s)
  echo "== phase $phase: expected device time ~$(( EXPECTED[$phase] / 60 )) min $(( EXPECTED[$phase] % 60 )) s (stopped after ${LIMIT} s) =="
  environment "$phase" || return 1
  case $phase in
    tests)
      # parallel workers where pytest-xdist is installed (the image has it): the training runs overlap
      local parallel=()
      "$PY" -c "import xdist" 2>/dev/null && parallel=(-n 4)
      GPU_RESULTS=$(realpath "$RESULTS") GPU_PHASE=$phase timeout "$LIMIT" "$PY" -m pytest -q -m gpu -rs \
        -p tests.gpu_report "${parallel[@]}" tests/test_gpu.py 2>&1 | tee "$DIR/tests.log"
      rc=${PIPESTATUS[0]} ;;
    bench-*)
      local strategy=${phase#bench-}
      # TORCH_LOGS=recompiles: every recompilation (FlexAttention, the block mask) is in the log with its cause
      TORCH_LOGS=${TORCH_LOGS:-recompiles} timeout "$LIMIT" "$PY" -m phi3v_recipes.bench workload=docvqa model=phi3_5_vision hardware="$HARDWARE" \
        strategy="$strategy" baseline=cookbook data.max_tokens_per_row="$ROW_TOKENS" \
        bench.samples_per_step="$SAMPLES_PER_STEP" bench.steps="$STEPS" bench.warmup_steps=1 \
        output="$DIR/bench_$strategy.json" progress="$RESULTS" 2>&1 | tee "$DIR/$phase.log"
      rc=${PIPESTATUS[0]} ;;
  esac
  local status=done
  [ "$rc" -ne 0 ] && status=failed
  [ "$rc" -eq 124 ] && status="stopped at its ${LIMIT} s limit"
  record "$phase" phase_end "status=$status" "exit_code=$rc" "seconds=$(( $(date +%s) - start ))" \
    "expected_seconds=${EXPECTED[$phase]}"
  echo "== phase $phase: $status after $(( $(date +%s) - start )) s (results: $RESULTS) =="
  return "$rc"
}

failed=0
for phase in "${PHASES[@]}"; do
  run_phase "$phase" || failed=1
done
exit $failed
