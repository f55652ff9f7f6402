"""vLLM as a server process the engine drives (chatlearn/models/vllm_server.py, `chatlearn serve`).

Fast tests: the token middleware on raw ASGI calls, the request and command-line mapping (the
command line parsed by vLLM's own parser), the config checks. Slow tests: real servers on the
tiny PPO run, one started by `chatlearn serve` and reused by two runs, one started by the
policy's actor; after each run the server's greedy output equals transformers' on the
exported weights.
"""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import pytest

from chatlearn.models import server_auth
from chatlearn.models.server_auth import SERVER_TOKEN_ENV, TokenMiddleware
from chatlearn.models.vllm_module import engine_kwargs, sampling_kwargs
from chatlearn.models.vllm_server import completion_request, free_port, is_loopback, server_command
from test_resume import tiny  # noqa: F401 (a fixture: the tiny PPO run's policy, reward model and prompts)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples", "megatron")
CONFIG = os.path.join(EXAMPLES, "configs", "tiny", "rlhf.yaml")


# ---------------------------------------------------------------- the token
def _call(app, path: str, headers: dict[str, str] | None = None, method: str = "POST") -> int:
    """Status of one HTTP request through ``app`` (a raw ASGI call, no server)."""
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "root_path": "",
             "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]}
    asyncio.run(app(scope, receive, send))
    return next(m["status"] for m in sent if m["type"] == "http.response.start")


async def _ok_app(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


def test_every_route_but_health_needs_the_token(monkeypatch):
    monkeypatch.setenv(SERVER_TOKEN_ENV, "s3cret")
    app = TokenMiddleware(_ok_app)
    for path in ("/collective_rpc", "/reset_prefix_cache", "/update_weights", "/pause", "/v1/completions",
                 "/v1/models", "/sleep"):
        assert _call(app, path) == 401, path
        assert _call(app, path, {"Authorization": "Bearer wrong"}) == 401, path
        assert _call(app, path, {"Authorization": "Basic s3cret"}) == 401, path
        assert _call(app, path, {"Authorization": "Bearer s3cret"}) == 200, path
    assert _call(app, "/health", method="GET") == 200
    assert _call(app, "/collective_rpc", method="OPTIONS") == 200  # CORS preflight carries no token


def test_a_server_without_a_token_refuses_to_start(monkeypatch):
    monkeypatch.delenv(SERVER_TOKEN_ENV, raising=False)
    with pytest.raises(RuntimeError, match=SERVER_TOKEN_ENV):
        TokenMiddleware(_ok_app)
    assert not server_auth.bearer_matches("Bearer ", "")


@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("localhost", True), ("::1", True),
                                             ("127.0.0.5", True), ("0.0.0.0", False), ("10.1.2.3", False),
                                             ("myhost", False)])
def test_loopback_hosts(host, loopback):
    assert is_loopback(host) is loopback


# ---------------------------------------------------------------- requests and the command line
@pytest.mark.parametrize("args", [
    {},
    {"stop_token_list": "</s>;END", "prompt_logprobs": 0, "sampling_seed": 3, "ignore_eos": True},
    {"skip_special_tokens": False, "n": 4, "top_k": 5, "top_p": 0.9, "temperature": 0.7},
])
def test_every_sampling_setting_becomes_a_request_field(args):
    kwargs = sampling_kwargs({"max_new_tokens": 7, "new_token_limit": True, **args}, prompt_len=3,
                             max_model_len=64, special_token_ids={"</s>": 2})
    body = completion_request([1, 2, 3], kwargs)
    assert body["prompt"] == [1, 2, 3] and body["return_token_ids"] is True
    for key, value in kwargs.items():
        if key not in ("flat_logprobs", "detokenize"):  # output format only: JSON has one
            assert body[key] == value, key
    with pytest.raises(ValueError, match="logits_processors"):
        completion_request([1], {**kwargs, "logits_processors": []})


def test_server_command_parses_with_vllms_own_parser():
    try:
        from vllm.entrypoints.launchers.cli_args import make_arg_parser  # 0.32
    except ImportError:
        from vllm.entrypoints.openai.cli_args import make_arg_parser  # 0.26 (the GPU pin)
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    kwargs = engine_kwargs({"load": "/models/tiny", "max_model_len": 64, "kv_cache_memory_bytes": 2**25,
                            "attention_backend": "TRITON_ATTN", "enable_prefix_caching": False},
                           tensor_parallel_size=2, seed=7)
    cmd = server_command(kwargs, "127.0.0.1", 8123)
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    parsed = make_arg_parser(FlexibleArgumentParser()).parse_args(cmd[3:])
    assert (parsed.model, parsed.host, parsed.port) == ("/models/tiny", "127.0.0.1", 8123)
    assert parsed.middleware == ["chatlearn.models.server_auth.TokenMiddleware"]
    assert parsed.worker_extension_cls == "chatlearn.synchronizer.vllm_worker_ext.ChatLearnWorkerExtension"
    assert parsed.tensor_parallel_size == 2 and parsed.seed == 7 and parsed.max_model_len == 64
    assert parsed.kv_cache_memory_bytes == 2**25 and parsed.enforce_eager is True
    assert parsed.enable_prefix_caching is False and parsed.logprobs_mode == "processed_logprobs"
    assert parsed.dtype == "float32" and parsed.distributed_executor_backend == "mp"
    attention = parsed.attention_config
    assert (attention["backend"] if isinstance(attention, dict) else attention.backend.name) == "TRITON_ATTN"


# ---------------------------------------------------------------- config checks
def _config_issues(tmp_path, policy_args: str, monkeypatch, token: str | None = None) -> list[str]:
    from chatlearn.config.errors import ConfigError
    from chatlearn.config.loader import load_config

    if token is None:
        monkeypatch.delenv(SERVER_TOKEN_ENV, raising=False)
    else:
        monkeypatch.setenv(SERVER_TOKEN_ENV, token)
    (tmp_path / "policy.yaml").write_text("load: /models/tiny\n" + policy_args)
    (tmp_path / "run.yaml").write_text("models:\n  policy:\n    model_config_file: policy.yaml\n    num_cpu: 1\n"
                                       "runtime:\n  data_path: /dev/null\n")
    try:
        load_config(str(tmp_path / "run.yaml"))
    except ConfigError as e:
        return [str(i) for i in e.issues]
    return []


def test_config_refuses_a_server_beyond_localhost_without_the_token(tmp_path, monkeypatch):
    issues = _config_issues(tmp_path, "vllm_server_url: http://10.0.0.8:8000\n", monkeypatch)
    assert len(issues) == 1 and "vllm_server_url" in issues[0] and SERVER_TOKEN_ENV in issues[0]
    assert "policy.yaml" in issues[0]
    issues = _config_issues(tmp_path, "vllm_server: true\nvllm_server_host: 0.0.0.0\n", monkeypatch)
    assert len(issues) == 1 and "vllm_server_host" in issues[0]
    assert _config_issues(tmp_path, "vllm_server: true\nvllm_server_host: 0.0.0.0\n", monkeypatch, "t") == []
    assert _config_issues(tmp_path, "vllm_server_url: http://127.0.0.1:8000\n", monkeypatch) == []


def test_config_refuses_both_ways_and_a_bad_url(tmp_path, monkeypatch):
    issues = _config_issues(tmp_path, "vllm_server: true\nvllm_server_url: http://127.0.0.1:1\n", monkeypatch)
    assert len(issues) == 1 and "got both" in issues[0]
    issues = _config_issues(tmp_path, "vllm_server_url: 127.0.0.1:8000\n", monkeypatch)
    assert len(issues) == 1 and "http://" in issues[0]
    issues = _config_issues(tmp_path, "vllm_server: maybe\n", monkeypatch)
    assert len(issues) == 1 and "vllm_server" in issues[0]


def test_serve_refuses_a_public_host_without_a_token_before_starting_anything(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != SERVER_TOKEN_ENV}
    env.update(policy_load="/models/tiny", reward_load="/models/tiny", data_path="/dev/null")
    done = subprocess.run([sys.executable, "-m", "chatlearn.cli", "serve", CONFIG, "--host", "0.0.0.0"],
                          env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 2 and SERVER_TOKEN_ENV in done.stderr and "0.0.0.0" in done.stderr
    done = subprocess.run([sys.executable, "-m", "chatlearn.cli", "serve", CONFIG, "--model", "critic"],
                          env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 2 and "no model 'critic'" in done.stderr


# ---------------------------------------------------------------- real servers (slow)
def _env(tiny, out, **knobs) -> dict[str, str]:
    env = {**os.environ, "policy_load": tiny["policy_load"], "reward_load": tiny["reward_load"],
           "data_path": tiny["data_path"], "eval_data_path": tiny["eval_data_path"], "output_dir": str(out),
           "exp_name": "ppo", "sample_per_episode": "16", "generation_batch_size": "8",
           "train_micro_batch_size": "4", "train_global_batch_size": "8", "save_episode_interval": "1",
           "eval_episode_interval": "0", "policy_lr_warmup_steps": "0", "validate_param_sync": "True"}
    env.update({k: str(v) for k, v in knobs.items()})
    return env


def _train(env) -> str:
    done = subprocess.run([sys.executable, os.path.join(EXAMPLES, "train_rlhf.py"), "-c", CONFIG], env=env,
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    os.makedirs(env["output_dir"], exist_ok=True)
    with open(os.path.join(env["output_dir"], "driver.log"), "a") as f:
        f.write(done.stdout + done.stderr)
    assert done.returncode == 0, done.stderr[-5000:]
    return done.stdout + done.stderr


def _greedy_matches_transformers(url: str, token: str, hf_dir: str, prompts: list[list[int]]) -> None:
    import requests
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    for prompt in prompts:
        answer = requests.post(f"{url}/v1/completions", headers={"Authorization": f"Bearer {token}"},
                               json={"prompt": prompt, "max_tokens": 6, "temperature": 0.0, "ignore_eos": True,
                                     "return_token_ids": True}, timeout=120)
        assert answer.status_code == 200, answer.text
        served = answer.json()["choices"][0]["token_ids"]
        with torch.no_grad():
            expected = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False,
                                      min_new_tokens=6)[0, len(prompt):].tolist()
        assert served == expected, (prompt, served, expected)


def _assert_every_sync_validated(run_dir, episodes: int) -> None:
    """validate_param_sync compared the server's weights (checksums) and its log-probs (probe)
    with the trainer's after every episode's sync; a mismatch would have failed the run."""
    from chatlearn.utils.metrics import read_metrics

    records = [r for r in read_metrics(str(run_dir / "metrics.jsonl")) if "reward/mean" in r]
    validated = [r for r in records if any(k.startswith("sync/ppo_policy->policy/validate_") for k in r)]
    assert len(validated) == episodes == len(records), [sorted(r) for r in records]


def _requests_served(url: str, token: str) -> float:
    """The server's count of finished requests (vLLM's Prometheus /metrics)."""
    import requests

    text = requests.get(f"{url}/metrics", headers={"Authorization": f"Bearer {token}"}, timeout=30).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("vllm:request_success_total"))


def _server_pids(log_text: str) -> set[int]:
    import re

    return {int(p) for p in re.findall(r"\((?:APIServer|EngineCore\w*) pid=(\d+)\)", log_text)}


def _server_holds_exported_weights(url: str, token: str, hf_dir: str) -> None:
    """The server's weights, read back through /collective_rpc, are the exported checkpoint's."""
    import requests
    from safetensors.torch import load_file

    from chatlearn.synchronizer import checksums, vllm_sync

    def rpc(method, *args):
        answer = requests.post(f"{url}/collective_rpc", headers={"Authorization": f"Bearer {token}"},
                               json={"method": method, "args": list(args)}, timeout=120)
        assert answer.status_code == 200, answer.text
        return answer.json()["results"]

    tied = rpc("chatlearn_engine_info")[0]["tie_word_embeddings"]
    served = vllm_sync.merge_shard_checksums(rpc("chatlearn_shard_checksums", tied))
    exported = checksums.state_records(load_file(os.path.join(hf_dir, "model.safetensors")))
    assert set(served) - {"lm_head.weight"} <= set(exported) and len(served) >= len(exported) - 1
    for name, record in served.items():
        expected = exported.get(name, exported.get("model.embed_tokens.weight"))
        assert checksums.close(expected, record), (name, checksums.mismatch(expected, record))


@pytest.mark.slow
def test_a_server_started_separately_serves_two_runs_and_follows_each_sync(tiny):
    import requests

    from chatlearn.models.vllm_server import wait_until_healthy

    port, token = free_port(), "test-token-1"
    env = _env(tiny, tiny["root"] / "separate", **{SERVER_TOKEN_ENV: token})
    server = subprocess.Popen([sys.executable, "-m", "chatlearn.cli", "serve", CONFIG, "--port", str(port)],
                              env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, 600)
        assert requests.post(f"{url}/collective_rpc", json={"method": "chatlearn_engine_info"}).status_code == 401
        prompts = [[1, 5, 9, 12], [1, 40, 41, 42, 43, 44]]
        for episodes in (1, 2):  # the second run resumes the first, on the same server
            served_before = _requests_served(url, token)
            _train({**env, "num_episode": str(episodes), "vllm_server_url": url})
            # 16 prompts per episode, and the sync's validation probe: all through this server.
            assert _requests_served(url, token) >= served_before + 16, "the run did not generate on the server"
            _assert_every_sync_validated(tiny["root"] / "separate" / "ppo", episodes)
            exported = str(tiny["root"] / "separate" / "ppo" / "hf_ppo_policy")
            _server_holds_exported_weights(url, token, exported)
            _greedy_matches_transformers(url, token, exported, prompts)
        assert server.poll() is None, "the runs must leave a server they did not start running"
    finally:
        os.killpg(server.pid, signal.SIGINT)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)


@pytest.mark.slow
def test_a_server_started_by_the_policy_actor_serves_a_run_and_stops_with_it(tiny):
    out = tiny["root"] / "started"
    # The weights travel by the collective transport here (a gloo group of the trainer and the
    # server's worker, joined through the server's /collective_rpc), by /dev/shm in the test above.
    _train(_env(tiny, out, num_episode=2, vllm_server="True", param_sync_transport="collective"))
    _assert_every_sync_validated(out / "ppo", 2)
    from chatlearn.utils.metrics import read_metrics

    synced = [r for r in read_metrics(str(out / "ppo" / "metrics.jsonl")) if "reward/mean" in r]
    assert all(r["sync/ppo_policy->policy/transport_collective"] == 1 for r in synced)
    server_log = (out / "ppo" / "vllm_server_policy_0.log").read_text()  # in the run directory
    assert "Application startup complete" in server_log
    pids = _server_pids(server_log)
    assert pids, "the server's log (in the run directory) names its processes"
    time.sleep(2)
    assert not [p for p in pids if os.path.exists(f"/proc/{p}")], "the server outlived the run"
