"""The ``chatlearn`` command.

    chatlearn validate CONFIG [key.path=value ...] [--device auto|cpu|gpu]

prints the resolved config (YAML) and the placement plan, or every problem of
the config and exit code 2. It imports no torch, Ray or vLLM, so it answers in
a fraction of a second.

    chatlearn serve CONFIG [key.path=value ...] [--model policy] [--host 127.0.0.1] [--port 8000]

runs a config's generation model as a vLLM OpenAI-compatible server, with the
control routes a run drives (weight updates, cache resets) behind a token
(docs/vllm.md, "vLLM as a server"). A run uses it with ``vllm_server_url`` in
that model's config file and the token in ``CHATLEARN_SERVER_TOKEN``.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

EXIT_OK = 0
EXIT_CONFIG_ERROR = 2  # also argparse's code for a bad command line


def _validate(args: argparse.Namespace) -> int:
    import yaml

    from chatlearn.config.errors import ConfigError, display_path
    from chatlearn.config.loader import config_to_dict, load_config
    from chatlearn.config.placement import detect_device, format_placement, plan_placement, probe_gpu

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        count = len(e.issues)
        print(f"chatlearn validate: {count} problem{'s' if count != 1 else ''} in {args.config}:", file=sys.stderr)
        for issue in e.issues:
            print(f"  {issue}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    if args.device == "auto":
        device = detect_device(cfg, gpu_available=probe_gpu())
    else:
        device = args.device
    print(f"# resolved config: {display_path(cfg.config_path)}")
    print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False), end="")
    print()
    print(f"# placement plan ({device} run)")
    print(format_placement(plan_placement(cfg, device)))
    return EXIT_OK


def _serve(args: argparse.Namespace) -> int:
    import os
    import secrets

    from chatlearn.config.errors import ConfigError
    from chatlearn.config.loader import load_config
    from chatlearn.config.placement import probe_gpu
    from chatlearn.models.server_auth import SERVER_TOKEN_ENV
    from chatlearn.models.vllm_server import (ServerProcess, is_loopback, server_command, server_env,
                                              server_url, wait_until_healthy, START_TIMEOUT_S)

    def fail(message: str) -> int:
        print(f"chatlearn serve: {message}", file=sys.stderr)
        return EXIT_CONFIG_ERROR

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        return fail(f"{len(e.issues)} problem(s) in {args.config}:\n" + "\n".join(f"  {i}" for i in e.issues))
    if args.model not in cfg.models:
        return fail(f"{args.config} has no model {args.model!r} (models: {', '.join(cfg.models)}); pick one "
                    f"with --model")
    model = cfg.models[args.model]
    if not (model.args_dict.get("load") or model.args_dict.get("model")):
        return fail(f"model {args.model!r} of {args.config}: its model_config_file gives no `load` (the HF "
                    f"model directory to serve)")
    token = os.environ.get(SERVER_TOKEN_ENV, "")
    if not is_loopback(args.host) and not token:
        return fail(f"--host {args.host} is beyond localhost: set {SERVER_TOKEN_ENV} first (the server's control "
                    f"routes can replace the weights, so every route requires the token)")
    generated = not token
    token = token or secrets.token_urlsafe(32)

    from chatlearn.models.vllm_module import engine_kwargs
    from chatlearn.utils.vllm_env import configure_vllm_cpu_env

    on_gpu = probe_gpu()
    args_dict = model.args_dict
    configure_vllm_cpu_env(kv_cache_gib=None if args_dict.get("kv_cache_memory_bytes") is not None else 1,
                           in_process=False)
    try:
        kwargs = engine_kwargs(args_dict, tensor_parallel_size=model.tensor_model_parallel_size, on_gpu=on_gpu,
                               seed=int(cfg.runtime.seed), name=args.model, log_warnings=True)
    except ValueError as e:
        return fail(f"model {args.model!r} of {args.config}: {e}")
    url = server_url(args.host, args.port)
    process = ServerProcess(server_command(kwargs, args.host, args.port), server_env(token), log_path=None)
    try:
        wait_until_healthy(url, START_TIMEOUT_S, process)
        print(f"\nchatlearn serve: model {args.model!r} of {args.config} is served at {url}", flush=True)
        if generated:
            print(f"  token: {token}\n  a run (or any client) needs it: export {SERVER_TOKEN_ENV}={token}",
                  flush=True)
        print(f"  a run drives it with, in {args.model}'s model config: vllm_server_url: {url}", flush=True)
        return process.popen.wait()
    except KeyboardInterrupt:
        return 0
    except (RuntimeError, TimeoutError) as e:
        print(f"chatlearn serve: {e}", file=sys.stderr)
        return 1
    finally:
        process.stop()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chatlearn", description="chatlearn command line tools")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    validate = sub.add_parser(
        "validate",
        help="check a config; print it resolved, with its placement plan",
        description="Load CONFIG with its includes, environment values and overrides, check it, and print "
                    "the resolved config and the placement plan. Exit code 2 if the config has problems.",
    )
    validate.add_argument("config", metavar="CONFIG", help="the YAML config file")
    validate.add_argument("overrides", metavar="OVERRIDE", nargs="*",
                          help="key.path=value, e.g. runtime.num_episode=3 (values read as YAML)")
    validate.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto",
                          help="plan for this kind of run (auto: gpu if a model sets num_gpu and a GPU is seen)")
    validate.set_defaults(func=_validate)
    serve = sub.add_parser(
        "serve",
        help="run a config's generation model as a vLLM server that runs can drive",
        description="Start a vLLM OpenAI-compatible server for one model of CONFIG (its model_config_file's "
                    "engine keys), with chatlearn's weight-update routes. Every route but /health requires "
                    "the token in CHATLEARN_SERVER_TOKEN (one is generated and printed when it is unset).",
    )
    serve.add_argument("config", metavar="CONFIG", help="the YAML config file")
    serve.add_argument("overrides", metavar="OVERRIDE", nargs="*", help="key.path=value, as for validate")
    serve.add_argument("--model", default="policy", help="the model to serve (default: policy)")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to bind (default 127.0.0.1; any other needs CHATLEARN_SERVER_TOKEN set)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    serve.set_defaults(func=_serve)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return EXIT_CONFIG_ERROR
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
