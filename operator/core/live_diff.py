"""Whether a live child still holds what the operator applied, read the way the API server stores it.

The API server rewrites some values without changing their meaning: a quantity is stored in its
canonical form (an HPA's ``averageValue: "20000"`` comes back ``"20k"``, ``cpu: 4`` comes back
``"4"``, ``memory: 1024Mi`` comes back ``1Gi``), and empty lists and maps are dropped. Comparing
exact values would see drift on every resync and re-apply for ever, so values are compared by
meaning: equal, or the same quantity, or an empty value against an absent one. Fields the server
adds (defaults, status, metadata) are ignored: only what the operator rendered is compared.

Each rendered manifest carries a hash of itself (``hps.dev/applied-hash``), so a change the
renderer makes is applied even where the comparison by meaning would not see it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from typing import Any

APPLIED_HASH_ANNOTATION = "hps.dev/applied-hash"

_QUANTITY = re.compile(r"^([+-]?(?:\d+\.?\d*|\.\d+))(?:([eE][+-]?\d+)|(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E)?)$")
_SUFFIX = {
    "": Decimal(1), "n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"),
    "k": Decimal("1e3"), "M": Decimal("1e6"), "G": Decimal("1e9"), "T": Decimal("1e12"),
    "P": Decimal("1e15"), "E": Decimal("1e18"),
    "Ki": Decimal(2**10), "Mi": Decimal(2**20), "Gi": Decimal(2**30), "Ti": Decimal(2**40),
    "Pi": Decimal(2**50), "Ei": Decimal(2**60),
}  # fmt: skip


def quantity_value(value: Any) -> Decimal | None:
    """The number a Kubernetes quantity stands for (``"20k"`` → 20000, ``4`` → 4), None when ``value``
    is not a quantity."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        return None
    match = _QUANTITY.match(str(value).strip())
    if not match:
        return None
    number, exponent, suffix = match.groups()
    try:
        scale = Decimal(f"1{exponent}") if exponent else _SUFFIX[suffix or ""]
        return Decimal(number) * scale
    except InvalidOperation:
        return None


def same_value(live: Any, desired: Any) -> bool:
    """Two scalars mean the same: equal, or equal as quantities (``"20000"`` and ``"20k"``)."""
    if live == desired and type(live) is type(desired):
        return True
    if isinstance(live, bool) or isinstance(desired, bool):
        return False
    a, b = quantity_value(live), quantity_value(desired)
    return a is not None and a == b


def _empty(value: Any) -> bool:
    return value is None or value == {} or value == [] or value == ""


def contains(live: Any, desired: Any) -> bool:
    """Whether every field of ``desired`` is in ``live`` with the same meaning; fields only ``live``
    has (server defaults) are fine, and an empty desired value matches an absent one."""
    if isinstance(desired, Mapping):
        if not isinstance(live, Mapping):
            return _empty(desired) and _empty(live)
        return all(
            (_empty(v) and _empty(live.get(k))) or (k in live and contains(live[k], v)) for k, v in desired.items()
        )
    if isinstance(desired, list):
        if not isinstance(live, list):
            return not desired and _empty(live)
        return len(live) == len(desired) and all(contains(a, b) for a, b in zip(live, desired, strict=True))
    return same_value(live, desired)


def with_hash(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``manifest`` stamped with its own hash, so a changed field that the renderer dropped
    (which :func:`contains` cannot see) still triggers an apply."""
    m = copy.deepcopy(dict(manifest))
    annotations = m["metadata"].setdefault("annotations", {})
    annotations.pop(APPLIED_HASH_ANNOTATION, None)
    digest = hashlib.sha256(json.dumps(m, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]
    annotations[APPLIED_HASH_ANNOTATION] = digest
    return m


def applied_hash(manifest: Mapping[str, Any] | None) -> str | None:
    return ((manifest or {}).get("metadata", {}).get("annotations") or {}).get(APPLIED_HASH_ANNOTATION)


def needs_apply(desired: Mapping[str, Any], live: Mapping[str, Any] | None) -> bool:
    """``desired`` (stamped by :func:`with_hash`) is missing, was changed by the renderer since it
    was applied, or was changed behind the operator's back (drift)."""
    if live is None or applied_hash(live) != applied_hash(desired):
        return True
    return not contains(live, {k: v for k, v in desired.items() if k not in ("stringData", "status")})
