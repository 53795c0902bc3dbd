"""`kvfleet`: one entry point, one sub-command per job.

Each sub-command lives in its own module with `add_arguments(parser)` and `run(args) -> int`,
so `kvfleet --help` stays a short menu and `kvfleet CMD --help` says everything about CMD.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import sys
from collections.abc import Callable, Coroutine

# name -> (module, one-line help)
COMMANDS = {
    "replica": ("kvfleet.cmd_replica", "serve a model with the paged-attention engine (OpenAI-compatible HTTP)"),
    "balancer": ("kvfleet.cmd_balancer", "run the KV-cache-aware balancer in front of replicas (OpenAI-compatible HTTP)"),
    "picker": ("kvfleet.cmd_picker", "route for an Envoy gateway: an ext_proc endpoint picker (Gateway API Inference Extension)"),
    "fleet": ("kvfleet.cmd_fleet", "start a local fleet of replicas and the balancer; Ctrl-C stops it"),
    "loadgen": ("kvfleet.cmd_loadgen", "replay a trace or synthetic load against an OpenAI endpoint and report"),
    "predict": ("kvfleet.cmd_predict", "evaluate output-length predictors on a trace, online and in time order"),
    "calibrate": ("kvfleet.cmd_calibrate", "fit the simulator's step-time model to the torch engine on this machine"),
    "simulate": ("kvfleet.cmd_simulate", "simulate a fleet on a virtual clock with modelled GPU step times"),
    "keys": ("kvfleet.cmd_keys", "make a CURVE keypair for the KV-event sockets, or an API key"),
    "demo": ("kvfleet.cmd_demo", "start a tiny replica, stream a completion from it, and stop it"),
}


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Keeps the examples in a command's description as written, and shows defaults."""


def run_server(command: str, main: Callable[[], Coroutine], hint: tuple[type[BaseException], str] | None = None) -> int:
    """Run a serving command's `main()` on uvloop (when installed) until it returns: its exit
    status, 1 with the message for a RuntimeError, 2 for `hint`'s exception type with its advice."""
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    try:
        return asyncio.run(main())
    except RuntimeError as e:
        print(f"kvfleet {command}: {e}", file=sys.stderr)
        return 1
    except BaseException as e:
        if hint is None or not isinstance(e, hint[0]):
            raise
        print(f"kvfleet {command}: {e}; {hint[1]}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvfleet",
        description="KV-cache-aware load balancing for LLM inference fleets. "
        "Run `kvfleet COMMAND --help` for the options of a command.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        mod = importlib.import_module(module)
        p = sub.add_parser(name, help=help_text, description=mod.__doc__,
                           formatter_class=_Formatter)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
