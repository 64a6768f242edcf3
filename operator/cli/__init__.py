"""The ``hps`` command. Each subcommand lives in its own module beside this one and exposes
``add_parser(subparsers)``; heavy imports stay inside each command's run function so ``hps agent``
starts without loading kopf and ``hps plan`` without loading gRPC."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from node_agent.allocator import keep_freed_memory
from node_agent.errors import HpsError, InvalidArgumentError, UnavailableError

#: subcommand modules, in the order ``hps --help`` lists them
SUBCOMMANDS = (
    "local",
    "lookup",
    "update",
    "plan",
    "render",
    "load",
    "agent",
    "operator_run",
    "bench",
    "convert",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hps", description="Hierarchical parameter server for recommendation embeddings, on Kubernetes."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"hps_operator.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"hps_operator.cli.{name}":
                continue  # a subcommand not built yet is simply not offered
            raise
        module.add_parser(sub)
    return parser


#: the commands that make lookups in this process (``hps agent`` tunes its own allocator at start)
LOOKUP_COMMANDS = ("bench", "lookup")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hps`` console script; returns the process exit code.

    Errors the core raises on purpose (:class:`HpsError`) become one line on stderr and the
    error's exit code; so do a path the system refuses (a directory for a file, no permission: exit 2)
    and a peer that refuses or drops the connection (exit 5). Anything else is a bug and keeps its
    traceback."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in LOOKUP_COMMANDS:
        # a lookup's caller frees and allocates answer-sized buffers every call (the agent does the same)
        keep_freed_memory()
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except HpsError as exc:
        print(f"hps {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # the reader went away (`hps render | head`): nothing is wrong, and nothing more to say
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - stdout's flush at exit must not fail again
        return 0
    except ConnectionError as exc:  # a peer refused or dropped us: the same as an unavailable service
        print(f"hps {args.command}: error: {exc}", file=sys.stderr)
        return UnavailableError.exit_code
    except OSError as exc:
        # a path given that cannot be used as asked (a directory for a file, no permission, ...)
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"hps {args.command}: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return InvalidArgumentError.exit_code
    except Exception as exc:
        if _is_redis_unreachable(exc):
            print(f"hps {args.command}: error: Redis: {exc}", file=sys.stderr)
            return UnavailableError.exit_code
        raise


def _is_redis_unreachable(exc: BaseException) -> bool:
    """redis-py's connection and timeout errors (not imported unless a command used Redis)."""
    redis = sys.modules.get("redis")
    return redis is not None and isinstance(exc, redis.ConnectionError | redis.TimeoutError)


if __name__ == "__main__":
    sys.exit(main())
