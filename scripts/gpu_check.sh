#!/usr/bin/env bash
# scripts/gpu_check.sh [results.json]: every GPU check of phi3v-recipes on one CUDA machine, one results file.
#
#   1. installs the GPU extras into the active Python (.venv/bin/python if present): DeepSpeed, bitsandbytes, Liger,
#      flash-attn (built against the installed torch; skipped with a note when it cannot be built or fetched);
#   2. runs the GPU-only tests (tests/test_gpu.py, marker `gpu`): flash-attention 2 vs sdpa logits in bf16, packed
#      rows through flash-attention's varlen path vs unpacked samples, a bf16 training run per strategy (full and
#      frozen_vision with DeepSpeed ZeRO-2, lora, qlora with 4-bit kernels);
#   3. benchmarks ours against the cookbook loop at real size (Phi-3.5-vision geometry, random weights, no download)
#      on the DocVQA-shaped workload, one GPU: strategy=full (fp32 master weights under bf16 autocast, never plain
#      AdamW on bf16 weights), lora and qlora, packed rows of up to $ROW_TOKENS tokens;
#   4. writes everything (environment, test outcomes, every bench figure) to one JSON file, default
#      gpu_results/gpu_check.json, next to the raw logs.
#
# Environment knobs: PYTHON (interpreter), ROW_TOKENS (packed-row budget, default 16384), SAMPLES_PER_STEP (16),
# STEPS (4), HARDWARE (h100: bf16 + flash attention; a100 works the same), SKIP_INSTALL=1 (use what is installed).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu_results/gpu_check.json}
DIR=$(dirname "$OUT")
mkdir -p "$DIR"
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
ROW_TOKENS=${ROW_TOKENS:-16384}
SAMPLES_PER_STEP=${SAMPLES_PER_STEP:-16}
STEPS=${STEPS:-4}
HARDWARE=${HARDWARE:-h100}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || {
  echo "error: no CUDA GPU is visible to $PY; run this script on a GPU machine." >&2; exit 2; }

# 1. GPU extras
if [ "${SKIP_INSTALL:-0}" != 1 ]; then
  "$PY" -m pip install -e ".[deepspeed,qlora,liger]" >"$DIR/install.log" 2>&1 \
    || echo "warning: installing deepspeed/bitsandbytes/liger-kernel failed (see $DIR/install.log)"
  "$PY" -m pip install "flash-attn>=2.6" --no-build-isolation >>"$DIR/install.log" 2>&1 \
    || echo "warning: flash-attn could not be installed (see $DIR/install.log): flash tests skip, bench uses sdpa"
fi
if "$PY" -c "import flash_attn" 2>/dev/null; then ATTN=flash_attention_2; else ATTN=sdpa; fi
echo "attention for the GPU runs: $ATTN"

# 2. GPU-only tests
"$PY" -m pytest -q -m gpu tests/test_gpu.py -rs --junitxml="$DIR/gpu_tests.xml" 2>&1 | tee "$DIR/gpu_tests.log"

# 3. real-size benchmarks, one per strategy
for STRATEGY in full lora qlora; do
  "$PY" -m phi3v_recipes.bench workload=docvqa model=phi3_5_vision hardware="$HARDWARE" \
    model.attn_implementation="$ATTN" strategy="$STRATEGY" baseline=cookbook \
    data.max_tokens_per_row="$ROW_TOKENS" bench.samples_per_step="$SAMPLES_PER_STEP" bench.steps="$STEPS" \
    output="$DIR/bench_$STRATEGY.json" 2>&1 | tee "$DIR/bench_$STRATEGY.log"
done

# 4. one results file
"$PY" - "$OUT" "$DIR" "$ATTN" <<'PYEOF'
import json, platform, sys, xml.etree.ElementTree as ET
from pathlib import Path
import torch
out, folder, attn = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
result = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda,
          "python": platform.python_version(), "attn_implementation": attn, "tests": {}, "bench": {}}
for pkg in ("transformers", "deepspeed", "bitsandbytes", "flash_attn", "peft"):
    try:
        result[pkg] = __import__(pkg).__version__
    except Exception as err:  # noqa: BLE001 - record what is missing
        result[pkg] = f"not available ({type(err).__name__})"
junit = folder / "gpu_tests.xml"
if junit.is_file():
    for case in ET.parse(junit).iter("testcase"):
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = child.tag + (f": {child.get('message')}" if child.get("message") else "")
        result["tests"][case.get("name")] = outcome
for strategy in ("full", "lora", "qlora"):
    path = folder / f"bench_{strategy}.json"
    result["bench"][strategy] = json.loads(path.read_text()) if path.is_file() else "failed: see the log"
out.write_text(json.dumps(result, indent=2) + "\n")
print(f"results: {out}")
for strategy, bench in result["bench"].items():
    if isinstance(bench, dict):
        ours = bench["ours"]
        print(f"{strategy:<6} ours {ours['samples_per_s']['median']:.2f} samples/s, MFU {ours['mfu'] or 0:.1%}, "
              f"peak {ours['peak_memory_mb'] / 1024:.1f} GiB; speedup {bench['speedup']:.2f}x over the cookbook loop")
    else:
        print(f"{strategy:<6} {bench}")
failed = [name for name, outcome in result["tests"].items() if outcome.startswith(("failure", "error"))]
sys.exit(1 if failed or any(not isinstance(b, dict) for b in result["bench"].values()) else 0)
PYEOF
