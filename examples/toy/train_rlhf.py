"""RLHF with six toy PyTorch models: the runtime end to end, in ChatLearn 1.x style.

Supports: RLHFEngine (policy -> reference/value -> reward, PPO-style trainers),
replicas, a 2-rank tensor-parallel-style replica, colocation, parameter sync
every episode, metrics (JSONL, TensorBoard) and checkpoints with resume.

    python examples/toy/train_rlhf.py -c examples/toy/configs/rlhf.yaml

The toy "policy" maps a prompt vector to a response; the reward prefers
responses close to the prompt, and the trainers move towards it, so the
reward rises from episode to episode.
"""
import chatlearn
from chatlearn import RLHFEngine
from chatlearn.utils.memory import PeakRSSMonitor
# toy_models.py sits next to this script, so Python finds it (and the engine gives its
# Ray workers the driver's sys.path, so they find it too).
from toy_models import ToyPolicy as PolicyInference
from toy_models import ToyReference as PolicyReference
from toy_models import ToyReward as RewardInference
from toy_models import ToyTrainer as PolicyTrainer
from toy_models import ToyTrainer as ValueTrainer
from toy_models import ToyValue as ValueInference
from toy_models import make_prompts


def main() -> None:
    chatlearn.init()
    args = chatlearn.get_args()

    policy_model = PolicyInference("policy")
    reference_model = PolicyReference("reference")
    reward_model = RewardInference("reward")
    value_model = ValueInference("value")
    ppo_policy_model = PolicyTrainer("ppo_policy")
    ppo_value_model = ValueTrainer("ppo_value")

    # The toy trainers regress on the prompt vector and declare no needs_rollout_keys, so
    # RLHFEngine's driver-side PPO step stays off (compute_advantages="auto"), as for any
    # ChatLearn 1.x model set that computes its own targets.
    engine = RLHFEngine(policy_model, reference_model, reward_model, value_model,
                        ppo_policy_model, ppo_value_model)
    engine.set_dataset(make_prompts(256))
    with PeakRSSMonitor() as memory:
        history = engine.learn()

    print("\nepisode  reward/mean  loss      time/environment  time/train  time/sync")
    for episode, m in enumerate(history):
        print(f"{episode + 1:>7}  {m.get('reward/mean', float('nan')):>11.4f}  {m.get('ppo_policy/loss', float('nan')):<8.4f}"
              f"  {m['time/environment']:>16.2f}  {m['time/train']:>10.2f}  {m['time/sync']:>9.2f}")
    run_dir = args.runtime.run_dir
    print(f"\nmetrics:      {run_dir}/metrics.jsonl (TensorBoard: {run_dir}/tensorboard)")
    print(f"checkpoints:  {engine.checkpoint_root} (a rerun with enable_resume_training: True continues there)")
    print(f"peak RSS:     {memory.peak_gib:.2f} GiB (driver + Ray workers, summed)")


if __name__ == "__main__":
    main()
