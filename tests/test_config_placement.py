"""The placement plan: replicas, data parallel, colocation, device kinds."""
from __future__ import annotations

import pytest

from chatlearn.config.placement import detect_device, format_placement, plan_placement
from chatlearn.config.schema import ChatLearnConfig, ModelConfig, RuntimeConfig


def config(models: dict, colocation=()) -> ChatLearnConfig:
    return ChatLearnConfig(models={name: ModelConfig(name=name, **kw) for name, kw in models.items()},
                           runtime=RuntimeConfig(colocation=list(colocation)))


def test_replicas_and_data_parallel():
    cfg = config({
        "policy": dict(num_gpu=8, tensor_model_parallel_size=2, pipeline_model_parallel_size=2),
        "ppo_policy": dict(num_gpu=8, tensor_model_parallel_size=2, trainable=True),
    })
    plan = plan_placement(cfg, "gpu")
    policy, ppo = plan.models["policy"], plan.models["ppo_policy"]
    assert (policy.num_devices, policy.tp, policy.pp, policy.num_replicas, policy.dp_size) == (8, 2, 2, 2, 1)
    assert policy.replica_slots(0) == (0, 1, 2, 3) and policy.replica_slots(1) == (4, 5, 6, 7)
    assert policy.ranks_per_replica == 4
    assert (ppo.num_replicas, ppo.dp_size, ppo.ranks_per_replica) == (1, 4, 8)
    assert ppo.slots == tuple(range(8, 16))  # not colocated: slots of its own
    assert plan.total_slots == 16 and plan.num_slots == {"gpu": 16}
    assert plan.warnings == ()


def test_colocation_shares_slots():
    cfg = config({
        "policy": dict(num_cpu=2),
        "reference": dict(num_cpu=1),
        "ppo_policy": dict(num_cpu=2, trainable=True),
        "reward": dict(num_cpu=1),
        "value": dict(num_cpu=1),
        "ppo_value": dict(num_cpu=1, trainable=True),
    }, colocation=["policy,ppo_policy", "value,ppo_value,reward"])
    plan = plan_placement(cfg, "cpu")
    slots = {name: mp.slots for name, mp in plan.models.items()}
    assert slots == {"policy": (0, 1), "ppo_policy": (0, 1), "reference": (2,),
                     "reward": (3,), "value": (3,), "ppo_value": (3,)}
    assert plan.total_slots == 4
    assert plan.models["policy"].colocation_group == ("policy", "ppo_policy")
    assert plan.models["reference"].colocation_group == ()
    assert plan.colocation_groups == (("policy", "ppo_policy"), ("value", "ppo_value", "reward"))
    assert plan.slot_share() == {0: 2, 1: 2, 2: 1, 3: 3}
    assert plan.models["policy"].num_replicas == 2 and plan.models["ppo_policy"].dp_size == 2


def test_group_takes_its_largest_member():
    cfg = config({"a": dict(num_cpu=1), "b": dict(num_cpu=3), "c": dict(num_cpu=1)}, colocation=["a,b"])
    plan = plan_placement(cfg, "cpu")
    assert plan.models["a"].slots == (0,) and plan.models["b"].slots == (0, 1, 2)
    assert plan.models["c"].slots == (3,) and plan.total_slots == 4


def test_gpu_per_process():
    cfg = config({"policy": dict(num_gpu=4, tensor_model_parallel_size=2, gpu_per_process=2)})
    mp = plan_placement(cfg, "gpu").models["policy"]
    assert (mp.num_replicas, mp.num_processes, mp.devices_per_process) == (2, 2, 2)
    assert mp.rank_slots == ((0, 1), (2, 3))
    # On CPU each slot is one process, whatever gpu_per_process says.
    assert plan_placement(cfg, "cpu").models["policy"].num_processes == 4


def test_cpu_run_falls_back_to_num_gpu_with_a_warning():
    cfg = config({"policy": dict(num_gpu=2), "reward": dict(num_gpu=4, num_cpu=1)})
    plan = plan_placement(cfg, "cpu")
    assert plan.models["policy"].num_devices == 2 and plan.models["policy"].device_key == "num_gpu"
    assert plan.models["reward"].num_devices == 1 and plan.models["reward"].device_key == "num_cpu"
    assert plan.warnings == ("model 'policy' sets num_gpu=2 but no num_cpu: this CPU run gives it 2 CPU slots",)


def test_gpu_run_with_a_cpu_only_model():
    cfg = config({"policy": dict(num_gpu=2), "rule_reward": dict(num_cpu=1)})
    plan = plan_placement(cfg, "gpu")
    assert plan.models["rule_reward"].device == "cpu" and plan.models["rule_reward"].slots == (0,)
    assert plan.models["policy"].device == "gpu" and plan.models["policy"].slots == (0, 1)
    assert plan.num_slots == {"cpu": 1, "gpu": 2} and plan.total_slots == 2
    assert plan.slot_share("cpu") == {0: 1}
    assert "rule_reward" in plan.warnings[0]


def test_detect_device():
    cpu_cfg = config({"policy": dict(num_cpu=1)})
    gpu_cfg = config({"policy": dict(num_gpu=1, num_cpu=1)})
    assert detect_device(cpu_cfg, gpu_available=True) == "cpu"
    assert detect_device(gpu_cfg, gpu_available=True) == "gpu"
    assert detect_device(gpu_cfg, gpu_available=False) == "cpu"
    with pytest.raises(ValueError):
        plan_placement(cpu_cfg, "tpu")


def test_format_placement_table():
    cfg = config({"policy": dict(num_cpu=2), "ppo_policy": dict(num_cpu=2, trainable=True)},
                 colocation=["policy,ppo_policy"])
    table = format_placement(plan_placement(cfg, "cpu")).splitlines()
    assert table[0].split() == ["model", "device", "devices", "TP", "PP", "replicas/DP", "slots", "colocation"]
    assert table[2].split() == ["policy", "cpu", "2", "(num_cpu)", "1", "1", "2", "0-1", "policy,ppo_policy"]
    assert table[3].split() == ["ppo_policy", "cpu", "2", "(num_cpu)", "1", "1", "1", "(DP", "2)", "0-1",
                                "policy,ppo_policy"]
    assert table[-1] == "device: cpu; total: 2 cpu slots"
