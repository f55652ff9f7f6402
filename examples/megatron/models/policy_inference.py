"""The policy's sampling side: vLLM, weights synced from the policy trainer after every step."""
from __future__ import annotations

from chatlearn.models.vllm_module import VLLMModule


class PolicyInference(VLLMModule):
    """Generates responses for the episode's prompts (``forward_step``) and, greedily by
    default, for evaluation (``eval_forward``). Sampling keys come from the model's
    YAML (``n``, ``temperature``, ``top_p``, ``max_new_tokens``, ...; docs/vllm.md).

    A prompt sample is ``{"prompt": text, ...}``; its other keys (an ``answer``, say)
    travel with each response to the reward.
    """
