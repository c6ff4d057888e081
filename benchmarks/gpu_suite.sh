#!/usr/bin/env bash
# The one-shot GPU suite, under 8 minutes on one GPU: the report's step limits (LIMIT below) add up to
# 460 s. generate (two compiles of the whole 16B decode step) is a run of its own, STEPS=generate;
# STEPS="slice moe" runs only the named steps. Results go to $OUT, else benchmarks/gpu_results/:
# gpu_suite.json and gpu_suite.md, plus one JSON per step, written as each step ends so a timeout
# still leaves numbers.
#   bash benchmarks/gpu_suite.sh              on a GPU machine
#   bash benchmarks/gpu_suite.sh --cpu-smoke  the same steps on CPU with tiny shapes (CI)
# Steps: tests/single/test_kernels.py with real Triton; benchmarks/kernels.py (GB/s against the measured copy
# bandwidth and the torch references; MLA RoPE in place with the fused key against the previous
# copying path; on CPU a correctness pass and that RoPE comparison of the torch path); a bf16 training step of a Moonlight-width slice, eager and
# compiled, beside torchtitan's (MFU against the dense bf16 spec peak); the trainer's own step on that
# slice, 16 micro-batches per optimizer step, Muon and AdamW (MFU, optimizer ms, share outside
# forward+backward); one MoE layer piece by piece and the profiler's top kernels of a slice step;
# a Moonlight-16B LoRA step
# (peak memory, tokens/s); Moonlight-16B generation at batch 1 and 16 beside transformers' generate,
# and prefill MFU (benchmarks/generate.py).
set -u
cd "$(dirname "$0")/.."
SMOKE=""
LIMIT_SCALE=1
# on a CPU the limits are not the GPU's: twice as long, for a shared, loaded machine
[ "${1:-}" = "--cpu-smoke" ] && SMOKE="--cpu-smoke" && LIMIT_SCALE=2
# Seconds per step on one GPU. The first H200 run took 108 s for kernel_tests, kernel_bench, slice (no
# torchtitan) and lora together; tests/single/test_gpu_suite.py keeps the report's limits within 480 s.
declare -A LIMIT=([kernel_tests]=75 [kernel_bench]=60 [slice]=120 [trainer]=90 [moe]=45 [lora]=70 [generate]=420)
STEPS="${STEPS:-kernel_tests kernel_bench slice trainer moe lora}"
RESULTS="${OUT:-benchmarks/gpu_results}"
mkdir -p "$RESULTS"
rm -f "$RESULTS"/step_*.json
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0

record() {  # record NAME RC SECONDS: a step's exit status, for the summary
  printf '{"exit_code": %d, "seconds": %d}\n' "$2" "$3" > "$RESULTS/step_${1}_status.json"
  [ "$2" -eq 0 ] || status=1
}

run_step() {  # run_step NAME COMMAND...: one step within its LIMIT, its output in $RESULTS/NAME.log
  local name=$1 limit=$((LIMIT[$1] * LIMIT_SCALE)) start=$SECONDS
  shift
  case " $STEPS " in *" $name "*) ;; *) echo "== $name (not in STEPS)"; return ;; esac
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" 2>&1 | tee "$RESULTS/$name.log" | tail -n 25
  record "$name" "${PIPESTATUS[0]}" $((SECONDS - start))
}

if [ -n "$SMOKE" ]; then  # the interpreter is slow: a quick subset of the kernel tests
  run_step kernel_tests python -m pytest -q -x tests/single/test_kernels.py -k "reference or rope_tables or resolve"
else
  MOONLIGHT_TEST_GPU=1 run_step kernel_tests python -m pytest -q -x tests/single/test_kernels.py \
    tests/single/test_moe_sync.py::test_moe_layer_has_no_host_sync_on_cuda \
    tests/single/test_document_mask.py::test_packed_documents_add_no_host_sync_on_cuda \
    tests/single/test_moe_overlap.py::test_shared_experts_first_is_bit_identical
fi
run_step kernel_bench python benchmarks/kernels.py --json "$RESULTS/step_kernel_bench.json" $SMOKE
run_step slice python benchmarks/gpu_suite.py slice --out "$RESULTS" $SMOKE
run_step trainer python benchmarks/gpu_suite.py trainer --out "$RESULTS" $SMOKE
run_step moe python benchmarks/gpu_suite.py moe --out "$RESULTS" $SMOKE
run_step lora python benchmarks/gpu_suite.py lora --out "$RESULTS" $SMOKE
run_step generate python benchmarks/gpu_suite.py generate --out "$RESULTS" $SMOKE
python benchmarks/gpu_suite.py summary --out "$RESULTS"
echo "summary: $RESULTS/gpu_suite.json, $RESULTS/gpu_suite.md"
exit $status
