"""The frozen reference policy: token log-probs of the sampled responses."""
from __future__ import annotations

from chatlearn.models.megatron import MegatronModule


class PolicyReference(MegatronModule):
    """``ref_logprobs`` [b, s], aligned with ``input_ids`` and zero outside the response.

    Tokens are scored under the rollout's own sampling settings (temperature,
    top-k, top-p, per row), the distribution the policy's log-probs refer to,
    with the scored token always inside the filter so the KL stays finite
    (``chatlearn.algorithms.core.sampling_logprobs``).
    """

    def forward_step(self, data: dict, iteration: int) -> dict:
        out = super().forward_step(data, iteration)
        if not out:  # not the last pipeline stage
            return {}
        return {"ref_logprobs": out["logprobs"] * data["loss_mask"]}
