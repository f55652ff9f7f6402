"""Model roles for the Megatron + vLLM examples (imported by the entry scripts one folder up).

    PolicyInference   vLLM sampling: responses, old_logprobs
    PolicyReference   Megatron forward: ref_logprobs
    RewardInference   Megatron score head and/or a Python reward function: scores
    MathReward        a rule-based math reward merged with the reward model's (1.x's GRPO math)
    ValueInference    Megatron score head: old_values
    PolicyTrainer     Megatron PPO policy loss        (GRPOTrainer, DPOTrainer: the other algorithms)
    ValueTrainer      Megatron clipped value loss
"""
from models.policy_inference import PolicyInference
from models.policy_trainer import DPOTrainer, GRPOTrainer, PolicyTrainer
from models.reference import PolicyReference
from models.reward import MathReward, RewardInference
from models.value import ValueInference, ValueTrainer

__all__ = ["PolicyInference", "PolicyReference", "RewardInference", "MathReward", "ValueInference", "PolicyTrainer",
           "GRPOTrainer", "DPOTrainer", "ValueTrainer"]
