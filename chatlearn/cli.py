"""The ``chatlearn`` command.

    chatlearn validate CONFIG [key.path=value ...] [--device auto|cpu|gpu]

prints the resolved config (YAML) and the placement plan, or every problem of
the config and exit code 2. It imports no torch, Ray or vLLM, so it answers in
a fraction of a second.
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
