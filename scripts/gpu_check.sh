#!/usr/bin/env bash
# One prepared check for a single H100/H200 machine with no network access. Run from the repository root:
#
#     bash scripts/gpu_check.sh            # results in $OUT (else ./gpu_check_out)
#
# Needs the wheels of scripts/README.md in .whl/ (nothing is downloaded). Stages, each with its own time limit,
# all inside GPU_CHECK_SECONDS (default 540) so one 10-minute device call holds it, most important first:
#   1. install the carried wheels into /tmp/site;
#   2. Qwen3-8B shape, bf16, in-process with random weights drawn on the GPU (no checkpoint: the shape's
#      folder holds its config only), batch 4 x 1024, LoRA rank 32 with bf16 products, each decoder layer
#      compiled whole (`--kernels compiled_layers`: one graph forward, one backward, LoRA included; the
#      first step compiles), with a torch.profiler table of one step: the MFU candidate;
#   3. the same with eager layers (the best measured before, 30.6 % MFU on 2026-11-27; since then bf16
#      norm weights take torch's fused RMSNorm and AdamW is fused), profiled, for the comparison;
#   4. TP=1 correctness: the fixed SDK sequence of scripts/tp1_reference.py through a server with one GPU
#      worker (fp32, compiled layers), against the CPU values in tp1_reference.json;
#   5. 8B with compiled layers at 6 x 1024 (more tokens per host launch; ~70 GiB expected);
#   6. Qwen3-0.6B shape, bf16, compiled layers: server through the SDK vs in-process, overhead ratio and
#      latency split, if time is left.
#   The H100 runs of 2026-11-27 (BENCHMARKS.md) found the 8B step host-bound at 2 x 1024 (5-10 thousand
#   kernels a step, 30-60 us of host time each); compiled layers are the answer to that.
# Results in $OUT (the device tool returns at most 8 files): gpu_check.log (every stage's output),
# tp1_check.json, results.json (every bench report by stage name), profiles.txt.
# A stage that fails or runs out of time is reported and the next one still runs; the exit code is that of
# the correctness stage. GPU_CHECK_SMOKE=1 runs the same stages on the embedded tiny model with tiny workloads and
# without installing wheels (to try the script itself on a CPU machine).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}
PY=${PY:-python3}
MODELS=${MODELS:-/tmp/tinkercloud-bench-models}
DEADLINE=$(( $(date +%s) + ${GPU_CHECK_SECONDS:-540} ))
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TINKER_TELEMETRY=0 PYTHONWARNINGS=ignore

left() { echo $(( DEADLINE - $(date +%s) )); }
LOG=$OUT/gpu_check.log  # every stage's full output; the device tool returns at most 8 files
stage() {  # stage NAME SECONDS CMD...: run with min(SECONDS, time left), append its output to $LOG
  local name=$1 limit=$2; shift 2
  local budget; budget=$(left); (( budget > limit )) && budget=$limit
  if (( budget < 20 )); then echo "== $name: skipped (no time left)" | tee -a "$LOG"; return 124; fi
  echo "== $name (limit ${budget}s)"
  local t0=$SECONDS
  timeout "$budget" "$@" > /tmp/gpu_check_stage.log 2>&1; local rc=$?
  { echo "== $name: rc=$rc after $(( SECONDS - t0 ))s"; cat /tmp/gpu_check_stage.log; } >> "$LOG"
  echo "   rc=$rc after $(( SECONDS - t0 ))s"; grep -v "Writing model shards" /tmp/gpu_check_stage.log | tail -n 12 | sed 's/^/   /'
  return $rc
}

SMALL=qwen3-0.6b BIG=qwen3-8b
TRAIN_SMALL=(--batch 8 --seq 1024 --rank 32) SAMPLE_SMALL=(--sample-requests 32 --prompt-tokens 128 --sample-tokens 128)
TRAIN_BIG=(--batch 2 --seq 1024 --rank 32) SAMPLE_BIG=(--sample-requests 8 --prompt-tokens 128 --sample-tokens 64)
if [[ ${GPU_CHECK_SMOKE:-0} == 1 ]]; then
  SMALL=embedded BIG=embedded-random
  TRAIN_SMALL=(--batch 2 --seq 32 --rank 4) SAMPLE_SMALL=(--sample-requests 2 --prompt-tokens 8 --sample-tokens 4)
  TRAIN_BIG=("${TRAIN_SMALL[@]}") SAMPLE_BIG=("${SAMPLE_SMALL[@]}")
else
  echo "== install wheels"
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee -a "$LOG"
fi
$PY -c 'import torch, megatron.core, tinker; print("torch", torch.__version__, "megatron-core", megatron.core.__version__, "tinker", tinker.__version__, "tf32", torch.backends.cuda.matmul.allow_tf32)' | tee -a "$LOG"

BENCH=($PY scripts/bench_throughput.py --models-cache "$MODELS")
TMP=$(mktemp -d)
big() {  # big NAME ARGS...: an in-process 8B-shape stage, its report in $TMP/NAME.json
  local name=$1; shift
  stage "$name" "$BIG_LIMIT" "${BENCH[@]}" --json "$TMP/$name.json" --no-server --shape "$BIG" --dtype bf16 "$@"
}
B4=(--batch $(( 2 * ${TRAIN_BIG[1]} )) "${TRAIN_BIG[@]:2}")
TINY_SAMPLE=(--sample-requests 1 --prompt-tokens 8 --sample-tokens 4 --sample-rounds 1)
BIG_LIMIT=200
big 8b_layers_lora16_b4 --kernels compiled_layers --lora-compute base "${B4[@]}" --steps 3 "${SAMPLE_BIG[@]}" \
  --sample-rounds 1 --profile "$TMP/profile_8b_layers_lora16_b4.txt"
BIG_LIMIT=100
big 8b_eager_lora16_b4 --kernels eager --lora-compute base "${B4[@]}" --steps 3 "${TINY_SAMPLE[@]}" \
  --profile "$TMP/profile_8b_eager_lora16_b4.txt"

stage tp1_check 120 $PY scripts/tp1_reference.py --check --kernels compiled_layers --json "$OUT/tp1_check.json"
CORRECT=$?

BIG_LIMIT=200
big 8b_layers_lora16_b6 --kernels compiled_layers --lora-compute base --batch $(( 3 * ${TRAIN_BIG[1]} )) \
  "${TRAIN_BIG[@]:2}" --steps 3 "${TINY_SAMPLE[@]}"

stage 0.6b_server 170 "${BENCH[@]}" --json "$TMP/0.6b_server.json" --start-server --shape "$SMALL" --dtype bf16 \
  --kernels compiled_layers "${TRAIN_SMALL[@]}" --steps 4 "${SAMPLE_SMALL[@]}" --sample-rounds 1 --probe-steps 2

for f in "$TMP"/profile_*.txt; do [[ -f $f ]] && { echo "=== $(basename "$f")"; cat "$f"; }; done > "$OUT/profiles.txt"

echo "== summary"
$PY - "$TMP" "$OUT/results.json" <<'EOF' | tee -a "$LOG"
import json, sys
from pathlib import Path
tmp, results = Path(sys.argv[1]), {}
for name in ("8b_layers_lora16_b4", "8b_eager_lora16_b4", "8b_layers_lora16_b6", "0.6b_server"):
    try:
        r = results[name] = json.loads((tmp / f"{name}.json").read_text())
    except (OSError, ValueError):
        print(f"{name:24} no result")
        continue
    inproc, server, mfu = r.get("inprocess", {}), r.get("server", {}), r.get("mfu", {})
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}%"
    print(f"{name:24} in-process train {inproc['train']['tokens_per_s']} tok/s (MFU {pct(mfu.get('inprocess'))}; "
          f"fb {inproc['train']['fb_ms']} ms, optim {inproc['train']['optim_ms']} ms), "
          f"sample {inproc['sample']['tokens_per_s']} tok/s, build {inproc['build_s']} s, "
          f"peak {inproc.get('peak_memory_gib', '-')} GiB"
          + (f"; server train {server['train']['tokens_per_s']} tok/s (MFU {pct(mfu.get('server'))}), "
             f"sample {server['sample']['tokens_per_s']} tok/s; overhead {r.get('overhead')}" if server else ""))
Path(sys.argv[2]).write_text(json.dumps(results, indent=1) + "\n")
EOF
grep -H "^profiled step" "$TMP"/profile_*.txt 2>/dev/null | sed "s|$TMP/||" | tee -a "$LOG"
exit $CORRECT
