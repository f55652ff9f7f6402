"""A one-actor replica over several GPUs (vLLM with tensor_model_parallel_size > 1) sees all of them.

Ray shows an actor only the GPU of its own bundle; start-up asks which GPU each bundle is
(``startup.bundle_gpu_ids``) and ``DistModel.create_workers`` gives the replica's actor
``CUDA_VISIBLE_DEVICES`` for every bundle of the replica. Checked on real Ray with logical
GPUs (``ray.init(num_gpus=4)``: Ray assigns GPU ids to bundles without any CUDA), in a
process of its own so that the suite's CPU-only Ray session is not disturbed.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r"""
import json, os
import ray
from ray.util.placement_group import placement_group

from chatlearn.config.schema import ChatLearnConfig
from chatlearn.models.base import BaseModule
from chatlearn.runtime.calls import CallTracker
from chatlearn.runtime.dist_model import DistModel
from chatlearn.runtime.startup import bundle_gpu_ids


class Engine(BaseModule):
    one_actor_per_replica = True


ray.init(num_cpus=2, num_gpus=4, include_dashboard=False, log_to_driver=False)
pg = placement_group([{"GPU": 1} for _ in range(4)], strategy="PACK")
assert pg.wait(timeout_seconds=60)
gpus = bundle_gpu_ids(pg, range(4))
result = {"bundle_gpus": gpus}
d = DistModel(module=Engine("policy"), tp=2, pp=1, num_devices=4, bundles=[0, 1, 2, 3], share=[1.0] * 4,
              resource="GPU", trainable=False, tracker=CallTracker(60))
try:
    d.create_workers(pg, ChatLearnConfig(), {})
except ValueError as e:
    result["without_ids"] = str(e)
d.create_workers(pg, ChatLearnConfig(), {}, gpus)
result["actors"] = len(d.workers)
result["visible"] = ray.get([w.actor.__ray_call__.remote(lambda worker: os.environ["CUDA_VISIBLE_DEVICES"])
                             for w in d.workers])
d.kill()
ray.shutdown()
print("RESULT " + json.dumps(result))
"""


def test_each_replica_actor_sees_the_gpus_of_all_its_bundles():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    run = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    result = json.loads(next(line for line in run.stdout.splitlines() if line.startswith("RESULT "))[7:])
    gpus = {int(b): g for b, g in result["bundle_gpus"].items()}
    assert sorted(gpus.values()) == ["0", "1", "2", "3"]  # every bundle is a GPU of its own
    assert "needs the GPU id of each bundle" in result["without_ids"]
    # Two replicas of TP 2: one actor each, seeing its two bundles' GPUs in rank order.
    assert result["actors"] == 2
    assert result["visible"] == [f"{gpus[0]},{gpus[1]}", f"{gpus[2]},{gpus[3]}"]
