#!/usr/bin/env bash
# PPO on Llama-2-7B, one node of 8 GPUs. Set the checkpoints and data, then run from the repository root:
#   policy_load=/ckpt/llama2-7b-sft reward_load=/ckpt/llama2-7b-rm data_path=/data/prompts.jsonl \
#       bash examples/megatron/scripts/run_llama2_7b.sh
# Llama-2-7B: 32 heads, 32 kv heads -> tensor parallel 1, 2, 4 or 8; vocab 32000.
set -euo pipefail
cd "$(dirname "$0")/../../.."
export policy_tp=${policy_tp:-4} value_tp=${value_tp:-4} ref_tp=${ref_tp:-2} reward_tp=${reward_tp:-2}
export pad_token_id=${pad_token_id:-0}
export exp_name=${exp_name:-llama2_7b_rlhf}
exec python examples/megatron/train_rlhf.py -c examples/megatron/configs/gpu/rlhf_7b.yaml "$@"
