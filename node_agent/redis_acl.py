"""Redis ACL users per role, least privilege: which commands on which keys each process of a model
needs, and nothing else. Pure: the rules are strings for ``ACL SETUSER`` or an ACL file, made here for
``hps local up`` and for whoever renders a cluster's Redis.

The roles and what they do (the keys are the model's, see :mod:`node_agent.tiers.redis_tier`,
:mod:`node_agent.updates`, :mod:`node_agent.tiers.health`):

- ``agent``: reads rows (``HMGET``); consumes the update stream in its own group (``XREADGROUP``,
  ``XACK``, ``XAUTOCLAIM``, ``XGROUP``, ``XINFO``) and publishes what its Update RPC takes (``XADD``);
  keeps the stream's coordination keys (applied watermark, claims, withdrawals: ``GET``/``SET``/set
  commands, Lua through ``EVAL``); and, as any agent may become the store writer, writes rows
  (``HSET``, ``HDEL``), clears a model's rows when repairing a Redis that lost its data (``SCAN``,
  ``UNLINK``) and writes its data epoch. ``DEL`` only on the writer lease, which a stopping writer
  gives up. No ``FLUSHALL``/``FLUSHDB``, ``CONFIG``, ``KEYS``, ``ACL``, ``DEBUG``, no key of
  another model.
- ``loader`` (``hps load``): writes rows (``HSET``; ``HLEN`` counts them), the data epoch and the
  record of what was loaded (``HGETALL``/``HSET`` on it). It cannot read rows, nor touch the stream.
- ``producer`` (a training job, ``hps update --redis``): appends to the model's stream (``XADD``,
  ``WAIT`` for replicas, ``XREVRANGE`` to tell whether an entry whose reply was lost landed). It cannot
  read rows nor write them.

Every role may open a connection and learn a Redis Cluster's layout (``HELLO``, ``AUTH``, ``PING``,
``COMMAND``, ``CLUSTER SLOTS``/``SHARDS``/``NODES``, ``READONLY``).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping

from node_agent.errors import InvalidArgumentError
from node_agent.tiers.health import epoch_key, loaded_key
from node_agent.updates import coordination_key

ROLES = ("agent", "loader", "producer")
#: the ACL user each role connects as
USERS: Mapping[str, str] = {"agent": "hps-agent", "loader": "hps-loader", "producer": "hps-producer"}

_CONNECTION = ("+ping", "+hello", "+auth", "+command", "+readonly", "+cluster|slots", "+cluster|shards",
               "+cluster|nodes", "+cluster|info", "+cluster|myid")  # fmt: skip
_AGENT = ("+hmget", "+hset", "+hdel", "+hlen", "+scan", "+unlink",
          "+get", "+set", "+sismember", "+smismember", "+sadd", "+expire", "+pexpire", "+eval", "+evalsha",
          "+xadd", "+xreadgroup", "+xack", "+xautoclaim", "+xclaim", "+xpending", "+xrange", "+xrevrange", "+xlen",
          "+xgroup|create", "+xgroup|setid", "+xgroup|destroy", "+xgroup|createconsumer",
          "+xinfo|stream", "+xinfo|groups", "+xinfo|consumers", "+wait")  # fmt: skip
_LOADER = ("+hset", "+hlen", "+hgetall", "+get", "+set")
_PRODUCER = ("+xadd", "+xrevrange", "+wait")
_GLOB_SPECIALS = re.compile(r"([*?\[\]\\])")


def _literal(key: str) -> str:
    """``key`` as an ACL key pattern matching itself only."""
    return _GLOB_SPECIALS.sub(r"\\\1", key)


def _rows_pattern(model: str) -> str:
    # every HASH of every table of the model: hps:{<model>:<table>:<partition>}
    return _literal("hps:{" + model + ":") + "*"


def role_rules(role: str, *, model: str, stream: str) -> list[str]:
    """The ``ACL SETUSER`` rules of ``role`` for ``model`` whose update stream is ``stream``, without the
    user's state or password (:func:`user_line` adds them). Starts from nothing (``reset``)."""
    if role not in ROLES:
        raise InvalidArgumentError(f"unknown Redis role {role!r}; roles: {', '.join(ROLES)}")
    if not model:
        raise InvalidArgumentError("a Redis role needs the model's name")
    coordination = _literal(coordination_key(stream, "")) + "*"
    rules = ["resetkeys", "resetchannels", "-@all", *_CONNECTION]
    if role == "agent":
        keys = [_rows_pattern(model), _literal(epoch_key(model)), _literal(stream), coordination]
        rules += [*_AGENT, *(f"~{k}" for k in keys)]
        # a writer that stops gives its lease up at once (else the next takes over when it expires)
        rules.append(f"(+del ~{_literal(coordination_key(stream, 'writer'))})")
    elif role == "loader":
        keys = [_rows_pattern(model), _literal(epoch_key(model)), _literal(loaded_key(model))]
        rules += [*_LOADER, *(f"~{k}" for k in keys)]
    else:
        rules += [*_PRODUCER, f"~{_literal(stream)}"]
    return rules


def password_hash(password: str) -> str:
    """What an ACL file holds instead of the password (``#<sha256>``): the file never has it in clear."""
    return "#" + hashlib.sha256(password.encode()).hexdigest()


def user_line(user: str, rules: list[str], password: str) -> str:
    """One ``user`` line of an ACL file."""
    if not password:
        raise InvalidArgumentError(f"Redis user {user} needs a password")
    return " ".join(["user", user, "reset", "on", password_hash(password), *rules])


def acl_file(*, model: str, stream: str, passwords: Mapping[str, str], admin_password: str) -> str:
    """An ACL file (``redis-server --aclfile``): the ``default`` user for administration (its password
    ``admin_password``, every command), then one user per role in ``passwords`` (role → password)."""
    lines = [user_line("default", ["~*", "&*", "+@all"], admin_password)]
    for role in ROLES:
        if role in passwords:
            lines.append(
                user_line(USERS[role], role_rules(role, model=model, stream=stream), passwords[role])
            )
    return "\n".join(lines) + "\n"
