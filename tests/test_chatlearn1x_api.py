"""ChatLearn 1.x's entry-script API (docs/migration.md): every alias, hook adaptation, refusal and
the RL presets' "auto" driver-side step. Unit tests need no Ray; the few engine runs use the toy
config (tests/configs/toy_rlhf.yaml) on the session's Ray."""
from __future__ import annotations

import os

import pytest
import torch

import chatlearn
from chatlearn import BaseModule, Engine, Environment, Evaluator, RLHFEngine, TorchModule, Trainer
from chatlearn.models.base import HookSignatureError, WorkerInfo, call_hook
from chatlearn.models.compat1x import RESUME_ENV
from chatlearn.runtime.engine import FlowError
from chatlearn.runtime.rl_engines import CheckedStep, RolloutKeysError
from toy_models import ToyPolicy, ToyReference, ToyReward, ToyTrainer, ToyValue, make_prompts

CONFIG = os.path.join(os.path.dirname(__file__), "configs", "toy_rlhf.yaml")


# -- the hook adapter ------------------------------------------------------------------------
class Hooks:
    def ours(self, data, iteration):
        return ("ours", data, iteration)

    def eval_1x(self, policy_res):  # 1.x's eval_forward(data)
        return ("eval_1x", policy_res)

    def no_args(self):  # 1.x's before_episode()
        return ("no_args",)

    def save_1x(self, iteration):  # 1.x's save_checkpoint(iteration)
        return ("save_1x", iteration)

    def save_ours(self, path):
        return ("save_ours", path)

    def renamed(self, batch, it):
        return ("renamed", batch, it)

    def optional_iteration(self, batch, it=0):
        return ("optional", batch, it)

    def with_extra(self, data, extra):
        return ("with_extra", data, extra)

    def star(self, *args):
        return ("star", args)

    def needs_more(self, data, tokenizer):
        return ("needs_more", data, tokenizer)


@pytest.mark.parametrize("method, offered, extra, expected", [
    ("ours", {"data": 1, "iteration": 2}, (), ("ours", 1, 2)),
    ("eval_1x", {"data": 1, "iteration": 2}, (), ("eval_1x", 1)),
    ("no_args", {"episode": 3}, (), ("no_args",)),
    ("save_1x", {"path": "/ckpt", "iteration": 7}, (), ("save_1x", 7)),
    ("save_ours", {"path": "/ckpt", "iteration": 7}, (), ("save_ours", "/ckpt")),
    ("renamed", {"data": 1, "iteration": 2}, (), ("renamed", 1, 2)),
    ("optional_iteration", {"data": 1, "iteration": 2}, (), ("optional", 1, 0)),
    ("with_extra", {"data": 1, "iteration": 2}, ("x",), ("with_extra", 1, "x")),
    ("star", {"data": 1, "iteration": 2}, ("x",), ("star", (1, 2, "x"))),
])
def test_call_hook_passes_what_each_signature_accepts(method, offered, extra, expected):
    assert call_hook(getattr(Hooks(), method), offered, *extra) == expected


def test_call_hook_names_a_signature_it_cannot_serve():
    with pytest.raises(HookSignatureError, match=r"needs_more\(self, data, tokenizer\) has no value for "
                                                 r"\['tokenizer'\]: the engine calls it with \(data\)"):
        call_hook(Hooks().needs_more, {"data": 1})


# -- chatlearn's 1.x names -------------------------------------------------------------------
def test_chatlearn_exports_the_names_1x_scripts_import():
    from chatlearn.models.megatron.module import MegatronModule
    from chatlearn.models.vllm_module import VLLMModule

    for name in ("BaseModule", "TorchModule", "Engine", "RLHFEngine", "DPOEngine", "OnlineDPOEngine", "GRPOEngine",
                 "GRPOMathEngine", "EvalEngine", "Environment", "Trainer", "Evaluator", "init", "get_args"):
        assert getattr(chatlearn, name) is not None, name
    assert chatlearn.MegatronModule is MegatronModule and chatlearn.VLLMModule is VLLMModule
    assert chatlearn.RLHFModule is BaseModule and chatlearn.RLHFTorchModule is TorchModule
    assert chatlearn.RLHFMegatronModule is MegatronModule
    assert chatlearn.RLHFVLLMModule is VLLMModule and chatlearn.VLLMModuleV2 is VLLMModule
    assert chatlearn.logger.name == "chatlearn"


@pytest.mark.parametrize("name, hint", [("DeepSpeedModule", "MegatronModule"), ("FSDPModule", "TorchModule"),
                                        ("ControlDependencies", "inputs exist"), ("get", "rollout dump"),
                                        ("hooks", "nothing here needs patches")])
def test_1x_names_without_a_counterpart_are_refused_with_a_message(name, hint):
    with pytest.raises(ImportError, match=f"chatlearn.{name} \\(ChatLearn 1.x\\) does not exist here: .*{hint}"):
        exec(f"from chatlearn import {name}", {})


def test_runtime_args_get_as_in_1x():
    chatlearn.init(CONFIG)
    args = chatlearn.get_args()
    assert args.runtime_args.get("eval_data_num_limit") is None
    assert args.runtime_args.get("training_data_num_limit") == -1
    assert args.runtime_args.get("not_a_key", 5) == 5


def test_runtime_args_args_dict_as_in_1x():
    """1.x's entry scripts read args.runtime_args._args_dict['training_data_num_limit']."""
    chatlearn.init(CONFIG)
    args = chatlearn.get_args()
    assert args.runtime_args._args_dict["training_data_num_limit"] == -1
    assert args.runtime_args._args_dict["sample_per_episode"] == 16
    assert args.env_args._args_dict["platform"] == args.runtime_env.platform
    with pytest.raises(TypeError):
        args.runtime_args._args_dict["sample_per_episode"] = 1  # read-only, as a view of the config


# -- module helpers --------------------------------------------------------------------------
class Plain(BaseModule):
    pass


class Linear(TorchModule):
    pass


def test_module_helpers_inside_a_worker(monkeypatch):
    chatlearn.init(CONFIG)
    module = Plain("ppo_policy")
    module.worker = WorkerInfo(replica_id=1, rank=3, world_size=4, tp_size=2, pp_size=1, dp_size=2, num_replicas=3)
    assert (module.replica_id, module.rank, module.get_rank(), module.world_size) == (1, 3, 3, 4)
    assert module.is_last_rank()
    assert (module.data_parallel_rank, module.data_parallel_size) == (1, 2)
    assert (module.get_data_parallel_rank(), module.get_data_parallel_size()) == (1, 2)
    assert (module.tensor_model_parallel_size(), module.pipeline_model_parallel_size(),
            module.expert_model_parallel_size()) == (2, 1, 1)
    assert (module.tensor_parallel_rank(), module.pipeline_parallel_rank(), module.expert_parallel_rank()) == (1, 0, 0)
    assert module.num_replica == 3
    assert module.trainable and not module.enable_lora and module.parameter_sync_frequency == 1
    assert module.get_runtime_args() is chatlearn.get_args().runtime
    assert (module.total_gpu, module.total_cpu, module.gpu_per_process) == (0, 2, 1)
    assert module.is_colocate and module.tensor_and_expert_model_parallel_size() == 2
    assert module.config_dir == os.path.dirname(CONFIG)
    assert module._logger.name == "chatlearn.models.Plain"
    monkeypatch.setenv(RESUME_ENV, "1")
    assert module.resume_training
    monkeypatch.setenv(RESUME_ENV, "0")
    assert not module.resume_training
    assert not module.has_weights()
    module.worker = WorkerInfo(0, 0, 4, 2, 1, 2)
    assert not module.is_last_rank()


def test_module_helpers_for_weights_metrics_and_padding():
    chatlearn.init(CONFIG)
    module = Linear("policy")
    assert not module.has_weights() and module.named_parameters == {}
    module.model = torch.nn.Linear(2, 3)
    assert module.has_weights()
    assert sorted(module.named_parameters) == ["bias", "weight"] and len(module.parameters) == 2
    assert module.peak_memory() > 0
    module.empty_cache()
    module._metric_prefix = "policy_inference"
    module._metric_list += [{"a": torch.tensor(1.0), "b": 2}, {"a": 3.0}]
    assert module.get_and_clear_metrics() == ("policy_inference", {"a": 2.0, "b": 2.0})
    assert module.get_and_clear_metrics() == ("policy_inference", {})
    module.add_padding_config("action_ids", 7)
    assert module.padding_config() == {"action_ids": {"padding_value": 7, "padding_type": "right"}}
    with pytest.raises(ValueError, match="right-padded here"):
        module.add_padding_config("ids", 0, padding_type="left")


@pytest.mark.parametrize("name, hint", [("megatron_args", "self.model_args"), ("generate_vllm", "generate"),
                                        ("timers", "time/<model>.<method>")])
def test_missing_1x_helpers_name_the_replacement(name, hint):
    with pytest.raises(AttributeError, match=f"Plain.{name} \\(ChatLearn 1.x\\) does not exist here: .*{hint}"):
        getattr(Plain("policy"), name)
    with pytest.raises(AttributeError, match="'Plain' object has no attribute 'no_such_thing'"):
        Plain("policy").no_such_thing


def test_put_and_get_need_a_running_engine(monkeypatch):
    monkeypatch.delenv("CHATLEARN_STORE", raising=False)
    with pytest.raises(RuntimeError, match="inside engine.learn"):
        Plain("policy").put("k", 1)


def test_overriding_a_replaced_1x_megatron_method_is_refused_when_the_engine_is_built():
    from chatlearn.models.megatron.module import MegatronModule

    class OldPolicy(MegatronModule):
        def model_provider(self, pre_process=True, post_process=True):
            raise AssertionError("never called")

    class OwnHelper(TorchModule):  # a TorchModule may have a method of that name: it is just a helper
        def model_provider(self):
            return torch.nn.Linear(2, 2)

        def forward_step(self, data, iteration):
            return {}

    chatlearn.init(CONFIG)
    trainer = ToyTrainer("ppo_policy")
    for cls, refused in ((OldPolicy, True), (OwnHelper, False)):
        policy = cls("policy")

        def env_flow(batch, policy=policy):
            return policy.forward_step(batch)

        def train_flow(batch):
            trainer.train_step(batch)

        if refused:
            with pytest.raises(NotImplementedError, match=r"OldPolicy.model_provider\(\): MegatronModule builds .*"
                                                          r"loss_fn"):
                Engine(Environment(env_flow), Trainer(train_flow))
        else:
            Engine(Environment(env_flow), Trainer(train_flow))

    class OldOffload(ToyPolicy):  # 1.x's fine-grained offload hooks, on any module
        def offload_weights(self):
            pass

    policy = OldOffload("policy")
    with pytest.raises(NotImplementedError, match=r"OldOffload.offload_weights\(\): free_memory here calls "
                                                  r"offload\(\) and onload\(\)"):
        Engine(Environment(lambda b: policy.forward_step(b)), Trainer(lambda b: trainer.train_step(b)))


# -- flows: 1.x's any-method rule ------------------------------------------------------------
class Scorer(BaseModule):
    def forward_step(self, data):
        return {"reward": data["x"].sum(-1)}

    def score(self, data):  # no dispatch mode: a 1.x flow may still call it
        return {"score": -data["x"].abs().sum(-1)}


class Fitter(ToyTrainer):
    def fit(self, data_list, iteration):
        return self.train_step(data_list, iteration)


def test_a_flow_may_call_any_public_method_as_in_1x():
    chatlearn.init(CONFIG)
    policy, reward, trainer = ToyPolicy("policy"), Scorer("reward"), Fitter("ppo_policy")

    def env_flow(batch):
        return reward.score(policy.forward_step(batch))

    def train_flow(batch):
        trainer.fit(batch)

    engine = Engine(Environment(env_flow), Trainer(train_flow))
    assert reward.remote_modes()["score"] == "round_robin"
    assert trainer.remote_modes()["fit"] == "data_parallel"
    assert [n.name for n in engine.environment.graph] == ["policy.forward_step#1", "reward.score#1"]

    def eval_flow_as_trainer(batch):  # the same method in a trainer flow: two modes
        reward.score(batch)

    with pytest.raises(FlowError, match="reward.score.*another flow calls as round_robin"):
        engine.set_trainer(Trainer(eval_flow_as_trainer))


def test_a_flow_returning_no_model_output_is_refused_when_built():
    chatlearn.init(CONFIG)
    policy = ToyPolicy("policy")
    trainer = ToyTrainer("ppo_policy")

    def env_flow(batch):
        policy.forward_step(batch)
        return batch

    with pytest.raises(FlowError, match="must return the output of a model call"):
        Engine(Environment(env_flow), Trainer(lambda b: trainer.train_step(b)))


# -- engine API ------------------------------------------------------------------------------
def toy_flows():
    policy, reward, trainer = ToyPolicy("policy"), ToyReward("reward"), ToyTrainer("ppo_policy")

    def env_flow(batch):
        return reward.forward_step(policy.forward_step(batch))

    def train_flow(batch):
        trainer.train_step(batch)

    def eval_flow(batch):
        return reward.forward_step(policy.eval_forward(batch))

    return (policy, reward, trainer), Environment(env_flow), Trainer(train_flow), Evaluator(eval_flow)


def test_engine_1x_setters():
    chatlearn.init(CONFIG)
    (policy, reward, trainer), env, train, evaluator = toy_flows()
    engine = Engine(env, train, None, "my_run")  # 1.x: Engine(environment, trainer, evaluator, name)
    assert engine.name == "my_run" and engine.rollout_processor is None
    assert engine.set_evaluator(evaluator) is engine and evaluator._engine is engine
    engine.set_parameter_sync(trainer, policy)
    assert set(engine.models) == {"policy", "reward", "ppo_policy"}
    reference = ToyReference("reference")

    def env2(batch):
        return reference.forward_step(policy.forward_step(batch))

    engine.set_environment(Environment(env2))
    assert set(engine.models) == {"policy", "reference", "reward", "ppo_policy"}  # reward: the evaluator's
    engine.set_trainer(Trainer(lambda b: trainer.train_step(b)))
    engine.set_multiple_datasets([make_prompts(4)])
    assert len(engine.prompts) == 4
    with pytest.raises(NotImplementedError, match="join them into one list"):
        engine.set_multiple_datasets([make_prompts(4), make_prompts(2)])
    chooser = lambda buffers: []  # noqa: E731
    assert engine.set_relay_sample_manager(chooser).relay_sample_fn is chooser
    engine.history = [{"time/policy.forward_step": 1.5, "time/train": 2.0, "loss": 1.0}]
    assert engine.logging_summary(0) == {"policy": {"forward_step": 1.5}, "episode": {"train": 2.0}}
    assert engine.logging_summary(-1) == {}
    with pytest.raises(RuntimeError, match="EvalEngine"):
        evaluator.eval()
    with pytest.raises(RuntimeError, match="while the engine runs"):
        engine.logging_memory()
    engine.stop()  # nothing started: nothing to stop
    with pytest.raises(ValueError, match="needs an environment and a trainer"):
        Engine(evaluator=Evaluator(evaluator.flow_fn)).learn()
    eval_engine = chatlearn.EvalEngine(evaluator=Evaluator(evaluator.flow_fn))
    assert eval_engine.set_multiple_datasets([[1], [2, 3]]).evaluator.prompts == [1, 2, 3]
    with pytest.raises(ValueError, match="call engine.eval"):
        eval_engine.learn()


def test_evaluator_post_process_contracts():
    samples = [{"reward": 1.0}, {"reward": 3.0}]
    by_model = {"reward": [{"reward": torch.tensor([1.0, 3.0])}]}
    ev = Evaluator(lambda b: b)
    # Ours: fn(samples, episode) -> metrics.
    ev.set_post_process_func(lambda results, episode: {"mean": sum(r["reward"] for r in results) / len(results)})
    assert ev.process_results(samples, by_model, 4, 9) == ({"mean": 2.0}, {"mean": 2.0})
    # 1.0.2: fn(results by model, eval_info); metrics via _metric_list.
    seen = []

    def post_1x(results, eval_info):
        seen.append((list(results), eval_info))
        ev._metric_list.append({"eval_reward_mean": results["reward"][0]["reward"].mean()})

    ev.set_post_process_func(post_1x)
    assert ev.process_results(samples, by_model, 4, 9)[0] == {"eval_reward_mean": 2.0}
    assert seen == [(["reward"], {"episode_iteration": 4, "train_iteration": 9})]

    # 1.0.3: subclass, override post_process; eval() returns what it returns.
    class PostProcess(Evaluator):
        def post_process(self, results, eval_info):
            self._metric_list.append({"n": len(results["reward"])})
            return "processed"

    assert PostProcess(lambda b: b).process_results(samples, by_model, 0, 0) == ({"n": 1.0}, "processed")
    # Neither: the number of samples, and the results by model.
    assert Evaluator(lambda b: b).process_results(samples, by_model, 0, 0) == ({"num_samples": 2.0}, by_model)
    assert Evaluator(lambda b: b).set_multiple_datasets([[1, 2], [3]]).prompts == [1, 2, 3]


# -- RL presets: the driver-side step is "auto" ----------------------------------------------
class LibraryStylePolicyTrainer(ToyTrainer):
    """Declares, like the library's PPO PolicyTrainer, that it trains on the driver's advantages."""
    needs_rollout_keys = ("advantages",)


def rlhf(policy_trainer_cls=ToyTrainer, **kwargs):
    return RLHFEngine(ToyPolicy("policy"), ToyReference("reference"), ToyReward("reward"), ToyValue("value"),
                      policy_trainer_cls("ppo_policy"), ToyTrainer("ppo_value"), **kwargs)


def test_rlhf_engine_passes_user_models_rollouts_through():
    chatlearn.init(CONFIG)
    engine = rlhf()
    assert engine.rollout_processor is None and not engine.driver_step.on
    assert "no trainer declares needs_rollout_keys" in engine.driver_step.why


def test_rlhf_engine_runs_the_ppo_step_for_roles_that_declare_it():
    chatlearn.init(CONFIG)
    engine = rlhf(LibraryStylePolicyTrainer)
    assert isinstance(engine.rollout_processor, CheckedStep) and engine.driver_step.on
    assert "ppo_policy declares needs_rollout_keys ['advantages']" in engine.driver_step.why
    # Explicit wins; turning the step off for a role that needs it is an error.
    assert rlhf(compute_advantages=True).driver_step.on
    with pytest.raises(ValueError, match="compute_advantages=False given to RLHFEngine, but ppo_policy trains on "
                                         r"\['advantages'\]"):
        rlhf(LibraryStylePolicyTrainer, compute_advantages=False)
    # The same switch in the policy trainer's model_config_file.
    chatlearn.get_args().models["ppo_policy"].args_dict["compute_advantages"] = True
    assert rlhf().driver_step.on and "toy_trainer.yaml" in rlhf().driver_step.why
    chatlearn.get_args().models["ppo_policy"].args_dict["compute_advantages"] = "sometimes"
    with pytest.raises(ValueError, match="compute_advantages: expected auto, true or false"):
        rlhf()


def test_rlhf_engine_auto_runs_the_ppo_step_for_the_library_roles():
    """The library's trainers (chatlearn.roles) declare what they train on from the driver's step."""
    from chatlearn import (GRPOTrainer, PolicyInference, PolicyReference, PolicyTrainer, RewardInference,
                           ValueInference, ValueTrainer)

    chatlearn.init(CONFIG)
    engine = RLHFEngine(PolicyInference("policy"), PolicyReference("reference"), RewardInference("reward"),
                        ValueInference("value"), PolicyTrainer("ppo_policy"), ValueTrainer("ppo_value"))
    assert engine.driver_step.on and isinstance(engine.rollout_processor, CheckedStep)
    assert "ppo_policy declares needs_rollout_keys ['advantages'], ppo_value declares needs_rollout_keys " \
           "['returns']" in engine.driver_step.why
    with pytest.raises(ValueError, match="GRPOEngine needs 'dynamic'"):  # GRPO's step is on: it needs dynamic
        chatlearn.GRPOEngine(PolicyInference("policy"), PolicyReference("reference"), RewardInference("reward"),
                             GRPOTrainer("ppo_policy"))


def test_partial_fit_names_the_missing_keys_and_the_switch():
    chatlearn.init(CONFIG)
    engine = rlhf(LibraryStylePolicyTrainer)
    t = torch.zeros(2, 3)
    with pytest.raises(RolloutKeysError) as info:
        engine.rollout_processor.process({"scores": torch.zeros(2), "loss_mask": t, "old_logprobs": t,
                                          "response": t}, 0)
    message = str(info.value)
    assert "needs rollout keys ['ref_logprobs', 'old_values']" in message
    assert "RLHFEngine(..., compute_advantages=False)" in message and "`compute_advantages: false` in" in message
    assert "ppo_policy declares needs_rollout_keys" in message  # why the step is on
    # With every key, the step runs.
    batch = {"scores": torch.ones(2), "loss_mask": torch.ones(2, 3), "old_logprobs": t, "ref_logprobs": t,
             "old_values": t}
    out, metrics = engine.rollout_processor.process(batch, 0)
    assert "advantages" in out and "returns/mean" in metrics


def test_grpo_and_online_dpo_engines_pass_user_models_through(monkeypatch):
    from chatlearn import GRPOEngine, OnlineDPOEngine

    chatlearn.init(CONFIG)  # stream_data_loader_type: fixed, policy n: 1
    roles = lambda: (ToyPolicy("policy"), ToyReference("reference"), ToyReward("reward"))  # noqa: E731
    assert GRPOEngine(*roles(), ToyTrainer("ppo_policy")).rollout_processor is None
    assert OnlineDPOEngine(*roles(), ToyTrainer("ppo_policy")).rollout_processor is None
    with pytest.raises(ValueError, match="GRPOEngine needs 'dynamic'"):
        GRPOEngine(*roles(), LibraryStylePolicyTrainer("ppo_policy"))

    class PairTrainer(ToyTrainer):
        needs_rollout_keys = ("chosen_input_ids", "rejected_input_ids")

    monkeypatch.setenv("loader_type", "dynamic")
    chatlearn.init(CONFIG)
    with pytest.raises(ValueError, match="online DPO samples 2 responses per prompt, got n=1"):
        OnlineDPOEngine(*roles(), PairTrainer("ppo_policy"))
    with pytest.raises(ValueError, match="GRPO needs n >= 2"):
        GRPOEngine(*roles(), LibraryStylePolicyTrainer("ppo_policy"))


# -- engines on Ray --------------------------------------------------------------------------
class EvalScorer(BaseModule):
    """A weightless rule reward whose 1.x flow method has no dispatch mode."""

    def score(self, data):
        return {"score": -((data["response"] - data["x"]) ** 2).mean(-1)}


def test_eval_engine_evaluates_alone(ray_session, toy_env):
    chatlearn.init(CONFIG)
    policy, scorer = ToyPolicy("policy"), EvalScorer("reward")

    def eval_flow(batch):
        return scorer.score(policy.eval_step(batch))  # 1.x tutorial's eval_step: defaults to eval_forward

    results = chatlearn.EvalEngine(eval_flow).set_dataset(make_prompts(6)).eval()
    assert list(results) == ["reward"] and [len(b["score"]) for b in results["reward"]] == [4, 2]


class MathTrainer(ToyTrainer):
    def train_step(self, data_list, iteration):
        assert {"reward", "reward1"} <= set(data_list[0]), sorted(data_list[0])  # both siblings merged
        return super().train_step(data_list, iteration)


class RuleReward(BaseModule):
    def forward_step(self, data, iteration):
        return {"reward1": data["x"].sum(-1)}

    def eval_forward(self, policy_res):
        return {"reward1": policy_res["response"].sum(-1)}


def test_grpo_math_engine_and_dpo_engine_run(ray_session, toy_env, monkeypatch):
    from chatlearn import DPOEngine, GRPOMathEngine

    monkeypatch.setenv("num_episode", "1")
    monkeypatch.setenv("eval_interval", "1")
    chatlearn.init(CONFIG)
    seen = []

    def post_process_1x(results, eval_info):  # ChatLearn 1.0.2's post-process function
        seen.append((sorted(results), eval_info))

    engine = GRPOMathEngine(ToyPolicy("policy"), ToyReference("reference"), ToyReward("reward"), RuleReward("value"),
                            MathTrainer("ppo_policy"))
    engine.evaluator.set_dataset(make_prompts(4, seed=1)).set_post_process_func(post_process_1x)
    (metrics,) = engine.set_dataset(make_prompts(40)).learn()
    assert metrics["train/steps"] == 2 and metrics["sync/ppo_policy->policy/count"] == 1
    assert seen == [(["reward", "value"], {"episode_iteration": -1, "train_iteration": 0}),
                    (["reward", "value"], {"episode_iteration": 0, "train_iteration": 2})]

    monkeypatch.setenv("max_relay_episode", "-1")
    monkeypatch.setenv("eval_interval", "0")
    chatlearn.init(CONFIG)
    reference = ToyReference("reference")
    evaluator = Evaluator(lambda batch: reference.eval_forward(batch)).set_dataset(make_prompts(3, seed=2))
    engine = DPOEngine(reference, ToyTrainer("ppo_policy"), evaluator=evaluator)
    peaks, evaluated = [], []

    def newest_episode(buffers):  # 1.0.3's RelaySampleManager is a callable like this one
        peaks.append(engine.logging_memory())
        evaluated.append(evaluator.eval())  # 1.x's Evaluator.eval, inside the running engine
        return buffers[-1].buffer

    (metrics,) = engine.set_relay_sample_manager(newest_episode).set_dataset(make_prompts(40)).learn()
    assert metrics["train/steps"] == 2 and not any(k.startswith("sync/") for k in metrics)
    assert sorted(peaks[0]) == ["ppo_policy", "reference"] and all(v > 0 for v in peaks[0]["reference"])
    assert list(evaluated[0]) == ["reference"] and len(evaluated[0]["reference"][0]["ref_response"]) == 3
