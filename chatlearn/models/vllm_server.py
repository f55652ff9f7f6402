"""vLLM as an OpenAI-compatible server process that a generation role drives over HTTP.

A generation role (``VLLMModule`` or a subclass) runs its engine in a server
process instead of inside its Ray actor when its model args say so:

    vllm_server: true                        # the role's actor starts the server on its devices
    vllm_server_url: http://127.0.0.1:8000   # or: use one already running there (`chatlearn serve`)

The role's code does not change: ``VLLMServerClient`` offers the part of
``vllm.LLM``'s interface the role uses, over HTTP:

* generation: one ``/v1/completions`` request per prompt (token ids in, token
  ids and sampled-token log-probs out), all of a batch's requests in flight at
  once, so the server batches them continuously;
* control: vLLM's development routes (the server runs with
  ``VLLM_SERVER_DEV_MODE=1``): ``/collective_rpc`` calls chatlearn's worker
  extension (weight loading, checksums, engine facts), ``/reset_prefix_cache``,
  ``/pause`` and ``/resume`` around a weight update, ``/sleep``/``/wake_up``;
* weight bytes: the synchronizer's ``/dev/shm`` buckets. Only their manifest
  crosses HTTP, so the server must run on the trainer's host.

vLLM's own weight-transfer routes (``/init_weight_transfer_engine``,
``/update_weights``; 0.32 under ``entrypoints/rl``, 0.26 under
``entrypoints/serve``) are not used: their transfer engines are NCCL and CUDA
IPC, and neither runs on a CPU machine.

Every server chatlearn starts requires a bearer token on every route but the
health checks (``chatlearn.models.server_auth``) and binds to localhost unless
told otherwise: vLLM's ``--api-key`` guards only the OpenAI routes, and the
development routes can replace the weights.
"""
from __future__ import annotations

import concurrent.futures
import ipaddress
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

from chatlearn.models.server_auth import SERVER_TOKEN_ENV

logger = logging.getLogger(__name__)

TOKEN_MIDDLEWARE = "chatlearn.models.server_auth.TokenMiddleware"
DEFAULT_HOST = "127.0.0.1"
START_TIMEOUT_S = 600.0
REQUEST_TIMEOUT_S = 3600.0

# SamplingParams keyword (as ``sampling_kwargs`` builds them) -> /v1/completions field.
# Output-format keys have no HTTP counterpart: the JSON answer has one format.
_REQUEST_FIELDS = ("n", "temperature", "top_p", "top_k", "min_p", "ignore_eos", "max_tokens", "min_tokens",
                   "logprobs", "prompt_logprobs", "include_stop_str_in_output", "stop", "stop_token_ids",
                   "skip_special_tokens", "seed", "repetition_penalty", "presence_penalty", "frequency_penalty")
_FORMAT_ONLY = ("flat_logprobs", "detokenize")


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or address) is this machine's loopback interface."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def url_host(url: str) -> str:
    from urllib.parse import urlparse

    return urlparse(url).hostname or ""


def server_url(host: str, port: int) -> str:
    """``http://host:port``, an IPv6 address in brackets."""
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}"


def free_port(host: str = DEFAULT_HOST) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def completion_request(prompt_ids: Sequence[int], params: Mapping[str, Any]) -> dict[str, Any]:
    """The ``/v1/completions`` body for one prompt sampled with ``params``
    (``vllm.SamplingParams`` keywords). A keyword with no request field is an error,
    never dropped."""
    unknown = set(params) - set(_REQUEST_FIELDS) - set(_FORMAT_ONLY)
    if unknown:
        raise ValueError(f"sampling settings {sorted(unknown)} cannot be sent to a vLLM server "
                         f"(known: {', '.join(_REQUEST_FIELDS)})")
    body = {k: v for k, v in params.items() if k in _REQUEST_FIELDS}
    body.update(prompt=[int(t) for t in prompt_ids], return_token_ids=True)
    return body


def server_command(engine_kwargs: Mapping[str, Any], host: str, port: int) -> list[str]:
    """The command line of a vLLM OpenAI server for ``vllm.LLM(**engine_kwargs)``'s engine,
    with chatlearn's worker extension and token middleware."""
    from chatlearn.synchronizer.vllm_worker_ext import WORKER_EXTENSION

    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--host", host, "--port", str(port),
           "--worker-extension-cls", WORKER_EXTENSION, "--middleware", TOKEN_MIDDLEWARE,
           "--disable-uvicorn-access-log"]
    for key, value in engine_kwargs.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            cmd.append(flag if value else "--no-" + key.replace("_", "-"))
        elif isinstance(value, (dict, list)):
            cmd += [flag, json.dumps(value)]
        elif value is not None:
            cmd += [flag, str(value)]
    return cmd


def server_env(token: str, base: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """The server's environment: the token, vLLM's development routes, and chatlearn importable
    (vLLM imports the worker extension and the middleware by name)."""
    env = dict(os.environ if base is None else base)
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
    env[SERVER_TOKEN_ENV] = token
    env["VLLM_SERVER_DEV_MODE"] = "1"
    # The server's engine core runs in its own process (an async engine needs that); an actor
    # that set the in-process default for its own engine must not pass it on.
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
    return env


class ServerProcess:
    """A vLLM server this process started, in its own process group; its log goes to
    ``log_path``, or to this process's output when None (``chatlearn serve``)."""

    def __init__(self, command: Sequence[str], env: Mapping[str, str], log_path: Optional[str]):
        self.log_path = log_path
        self._log = None
        if log_path is not None:
            os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
            self._log = open(log_path, "ab")
        self.popen = subprocess.Popen(list(command), env=dict(env), stdout=self._log,
                                      stderr=subprocess.STDOUT if self._log else None, start_new_session=True)

    def log_tail(self, chars: int = 4000) -> str:
        if self.log_path is None:
            return "(above)"
        try:
            with open(self.log_path, "rb") as f:
                f.seek(max(0, os.path.getsize(self.log_path) - chars))
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, grace_s: float = 30.0) -> None:
        """SIGTERM to the whole group (the API server, its engine core and workers), then SIGKILL."""
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, signal.SIGTERM)
                self.popen.wait(grace_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait()
            except ProcessLookupError:
                pass
        if self._log is not None:
            self._log.close()


@dataclass
class _HFConfig:
    tie_word_embeddings: bool


@dataclass
class ServedModelConfig:
    """The fields of ``vllm.config.ModelConfig`` the role reads, as the server reports them."""

    model: str
    max_model_len: int
    vocab_size: int
    logprobs_mode: str
    hf_config: _HFConfig
    generation_config: dict[str, Any] = field(default_factory=dict)

    def get_vocab_size(self) -> int:
        return self.vocab_size

    def try_get_generation_config(self) -> dict[str, Any]:
        return dict(self.generation_config)


@dataclass
class _Engine:
    model_config: ServedModelConfig


class _FlatLogprobs:
    """The sampled token's log-prob at each position (vLLM's flat container, as the role reads it)."""

    def __init__(self, token_ids: list[int], logprobs: list[float]):
        self.token_ids, self.logprobs = token_ids, logprobs

    def __len__(self) -> int:
        return len(self.logprobs)


@dataclass
class _Logprob:
    logprob: float


@dataclass
class _Completion:
    token_ids: list[int]
    logprobs: _FlatLogprobs
    text: str
    finish_reason: Optional[str]


@dataclass
class _RequestOutput:
    prompt_token_ids: list[int]
    prompt_logprobs: Optional[list[Optional[dict[int, _Logprob]]]]
    outputs: list[_Completion]


def parse_completion(prompt_ids: Sequence[int], answer: Mapping[str, Any]) -> _RequestOutput:
    """A ``/v1/completions`` answer (``return_token_ids``, ``logprobs: 0``) as a vLLM RequestOutput."""
    choices = sorted(answer["choices"], key=lambda c: c["index"])
    outputs = []
    for choice in choices:
        token_ids = [int(t) for t in choice["token_ids"]]
        logprobs = (choice.get("logprobs") or {}).get("token_logprobs") or []
        outputs.append(_Completion(token_ids, _FlatLogprobs(token_ids, [float(x) for x in logprobs]),
                                   choice.get("text", ""), choice.get("finish_reason")))
    prompt_logprobs = None
    raw = choices[0].get("prompt_logprobs") if choices else None
    if raw is not None:
        prompt_logprobs = [None if step is None else {int(k): _Logprob(float(v["logprob"])) for k, v in step.items()}
                           for step in raw]
    return _RequestOutput(list(prompt_ids), prompt_logprobs, outputs)


class VLLMServerClient:
    """A running vLLM server, driven like an in-process ``vllm.LLM``.

    ``process`` is the server when this client started it (``start``): ``shutdown`` stops it.
    """

    def __init__(self, url: str, token: str, tokenizer_dir: str, *, process: Optional[ServerProcess] = None,
                 max_in_flight: int = 256):
        import requests

        self.url = url.rstrip("/")
        self.process = process
        self._session = requests.Session()
        self._session.headers["Authorization"] = f"Bearer {token}"
        adapter = requests.adapters.HTTPAdapter(pool_maxsize=max_in_flight)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)
        self._pool = concurrent.futures.ThreadPoolExecutor(max_in_flight, thread_name_prefix="vllm-http")
        info = self.engine_info = self.collective_rpc("chatlearn_engine_info")[0]
        self.llm_engine = _Engine(ServedModelConfig(
            model=info["model"], max_model_len=info["max_model_len"], vocab_size=info["vocab_size"],
            logprobs_mode=info["logprobs_mode"], hf_config=_HFConfig(info["tie_word_embeddings"]),
            generation_config=info["generation_config"]))
        from transformers import AutoTokenizer

        self._tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)

    # -- starting ------------------------------------------------------------------
    @classmethod
    def start(cls, engine_kwargs: Mapping[str, Any], *, host: str = DEFAULT_HOST, port: int = 0,
              log_path: str, token: Optional[str] = None,
              timeout_s: float = START_TIMEOUT_S) -> "VLLMServerClient":
        """Start a server for ``engine_kwargs`` (``vllm.LLM`` keywords) and wait until it answers."""
        token = token or secrets.token_urlsafe(32)
        port = port or free_port(host)
        process = ServerProcess(server_command(engine_kwargs, host, port), server_env(token), log_path)
        url = server_url(host, port)
        try:
            wait_until_healthy(url, timeout_s, process)
            return cls(url, token, str(engine_kwargs.get("tokenizer") or engine_kwargs["model"]), process=process)
        except BaseException:
            process.stop()
            raise

    # -- the part of vllm.LLM the role uses ----------------------------------------------
    def get_tokenizer(self) -> Any:
        return self._tokenizer

    def generate(self, prompts: Sequence[Mapping[str, Any]], params: Sequence[Mapping[str, Any]],
                 use_tqdm: bool = False) -> list[_RequestOutput]:
        """One request per prompt, all in flight at once; answers in prompt order."""
        if len(prompts) != len(params):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling settings")
        bodies = [completion_request(p["prompt_token_ids"], kw) for p, kw in zip(prompts, params)]
        answers = list(self._pool.map(lambda body: self._post("/v1/completions", body), bodies))
        return [parse_completion(p["prompt_token_ids"], a) for p, a in zip(prompts, answers)]

    def collective_rpc(self, method: str, args: Sequence[Any] = ()) -> list[Any]:
        """Call a worker-extension method on every worker (arguments and results as JSON)."""
        if not isinstance(method, str):
            raise TypeError("a vLLM server can only call worker methods by name")
        return self._post("/collective_rpc", {"method": method, "args": list(args)})["results"]

    def reset_prefix_cache(self) -> bool:
        return bool(self._post("/reset_prefix_cache", None).get("success", True))

    def pause(self) -> None:
        """Let the requests in flight finish and hold new ones (another client may be generating)."""
        self._post("/pause?mode=wait", None)

    def resume(self) -> None:
        self._post("/resume", None)

    def sleep(self, level: int = 1) -> None:
        self._post(f"/sleep?level={int(level)}", None)

    def wake_up(self) -> None:
        self._post("/wake_up", None)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._session.close()
        if self.process is not None:
            self.process.stop()

    def _post(self, path: str, body: Optional[Mapping[str, Any]]) -> dict[str, Any]:
        import requests

        try:
            answer = self._session.post(self.url + path, json=body, timeout=REQUEST_TIMEOUT_S)
        except requests.ConnectionError as e:
            raise RuntimeError(f"vLLM server {self.url} is unreachable ({path}): {e}"
                               f"{self._log_hint()}") from None
        if answer.status_code == 401:
            raise RuntimeError(f"vLLM server {self.url} refused the token for {path}: set {SERVER_TOKEN_ENV} to "
                               f"the token the server was started with")
        if answer.status_code != 200:
            raise RuntimeError(f"vLLM server {self.url}: {path} answered {answer.status_code}: "
                               f"{answer.text[:2000]}{self._log_hint()}")
        return answer.json() if answer.content else {}

    def _log_hint(self) -> str:
        if self.process is None:
            return ""
        return f"\n(server log {self.process.log_path}, last lines:)\n{self.process.log_tail(2000)}"


def wait_until_healthy(url: str, timeout_s: float, process: Optional[ServerProcess] = None) -> None:
    """Poll ``/health`` until it answers 200; fail early if ``process`` exits."""
    import requests

    deadline = time.monotonic() + timeout_s
    while True:
        if process is not None and not process.alive():
            raise RuntimeError(f"the vLLM server for {url} exited with code {process.popen.returncode} while "
                               f"starting; its log ({process.log_path}) ends with:\n{process.log_tail()}")
        try:
            if requests.get(url + "/health", timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            tail = f"; its log ({process.log_path}) ends with:\n{process.log_tail()}" if process else ""
            raise TimeoutError(f"the vLLM server at {url} did not answer /health within {timeout_s:.0f} s{tail}")
        time.sleep(0.5)
