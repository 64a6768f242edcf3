"""Validates objects against the EmbeddingModel CRD the way the API server would, as far as it can run
here: the OpenAPI schema (jsonschema, with ``x-kubernetes-int-or-string`` spelled out), list-map key
uniqueness (``x-kubernetes-list-type: map``), the CEL rules (``x-kubernetes-validations``, evaluated
with cel-python) and defaulting (``default``). What it does not do: pruning of unknown fields and
the Kubernetes-specific CEL libraries (the CRD uses none of them)."""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import yaml

CRD_PATH = Path(__file__).resolve().parents[2] / "crds" / "hps.dev_embeddingmodels.yaml"


@cache
def load_crd() -> dict[str, Any]:
    """The CRD, parsed once per session: treat it as read-only."""
    return yaml.safe_load(CRD_PATH.read_text())


def openapi_schema() -> dict[str, Any]:
    return load_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def _as_json_schema(node: Any) -> Any:
    """The CRD schema as plain JSON Schema: int-or-string becomes ``anyOf`` integer/string."""
    if isinstance(node, dict):
        out = {k: _as_json_schema(v) for k, v in node.items() if not k.startswith("x-kubernetes-")}
        if node.get("x-kubernetes-int-or-string"):
            out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
        return out
    if isinstance(node, list):
        return [_as_json_schema(v) for v in node]
    return node


def walk(schema: dict[str, Any], value: Any, path: str = "") -> Iterator[tuple[str, dict[str, Any], Any]]:
    """Every (path, schema node, value) pair where ``value`` is present."""
    yield path, schema, value
    if isinstance(value, dict):
        for key, sub in (schema.get("properties") or {}).items():
            if key in value:
                yield from walk(sub, value[key], f"{path}.{key}")
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for key, item in value.items():
                yield from walk(extra, item, f"{path}.{key}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            yield from walk(schema["items"], item, f"{path}[{i}]")


@cache
def _cel_program(rule: str) -> Any:
    env = celpy.Environment()
    return env.program(env.compile(rule))


def cel_rules() -> list[tuple[str, str]]:
    """``(schema path, rule)`` of every CEL rule in the CRD."""
    found: list[tuple[str, str]] = []

    def visit(node: Any, path: str) -> None:
        if not isinstance(node, dict):
            return
        for rule in node.get("x-kubernetes-validations") or ():
            found.append((path, rule["rule"]))
        for key, sub in (node.get("properties") or {}).items():
            visit(sub, f"{path}.{key}")
        if isinstance(node.get("items"), dict):
            visit(node["items"], f"{path}[]")

    visit(openapi_schema(), "")
    return found


def apply_defaults(obj: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``obj`` with the schema's defaults filled in, top-down (a defaulted ``{}`` gets its
    own fields' defaults), as the API server does before validation."""
    result = copy.deepcopy(obj)

    def fill(schema: dict[str, Any], value: Any) -> None:
        if isinstance(value, dict):
            for key, sub in (schema.get("properties") or {}).items():
                if key not in value and "default" in sub:
                    value[key] = copy.deepcopy(sub["default"])
                if key in value:
                    fill(sub, value[key])
        elif isinstance(value, list) and isinstance(schema.get("items"), dict):
            for item in value:
                fill(schema["items"], item)

    fill(openapi_schema(), result)
    return result


@cache
def _validator() -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(_as_json_schema(openapi_schema()))


def _at(value: Any, path: str) -> tuple[bool, Any]:
    """The value at a :func:`walk` path (``.spec.tables[0].name``), and whether it is there."""
    for part in re.findall(r"\.([^.\[]+)|\[(\d+)\]", path):
        key, index = part
        if key and isinstance(value, dict) and key in value:
            value = value[key]
        elif index and isinstance(value, list) and int(index) < len(value):
            value = value[int(index)]
        else:
            return False, None
    return True, value


def validation_errors(obj: dict[str, Any], old: dict[str, Any] | None = None) -> list[str]:
    """Why the API server would reject ``obj`` (after defaulting it) as a create, or as an update of
    ``old``; empty when it would accept it. Transition rules (those reading ``oldSelf``) run on an
    update only, where the old object has a value at the same path, as the API server runs them."""
    schema = openapi_schema()
    defaulted = apply_defaults(obj)
    old_defaulted = apply_defaults(old) if old is not None else None
    validator = _validator()
    errors = [
        f"{'.'.join(str(p) for p in e.absolute_path)}: {e.message}" for e in validator.iter_errors(defaulted)
    ]
    for path, node, value in walk(schema, defaulted):
        keys = node.get("x-kubernetes-list-map-keys")
        if node.get("x-kubernetes-list-type") == "map" and isinstance(value, list) and keys:
            seen = [tuple(item.get(k) for k in keys) for item in value if isinstance(item, dict)]
            if len(seen) != len(set(seen)):
                errors.append(f"{path}: duplicate entries for keys {keys}")
        for rule in node.get("x-kubernetes-validations") or ():
            context = {"self": celpy.json_to_cel(value)}
            if "oldSelf" in rule["rule"]:
                present, before = _at(old_defaulted, path) if old_defaulted is not None else (False, None)
                if not present:
                    continue
                context["oldSelf"] = celpy.json_to_cel(before)
            if not _cel_program(rule["rule"]).evaluate(context):
                errors.append(f"{path}{rule.get('fieldPath', '')}: {' '.join(rule['message'].split())}")
    return errors
