#!/bin/bash
# The two-GPU measurements of benchmarks/RESULTS.md, in the order they were run (a machine with
# 2 GPUs, chatlearn's GPU stack installed; each part's log and results go to $OUT, default ./out).
#
#   bash benchmarks/two_gpu.sh sync   # NCCL test; weight sync trainer GPU 0 -> vLLM GPU 1; vLLM TP2
#   bash benchmarks/two_gpu.sh e2e    # GRPO: every role on both GPUs vs vLLM on its own GPU, one episode apart
set -uo pipefail
OUT=$(realpath -m "${OUT:-out}")
mkdir -p "$OUT"
marker=$(mktemp)
export PYTHONUNBUFFERED=1 VLLM_USE_FLASHINFER_SAMPLER=0
# (NCCL_NVLS_ENABLE=0 and friends come from the machine's environment and are inherited.)
status=0
step() {  # step NAME SECONDS COMMAND...: run with a time limit, keep going on failure
    local name=$1 limit=$2; shift 2
    echo "== $name ($(date +%T))"
    timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "   rc=$rc ($(date +%T))"; tail -n 30 "$OUT/$name.log"
    [[ $rc == 0 ]] || status=1
}
case ${1:?usage: two_gpu.sh sync|e2e} in
  sync)
    step nccl_test 120 python -m pytest -q -p no:cacheprovider tests/test_param_sync_collective.py
    step sync_separate 240 python benchmarks/param_sync.py --device gpu --models qwen2-0.5b --layout separate \
        --transports collective shm --repeats 5 --no-hf --enforce-eager
    step vllm_tp2 300 python benchmarks/param_sync.py --device gpu --models qwen2-0.5b --vllm-tp 2 \
        --transports auto --repeats 3 --standalone --no-hf --enforce-eager
    ;;
  e2e)
    common=(--gpus 2 --new-tokens 512 --stop-ids 600 --steps 5 --lr 1e-5 --enforce-eager)
    step e2e_colocated 280 python benchmarks/e2e_gpu.py "${common[@]}" --layout colocated
    step e2e_split_lag1 280 python benchmarks/e2e_gpu.py "${common[@]}" --layout split --policy-lag 1
    ;;
esac
cp benchmarks/RESULTS.md "$OUT/" 2>/dev/null
# The results files this run wrote, and the engine runs' own logs.
find benchmarks/results /tmp/chatlearn-e2e -newer "$marker" -type f \( -name '*.json' -o -name '*.log' \) \
    -size -20M -print0 2>/dev/null | tar czf "$OUT/results.tgz" --null -T - 2>/dev/null
exit $status
