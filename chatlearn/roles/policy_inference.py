"""The policy's sampling side: vLLM, weights synced from the policy trainer after every step."""
from __future__ import annotations

from chatlearn.models.vllm_module import VLLMModule


class PolicyInference(VLLMModule):
    """Generates responses for the episode's prompts (``forward_step``) and, greedily by
    default, for evaluation (``eval_forward``). Sampling keys come from the model's
    YAML (``n``, ``temperature``, ``top_p``, ``max_new_tokens``, ...; docs/vllm.md).

    A prompt sample is ``{"prompt": text, ...}`` (or a conversation: docs/data.md, "Prompt
    formats"); its other keys (an ``answer``, say) travel with each response to the reward.
    ``prompt_key`` (ChatLearn 1.x's example key) names another field of the data records
    that holds the prompt.
    """

    def _with_prompt_field(self, samples: list) -> list:
        key = self.model_args.get("prompt_key")
        if not key or key == "prompt":
            return samples
        out = []
        for i, sample in enumerate(samples):
            if key not in sample:
                raise KeyError(f"model {self.name!r}: prompt_key is {key!r}, but prompt record {i} has no such "
                               f"field (it has {sorted(sample)})")
            out.append({**sample, "prompt": sample[key]})
        return out
