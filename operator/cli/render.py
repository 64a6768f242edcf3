"""``hps render -f MODEL.yaml [--nodes NODES.yaml] [-o yaml|json]``: every object the operator would
create for a model, from the same pure core the operator runs (:func:`hps_operator.core.reconcile.reconcile`
on a cluster where the model has no children yet), as a dry run to diff or to hand to GitOps.

The GPU budget comes from ``--nodes`` (``kubectl get nodes -o yaml``, a list or several documents),
as the operator reads it: only nodes the model's agents can schedule on count. Without it the spec's
``cache.memoryPerGPU`` stands. Objects carry no owner reference unless ``--owner-uid`` names the
EmbeddingModel's uid (without an owner, deleting the model leaves them). The Redis password Secret
holds a fresh random password unless ``--redis-password`` gives one.
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
from pathlib import Path
from typing import Any

from hps_operator.cli.security_flags import help_from_doc

from node_agent.errors import HpsError, InvalidSpecError


class RenderError(HpsError):
    """The model cannot be rendered; the message is the reason the operator would report."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def add_parser(subparsers: Any) -> None:
    from hps_operator.cli.operator_run import DEFAULT_IMAGE

    parser = subparsers.add_parser(
        "render",
        help="print every object the operator would create for a model (a dry run)",
        description=help_from_doc(__doc__),
    )
    parser.add_argument("-f", "--file", type=Path, required=True, help="the EmbeddingModel YAML file")
    parser.add_argument("--nodes", type=Path, metavar="NODES.yaml",
                        help="the cluster's nodes (kubectl get nodes -o yaml): their GPUs set the budget")  # fmt: skip
    parser.add_argument("-n", "--namespace", help="namespace when the file names none (default: default)")
    parser.add_argument("-o", "--output", choices=("yaml", "json"), default="yaml",
                        help="YAML documents, or a JSON v1 List (default: yaml)")  # fmt: skip
    parser.add_argument("--image", default=DEFAULT_IMAGE, help=f"default agent image (default: {DEFAULT_IMAGE})")
    parser.add_argument("--image-pull-policy", choices=("Always", "IfNotPresent", "Never"),
                        help="imagePullPolicy of the agent and loader containers")  # fmt: skip
    parser.add_argument("--owner-uid", metavar="UID", help="the EmbeddingModel's uid, for owner references")
    parser.add_argument("--redis-password", metavar="PASSWORD", help="the password the Redis Secret holds")
    parser.set_defaults(func=run)


def read_nodes(path: Path) -> list[dict[str, Any]]:
    """Nodes from a YAML file: a ``List``/``NodeList``, a plain list, or one Node per document."""
    import yaml

    try:
        documents = list(yaml.safe_load_all(path.read_text()))
    except FileNotFoundError:
        raise InvalidSpecError(str(path), "file not found") from None
    except IsADirectoryError:
        raise InvalidSpecError(str(path), "is a directory; give the nodes' YAML file") from None
    except UnicodeDecodeError:
        raise InvalidSpecError(str(path), "is not a text file; give the nodes' YAML file") from None
    except yaml.YAMLError as exc:
        raise InvalidSpecError(str(path), f"not YAML: {exc}") from None
    nodes: list[dict[str, Any]] = []
    for doc in documents:
        if doc is None:
            continue
        if isinstance(doc, list):
            items = doc
        elif isinstance(doc, dict) and isinstance(doc.get("items"), list):
            items = doc["items"]
        else:
            items = [doc]
        for item in items:
            if not isinstance(item, dict) or item.get("kind", "Node") != "Node":
                raise InvalidSpecError(str(path), f"expected Node objects, found {str(item)[:80]!r}")
            for part in ("metadata", "status"):
                if not isinstance(item.get(part, {}), dict):
                    raise InvalidSpecError(str(path), f"a Node's {part} must be a mapping, found {item[part]!r}")
            nodes.append(item)
    return nodes


def render_objects(body: dict[str, Any], nodes: list[dict[str, Any]], *, image: str,
                   image_pull_policy: str | None = None, owner_uid: str | None = None,
                   redis_password: str | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """The objects the operator's first reconcile of ``body`` would write (created, then applied)."""
    from hps_operator.core import reconcile as core
    from hps_operator.core.status import get_condition

    model = {**body, "metadata": {**body["metadata"], "uid": owner_uid or "", "generation": 1}}
    observed = core.Observed(model=model, nodes=nodes, children=(),
                             redis_password=redis_password or secrets.token_urlsafe(24),
                             now="1970-01-01T00:00:00Z")  # fmt: skip
    decision = core.reconcile(observed, core.Options(image=image, image_pull_policy=image_pull_policy))
    if decision.outcome != core.RECONCILED:
        ready = get_condition(decision.status.get("conditions"), "Ready") or {}
        exit_code = {core.INVALID_SPEC: 2, core.INSUFFICIENT_GPU_MEMORY: 7}.get(decision.outcome, 1)
        raise RenderError(f"{decision.outcome}: {ready.get('message', '')}", exit_code)
    objects = [*decision.create, *decision.apply]
    if not owner_uid:
        for obj in objects:
            obj["metadata"].pop("ownerReferences", None)
    return sorted(objects, key=lambda m: (str(m["kind"]), str(m["metadata"]["name"])))


def read_model(path: Path) -> dict[str, Any]:
    """The EmbeddingModel document of a YAML file, as a manifest (validated when rendered)."""
    import yaml

    from node_agent.spec import KIND, load_model_file

    load_model_file(path)  # the file's errors, named as every command names them
    docs = [d for d in yaml.safe_load_all(path.read_text()) if isinstance(d, dict)]
    return next(d for d in docs if d.get("kind", KIND) == KIND)


def run(args: argparse.Namespace) -> int:
    import yaml

    body = read_model(args.file)
    body.setdefault("metadata", {})
    if not body["metadata"].get("namespace"):
        body["metadata"]["namespace"] = args.namespace or "default"
    nodes = read_nodes(args.nodes) if args.nodes is not None else []
    objects = render_objects(body, nodes, image=args.image, image_pull_policy=args.image_pull_policy,
                             owner_uid=args.owner_uid, redis_password=args.redis_password)  # fmt: skip
    if args.output == "json":
        json.dump({"apiVersion": "v1", "kind": "List", "items": objects}, sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
    else:
        yaml.dump_all(objects, sys.stdout, Dumper=_dumper(), sort_keys=True)
    return 0


def _block_strings(dumper: Any, value: str) -> Any:
    """Multi-line strings (the model file, scripts) as readable ``|`` blocks."""
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


def _dumper() -> Any:
    import yaml

    class BlockStringDumper(yaml.SafeDumper):
        pass

    BlockStringDumper.add_representer(str, _block_strings)
    return BlockStringDumper
