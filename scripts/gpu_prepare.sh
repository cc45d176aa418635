#!/usr/bin/env bash
# scripts/gpu_prepare.sh: run HERE (a machine that reaches the package index) before scripts/gpu_check.sh runs on a
# lent GPU machine that reaches none. It fills .whl/ (git-ignored) with one wheel of every package the GPU check
# needs that the machine's image lacks, for the image's Python 3.12 on manylinux x86_64 (or pure Python):
#
#   1. resolves the project with its GPU extras ('.[deepspeed,qlora,liger]') for Python 3.12, the versions the
#      image has (scripts/gpu_image_packages.txt) held fixed, so every version chosen works with the image's;
#   2. keeps what the image does not hold (hydra-core, omegaconf, datasets, deepspeed, bitsandbytes, liger-kernel
#      and their own missing needs), downloads each as a binary wheel, or builds one here where only a source
#      archive is published (antlr4-python3-runtime; deepspeed, without prebuilt ops: its kernels JIT-compile on
#      the GPU machine if ever used);
#   3. builds the project itself as a wheel;
#   4. prints the manifest and the total size, and fails above 60 MiB (what travels with a device call is 64 MiB,
#      the working tree included).
#
# flash-attn is not packed: it has no wheel for the image's torch and building it takes longer than a device
# session; packed rows then go through PyTorch's FlexAttention (docs/performance.md).
#
# `scripts/gpu_prepare.sh --sources-hash` prints the hash of the project's sources that .whl/SOURCES.sha256 records.
# Environment knobs: PYTHON (a Python 3.12 with pip; default python3.12), WHL_DIR (default .whl),
# WHL_LIMIT_MIB (default 60).
set -euo pipefail
cd "$(dirname "$0")/.."

sources_hash() {  # what the project's wheel is built from; gpu_check.sh compares it with its working tree
  find src/phi3v_recipes conf pyproject.toml -type f \( -name '*.py' -o -name '*.yaml' -o -name '*.toml' \) -print0 \
    | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -d' ' -f1
}
if [ "${1:-}" = --sources-hash ]; then
  sources_hash
  exit 0
fi
PY=${PYTHON:-python3.12}
WHL=${WHL_DIR:-.whl}
LIMIT_MIB=${WHL_LIMIT_MIB:-60}
IMAGE=scripts/gpu_image_packages.txt
EXTRAS="deepspeed,qlora,liger"

if ! "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then
  echo "error: $PY is not a Python 3.12 (the GPU image's); set PYTHON=/path/to/python3.12." >&2
  exit 2
fi
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WHL"
rm -f "$WHL"/*.whl

# 1. resolve for Python 3.12, the image's pinned versions as constraints (names without a version: any)
grep -E '^[A-Za-z0-9][A-Za-z0-9._-]*==' "$IMAGE" >"$WORK/image-constraints.txt"
echo "resolving .[$EXTRAS] for Python 3.12 against the image's versions ($IMAGE) ..."
"$PY" -m pip install --quiet --dry-run --ignore-installed --report "$WORK/report.json" \
  -c "$WORK/image-constraints.txt" ".[$EXTRAS]"

# 2. what the image lacks: name==version, one a line (the project itself is built below)
"$PY" - "$WORK/report.json" "$IMAGE" >"$WORK/needed.txt" <<'PYEOF'
import json, re, sys

def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()

report, image = json.load(open(sys.argv[1])), open(sys.argv[2]).read().splitlines()
have = {norm(re.split(r"[=<>!~ ]", line.strip(), maxsplit=1)[0]) for line in image if line.strip() and not line.startswith("#")}
for item in report["install"]:
    name, version = item["metadata"]["name"], item["metadata"]["version"]
    if norm(name) not in have and norm(name) != "phi3v-recipes":
        print(f"{norm(name)}=={version}")
PYEOF

while read -r req; do
  if ! "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
      -d "$WHL" "$req" 2>"$WORK/download.log"; then
    echo "building a wheel of $req (no binary wheel is published)"
    # deepspeed: DS_BUILD_OPS=0 builds no CUDA op into the wheel (it would need this machine to have CUDA)
    DS_BUILD_OPS=0 "$PY" -m pip wheel --quiet --no-deps -w "$WHL" "$req"
  fi
done <"$WORK/needed.txt"

# 3. the project, and the hash of its sources (gpu_check.sh refuses a wheel built from other sources)
"$PY" -m pip wheel --quiet --no-deps -w "$WHL" .
rm -rf build
sources_hash >"$WHL/SOURCES.sha256"

# 4. manifest and size
echo
echo "manifest of $WHL/ (installed on the GPU machine with pip install --no-index --no-deps):"
total=0
for wheel in "$WHL"/*.whl; do
  size=$(stat -c %s "$wheel")
  total=$((total + size))
  awk -v s="$size" -v n="$(basename "$wheel")" 'BEGIN { printf "  %8.2f MiB  %s\n", s / 1048576, n }'
done
awk -v s="$total" -v n="$(ls "$WHL"/*.whl | wc -l)" -v l="$LIMIT_MIB" \
  'BEGIN { printf "total: %.2f MiB in %d wheels (limit %d MiB)\n", s / 1048576, n, l }'
if [ "$total" -gt $((LIMIT_MIB * 1048576)) ]; then
  echo "error: $WHL/ holds more than $LIMIT_MIB MiB; what travels to the GPU machine is 64 MiB with the working tree." >&2
  exit 1
fi
