"""The frozen reference policy: token log-probs of the sampled responses."""
from __future__ import annotations

from chatlearn.models.megatron import MegatronModule


class PolicyReference(MegatronModule):
    """``ref_logprobs`` [b, s], aligned with ``input_ids`` and zero outside the response."""

    def forward_step(self, data: dict, iteration: int) -> dict:
        out = super().forward_step({"input_ids": data["input_ids"]}, iteration)
        if not out:  # not the last pipeline stage
            return {}
        return {"ref_logprobs": out["logprobs"] * data["loss_mask"]}
