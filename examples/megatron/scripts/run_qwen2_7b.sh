#!/usr/bin/env bash
# PPO on Qwen2-7B, one node of 8 GPUs. Set the checkpoints and data, then run from the repository root:
#   policy_load=/ckpt/qwen2-7b-sft reward_load=/ckpt/qwen2-7b-rm data_path=/data/prompts.jsonl \
#       bash examples/megatron/scripts/run_qwen2_7b.sh
# Qwen2-7B: 28 heads, 4 kv groups -> tensor parallel 1, 2 or 4; vocab 152064.
set -euo pipefail
cd "$(dirname "$0")/../../.."
export policy_tp=${policy_tp:-4} value_tp=${value_tp:-4} ref_tp=${ref_tp:-2} reward_tp=${reward_tp:-2}
export pad_token_id=${pad_token_id:-151643}  # <|endoftext|>
export stop_token_list=${stop_token_list:-"<|im_end|>;<|endoftext|>"}
export exp_name=${exp_name:-qwen2_7b_rlhf}
exec python examples/megatron/train_rlhf.py -c examples/megatron/configs/gpu/rlhf_7b.yaml "$@"
