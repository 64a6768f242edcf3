"""The flags every command that reaches an agent or Redis shares: TLS and the credential sent to the
agents, Redis's user, password and TLS, and the shortcut of taking them all from a local stack's state
directory (``--state-dir``). Secrets never come on a command line: a file or an environment variable
names them."""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path
from typing import Any

#: what a user is told when an agent refused a call for want of a token
TOKEN_HINT = ("pass --token-file FILE (or --token-env VAR); for a stack started with hps local up, --state-dir DIR "
              "(its token is DIR/auth.token; the default DIR is $HPS_STATE_DIR or ./.hps-local)")  # fmt: skip


def add_client_arguments(parser: argparse.ArgumentParser) -> None:
    """``--tls-ca``, ``--tls-cert``/``--tls-key``, ``--tls-server-name``, ``--token-file``/``--token-env``
    and ``--state-dir``."""
    group = parser.add_argument_group("TLS and credentials (agents)")
    group.add_argument("--tls-ca", type=Path, metavar="FILE",
                       help="check the agent's TLS certificate against this CA (PEM); without it, plaintext")  # fmt: skip
    group.add_argument("--tls-cert", type=Path, metavar="FILE",
                       help="this client's certificate, for agents that ask for one (mutual TLS)")  # fmt: skip
    group.add_argument("--tls-key", type=Path, metavar="FILE", help="the key of --tls-cert")
    group.add_argument("--tls-server-name", metavar="NAME",
                       help="the name the agent's certificate must carry, when the endpoint's host is not it")  # fmt: skip
    group.add_argument("--token-file", type=Path, metavar="FILE",
                       help="send the token in FILE as 'authorization: Bearer' (Update always needs one)")  # fmt: skip
    group.add_argument("--token-env", metavar="VAR", help="send the token in environment variable VAR")
    group.add_argument("--state-dir", type=Path, metavar="DIR",
                       help="a stack started with hps local up: its endpoints, token and CA (and, with "
                       "--redis, its producer's Redis user), unless given here")  # fmt: skip


def add_redis_arguments(parser: argparse.ArgumentParser) -> None:
    """``--redis-user``, ``--redis-password-env`` and the ``--redis-tls*`` flags (``--redis`` and
    ``--redis-cluster`` stay with each command, which says what its Redis is for)."""
    group = parser.add_argument_group("Redis user and TLS")
    group.add_argument("--redis-user", metavar="NAME",
                       help="the Redis ACL user to connect as (default: Redis's default user)")  # fmt: skip
    group.add_argument(
        "--redis-password-env", metavar="VAR", help="environment variable holding the Redis password"
    )
    group.add_argument("--redis-tls", action="store_true",
                       help="connect to Redis over TLS (also: --redis rediss://HOST:PORT)")  # fmt: skip
    group.add_argument("--redis-tls-ca", type=Path, metavar="FILE",
                       help="check Redis's certificate against this CA (implies --redis-tls; default: the "
                       "system's roots)")  # fmt: skip
    group.add_argument("--redis-tls-cert", type=Path, metavar="FILE",
                       help="this client's certificate, for a Redis that asks for one (implies --redis-tls)")  # fmt: skip
    group.add_argument("--redis-tls-key", type=Path, metavar="FILE", help="the key of --redis-tls-cert")
    group.add_argument("--redis-tls-no-hostname-check", action="store_true",
                       help="accept a Redis certificate that does not name the host connected to (a Redis "
                       "Cluster announcing pod IPs); its chain is still checked against the CA")  # fmt: skip


def secret_from_env(flag: str, var: str | None) -> str | None:
    from node_agent.errors import InvalidArgumentError

    if not var:
        return None
    value = os.environ.get(var)
    if value is None:
        raise InvalidArgumentError(f"{flag}: environment variable {var} is not set")
    return value


def client_security(args: argparse.Namespace) -> dict[str, Any]:
    """``Client``'s ``tls``, ``token`` and ``token_file`` from the flags, then from ``--state-dir``."""
    from node_agent.errors import InvalidArgumentError
    from node_agent.tls import ClientTLS

    if args.token_file is not None and args.token_env:
        raise InvalidArgumentError("--token-file and --token-env name the same token: give one")
    if (args.tls_cert is None) != (args.tls_key is None):
        raise InvalidArgumentError("--tls-cert needs --tls-key, and --tls-key needs --tls-cert")
    out: dict[str, Any] = {}
    if args.state_dir is not None:
        from node_agent.local.stack import LocalStack

        out.update(LocalStack(args.state_dir).client_credentials())
    token = secret_from_env("--token-env", args.token_env)
    if token is not None:
        out.pop("token_file", None)
        out["token"] = token
    elif args.token_file is not None:
        out["token_file"] = args.token_file
    if args.tls_ca or args.tls_cert or args.tls_server_name:
        ca = args.tls_ca or out.get("tls")
        out["tls"] = ClientTLS(ca_file=Path(ca) if ca else None, cert_file=args.tls_cert, key_file=args.tls_key,
                               server_name=args.tls_server_name)  # fmt: skip
    return out


def endpoints_of(args: argparse.Namespace) -> str | None:
    """``--endpoint``, else the endpoints of the stack in ``--state-dir``, else in ``$HPS_STATE_DIR`` (None:
    none of them)."""
    if getattr(args, "endpoint", None):
        return str(args.endpoint)
    if getattr(args, "state_dir", None) is None:
        if not os.environ.get("HPS_STATE_DIR"):
            return None
        args.state_dir = os.environ["HPS_STATE_DIR"]  # the stack hps local up started there
    from node_agent.errors import NotFoundError
    from node_agent.local.stack import LocalStack

    state = LocalStack(args.state_dir).read_state()
    if state is None or not state.endpoints:
        raise NotFoundError(
            f"no running stack in {args.state_dir}: give --endpoint, or start it with hps local up"
        )
    return ",".join(state.endpoints)


def redis_access(args: argparse.Namespace, *, local_role: str | None = None) -> tuple[list[str], Any]:
    """The ``--redis`` addresses and the :class:`~node_agent.redis_access.RedisAccess` the flags say;
    ``local_role``: with ``--state-dir``, that role's user, password and TLS in the stack are the
    defaults (flags given still win)."""
    from node_agent.errors import InvalidArgumentError
    from node_agent.redis_access import RedisAccess, RedisTLS, parse_redis_addresses

    addresses, scheme_tls = parse_redis_addresses(args.redis or "")
    base = RedisAccess()
    if local_role is not None and getattr(args, "state_dir", None) is not None and addresses:
        from node_agent.local.stack import LocalStack

        base = LocalStack(args.state_dir).redis_access(local_role)
    if (args.redis_tls_cert is None) != (args.redis_tls_key is None):
        raise InvalidArgumentError(
            "--redis-tls-cert needs --redis-tls-key, and --redis-tls-key needs --redis-tls-cert"
        )
    if scheme_tls is False and (args.redis_tls or args.redis_tls_ca or args.redis_tls_cert):
        raise InvalidArgumentError("--redis names redis:// (plaintext) but a --redis-tls flag asks for TLS: use "
                                   "rediss://, or drop the scheme")  # fmt: skip
    wants_tls = bool(scheme_tls or args.redis_tls or args.redis_tls_ca or args.redis_tls_cert)
    tls = base.tls
    if wants_tls:
        tls = RedisTLS(ca_file=args.redis_tls_ca or (base.tls.ca_file if base.tls else None),
                       cert_file=args.redis_tls_cert, key_file=args.redis_tls_key,
                       check_hostname=not args.redis_tls_no_hostname_check)  # fmt: skip
    password = secret_from_env("--redis-password-env", args.redis_password_env)
    access = RedisAccess(
        username=args.redis_user or base.username,
        password=password if password is not None else base.password,
        tls=tls,
    )
    return addresses, access


def port_number(text: str) -> int:
    """argparse ``type`` of a TCP port flag: 0 (any free port) to 65535, else a usage error (the kernel
    would otherwise take a number out of range modulo 65536)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0 (any free one) to 65535, got {port}")
    return port


def help_from_doc(doc: str | None) -> str:
    """A module docstring's first paragraph as ``--help`` text: reStructuredText roles and literals
    (``:func:`x.y```, ````z````) become plain words."""
    first = (doc or "").split("\n\n")[0]
    first = re.sub(r":[a-z]+:`~?([^`]+)`", lambda m: m.group(1).rsplit(".", 1)[-1], first)
    return first.replace("``", "")
