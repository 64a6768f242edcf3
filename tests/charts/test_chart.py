"""The Helm chart, checked with the real ``helm`` and ``kubectl`` binaries and the official Kubernetes
schemas: it lints, renders valid objects for default and non-default values, rejects mistyped values,
ships the repository's CRDs unchanged, and grants the operator exactly the permissions it declares."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from hps_operator.cli import build_parser
from hps_operator.cli.operator_run import (
    IMAGE_ENV,
    METRICS_ADDRESS_ENV,
    METRICS_PORT_ENV,
    PULL_POLICY_ENV,
    operator_config,
)
from hps_operator.kopf_handlers.permissions import (
    API_PERMISSIONS,
    CLUSTER_SCOPED_RESOURCES,
    LEADER_ELECTION_PERMISSIONS,
    RESOURCE_NAMES,
)

ROOT = Path(__file__).resolve().parents[2]
#: the address the kubelet gives $(POD_IP) in these tests
POD_IP = "10.1.2.3"
CHART = ROOT / "charts" / "hps-operator"
#: the Kubernetes version rendered objects are validated for (kubectl here is v1.35)
KUBERNETES_VERSION = "1.35"
RELEASE, NAMESPACE = "hps", "hps-system"

#: values a user would plausibly set, each rendered and validated
VALUE_SETS: dict[str, dict[str, Any]] = {
    "default": {},
    "namespaced": {"watchNamespaces": ["recsys", "ads"]},
    "service-monitor": {"metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}}},
    "custom": {
        "image": {"repository": "registry.example.com/hps/operator", "tag": "1.2.3", "pullPolicy": "Always"},
        "imagePullSecrets": [{"name": "regcred"}, "plain"],  # values.schema.json allows both forms
        "agent": {"image": {"repository": "registry.example.com/hps/agent", "tag": "1.2.3-cuda12",
                            "pullPolicy": "Always"}},
        "resources": {"requests": {"cpu": "250m", "memory": "256Mi"}, "limits": {"cpu": 1, "memory": "1Gi"}},
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "infra", "effect": "NoSchedule"}],
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64"]}]}]}}},
        "priorityClassName": "system-cluster-critical",
        "operator": {"verbose": True, "extraEnv": [{"name": "EXTRA", "value": "1"}]},
        "metrics": {"enabled": True, "port": 9300},
    },
    "existing-service-account": {"serviceAccount": {"create": False, "name": "ops"},
                                 "rbac": {"aggregateRoles": False}},
}  # fmt: skip


def find_binary(name: str) -> str:
    found = shutil.which(name) or (
        str(ROOT / ".tools/bin" / name) if (ROOT / ".tools/bin" / name).exists() else None
    )
    if found is None:
        pytest.skip(f"{name} not found on PATH or in .tools/bin (bash scripts/setup.sh installs it)")
    return found


@pytest.fixture(scope="module")
def helm() -> str:
    return find_binary("helm")


@pytest.fixture(scope="module")
def kubectl() -> str:
    return find_binary("kubectl")


def run_helm(helm: str, *args: str, values: dict[str, Any] | None = None, tmp: Path | None = None,
             check: bool = True) -> subprocess.CompletedProcess[str]:  # fmt: skip
    argv = [helm, *args]
    if values:
        assert tmp is not None
        values_file = tmp / "values.yaml"
        values_file.write_text(yaml.safe_dump(values))
        argv += ["-f", str(values_file)]
    # an empty HOME-like sandbox keeps helm from reading or writing the user's config
    env = {**os.environ, "HELM_CACHE_HOME": str(tmp or "/tmp") + "/.helm-cache",
           "HELM_CONFIG_HOME": str(tmp or "/tmp") + "/.helm-config", "HELM_DATA_HOME": str(tmp or "/tmp") + "/.helm-data"}  # fmt: skip
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed:\n{result.stderr}")
    return result


def render(helm: str, tmp: Path, values: dict[str, Any] | None = None, *extra: str) -> list[dict[str, Any]]:
    out = run_helm(helm, "template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--include-crds", *extra,
                   values=values, tmp=tmp).stdout  # fmt: skip
    return [d for d in yaml.safe_load_all(out) if d]


@pytest.fixture(scope="module", params=sorted(VALUE_SETS))
def rendered(request: pytest.FixtureRequest, helm: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[
        tuple[str, list[dict[str, Any]]]]:  # fmt: skip
    name = request.param
    yield name, render(helm, tmp_path_factory.mktemp(name), VALUE_SETS[name])


def of_kind(docs: Sequence[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


# ---------------------------------------------------------------------------------------------
# lint, schemas, kubectl


@pytest.mark.parametrize("strict", [False, True], ids=["lint", "lint-strict"])
def test_helm_lint_passes(helm: str, tmp_path: Path, strict: bool) -> None:
    for name, values in VALUE_SETS.items():
        result = run_helm(helm, "lint", str(CHART), *(["--strict"] if strict else []), values=values,
                          tmp=tmp_path, check=False)  # fmt: skip
        assert result.returncode == 0, f"{name}: {result.stdout}{result.stderr}"
        assert "0 chart(s) failed" in result.stdout


def test_every_rendered_object_is_valid_kubernetes(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    name, docs = rendered
    assert of_kind(docs, "Deployment") and of_kind(docs, "CustomResourceDefinition")
    for doc in docs:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # no official schema for prometheus-operator kinds: checked structurally below
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            raise AssertionError(f"{name}: {doc['kind']}/{doc['metadata']['name']}: {exc}") from None


def concatenated_json(text: str) -> list[dict[str, Any]]:
    """kubectl prints one JSON object per input document, back to back."""
    decoder, objects, pos = json.JSONDecoder(), [], 0
    while pos < len(text.rstrip()):
        obj, end = decoder.raw_decode(text, pos)
        objects.append(obj)
        pos = end + (len(text[end:]) - len(text[end:].lstrip()))
    return objects


def test_kubectl_decodes_every_rendered_object(rendered: tuple[str, list[dict[str, Any]]], kubectl: str,
                                               tmp_path: Path) -> None:  # fmt: skip
    """kubectl's strongest offline check. ``kubectl apply/create --dry-run=client`` need API discovery
    from a server even with ``--validate=false`` (kubectl 1.35 fails with "unable to recognize"
    without one), so this runs kubectl's local builder instead: ``kubectl label --local`` decodes every
    document into its typed object (metadata types, apiVersion/kind) without contacting a server;
    the schemas themselves are checked by kubernetes-validate above."""
    name, docs = rendered
    stream = yaml.safe_dump_all(docs)
    env = {**os.environ, "KUBECONFIG": str(tmp_path / "no-cluster.yaml")}
    result = subprocess.run(
        [kubectl, "label", "--local", "-f", "-", "hps.dev/checked=true", "-o", "json"],
        input=stream, capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert result.returncode == 0, f"{name}: {result.stderr}"
    items = concatenated_json(result.stdout)
    assert all(i["metadata"]["labels"]["hps.dev/checked"] == "true" for i in items)
    assert [(i["kind"], i["metadata"]["name"]) for i in items] == [
        (d["kind"], d["metadata"]["name"]) for d in docs
    ]


def test_kubectl_rejects_what_the_offline_check_should_catch(kubectl: str, tmp_path: Path) -> None:
    """The offline kubectl check is not a rubber stamp: a malformed object fails it."""
    bad = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "x", "namespace": ["not", "a", "string"]},
    }
    env = {**os.environ, "KUBECONFIG": str(tmp_path / "no-cluster.yaml")}
    result = subprocess.run([kubectl, "label", "--local", "-f", "-", "a=b", "-o", "json"], input=json.dumps(bad),
                            capture_output=True, text=True, timeout=60, env=env)  # fmt: skip
    assert result.returncode != 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "replicaCount=x"], "/replicaCount"),
        (["--set", "replicas=2"], "additional properties 'replicas' not allowed"),
        (["--set", "imagee.tag=1"], "additional properties 'imagee' not allowed"),
        (["--set", "image.pullPolicy=Sometimes"], "/image/pullPolicy"),
        (["--set", "metrics.port=x"], "/metrics/port"),
        (["--set", "metrics.serviceMonitor.enabeld=true"], "'enabeld' not allowed"),
        (["--set", "watchNamespaces={Bad_NS}"], "/watchNamespaces/0"),
        (["--set", "resources.requests.memory=lots"], "/resources/requests/memory"),
    ],
)
def test_a_values_typo_fails_with_a_message_naming_it(helm: str, tmp_path: Path, args: list[str],
                                                      message: str) -> None:  # fmt: skip
    result = run_helm(helm, "template", RELEASE, str(CHART), *args, tmp=tmp_path, check=False)
    assert result.returncode != 0
    assert "values don't meet the specifications of the schema" in result.stderr
    assert message in result.stderr


# ---------------------------------------------------------------------------------------------
# CRDs: one source of truth


def test_chart_crds_are_byte_identical_copies_of_the_repository_crds() -> None:
    source = {p.name: p.read_bytes() for p in sorted((ROOT / "crds").glob("*.yaml"))}
    chart = {p.name: p.read_bytes() for p in sorted((CHART / "crds").glob("*.yaml"))}
    assert source, "crds/ holds no CustomResourceDefinition"
    assert sorted(chart) == sorted(source), "run scripts/sync-chart-crds.sh"
    for name, content in source.items():
        assert chart[name] == content, (
            f"charts/hps-operator/crds/{name} differs from crds/{name}: run scripts/sync-chart-crds.sh"
        )


def test_sync_script_restores_a_drifted_copy(tmp_path: Path) -> None:
    work = tmp_path / "repo"
    shutil.copytree(ROOT / "crds", work / "crds")
    (work / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts/sync-chart-crds.sh", work / "scripts")
    chart_crds = work / "charts/hps-operator/crds"
    chart_crds.mkdir(parents=True)
    (chart_crds / "stale.yaml").write_text("kind: Stale\n")
    for crd in (work / "crds").glob("*.yaml"):
        (chart_crds / crd.name).write_text("drifted\n")
    subprocess.run(
        ["bash", str(work / "scripts/sync-chart-crds.sh")], check=True, capture_output=True, timeout=30
    )
    assert sorted(p.name for p in chart_crds.iterdir()) == sorted(
        p.name for p in (work / "crds").glob("*.yaml")
    )
    for crd in (work / "crds").glob("*.yaml"):
        assert (chart_crds / crd.name).read_bytes() == crd.read_bytes()


# ---------------------------------------------------------------------------------------------
# RBAC: exactly API_PERMISSIONS, no wildcard


def granted(roles: Sequence[dict[str, Any]]) -> set[tuple[str, str, str]]:
    return {
        (group, resource, verb)
        for role in roles
        for rule in role.get("rules", [])
        for group in rule.get("apiGroups", [])
        for resource in rule.get("resources", [])
        for verb in rule.get("verbs", [])
    }


DECLARED = {(group, resource, verb) for group, resource, verbs in API_PERMISSIONS for verb in verbs}
#: granted cluster-wide even when namespaces are listed: nodes and ClusterRoleBindings are
#: cluster-scoped, and the pods on a model's nodes can be in any namespace
CLUSTER_SCOPED = set(CLUSTER_SCOPED_RESOURCES)


def operator_roles(docs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The roles bound to the operator's ServiceAccount (not the aggregated user roles)."""
    bound = {(b["roleRef"]["kind"], b["roleRef"]["name"], b["metadata"].get("namespace"))
             for b in docs if b["kind"] in ("ClusterRoleBinding", "RoleBinding")
             if any(s["kind"] == "ServiceAccount" for s in b["subjects"])}  # fmt: skip
    return [d for d in docs if (d["kind"], d["metadata"]["name"], d["metadata"].get("namespace") if d["kind"] == "Role" else None)
            in {(k, n, ns if k == "Role" else None) for k, n, ns in bound}]  # fmt: skip


def test_no_wildcard_in_any_rule(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = rendered
    for role in of_kind(docs, "ClusterRole") + of_kind(docs, "Role"):
        for rule in role.get("rules", []):
            for key in ("apiGroups", "resources", "verbs", "resourceNames"):
                assert "*" not in rule.get(key, []), f"{role['metadata']['name']}: wildcard in {key}"


def test_cluster_wide_rbac_grants_exactly_the_declared_permissions(helm: str, tmp_path: Path) -> None:
    docs = render(helm, tmp_path)
    roles = [r for r in operator_roles(docs) if not r["metadata"]["name"].endswith("-leader")]
    assert [r["kind"] for r in roles] == ["ClusterRole"]
    assert granted(roles) == DECLARED
    (binding,) = [
        b for b in of_kind(docs, "ClusterRoleBinding") if b["roleRef"]["name"] == roles[0]["metadata"]["name"]
    ]
    (sa,) = of_kind(docs, "ServiceAccount")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": NAMESPACE}
    ]


def test_rbac_binds_only_system_auth_delegator_and_can_be_left_out(helm: str, tmp_path: Path) -> None:
    """The operator may bind one ClusterRole (for spec.security.auth's TokenReview) and no other; an
    admin who will not let it can turn that off, and nothing else changes."""
    docs = render(helm, tmp_path)
    rules = [rule for role in operator_roles(docs) for rule in role.get("rules", [])]
    bind = [rule for rule in rules if "bind" in rule["verbs"]]
    assert len(bind) == 1 and bind[0]["resources"] == ["clusterroles"]
    assert tuple(bind[0]["resourceNames"]) == RESOURCE_NAMES[("rbac.authorization.k8s.io", "clusterroles")]
    for rule in rules:  # escalate and impersonate never
        assert not {"escalate", "impersonate"} & set(rule["verbs"])
    off = render(helm, tmp_path, {"rbac": {"tokenReview": False}})
    roles = [r for r in operator_roles(off) if not r["metadata"]["name"].endswith("-leader")]
    assert granted(roles) == {p for p in DECLARED if p[1] not in ("clusterrolebindings", "clusterroles")}


def test_namespaced_rbac_is_a_role_per_namespace_and_nodes_cluster_wide(helm: str, tmp_path: Path) -> None:
    docs = render(helm, tmp_path, {"watchNamespaces": ["recsys", "ads"]})
    roles = [r for r in operator_roles(docs) if not r["metadata"]["name"].endswith("-leader")]
    per_namespace = {r["metadata"]["namespace"]: r for r in roles if r["kind"] == "Role"}
    assert sorted(per_namespace) == ["ads", "recsys"]
    namespaced = {p for p in DECLARED if p[1] not in CLUSTER_SCOPED}
    for role in per_namespace.values():
        assert granted([role]) == namespaced
    (cluster,) = [r for r in roles if r["kind"] == "ClusterRole"]
    assert granted([cluster]) == {p for p in DECLARED if p[1] in CLUSTER_SCOPED}
    assert not [b for b in of_kind(docs, "ClusterRoleBinding") if b["roleRef"]["name"] == "hps-hps-operator"]
    for binding in of_kind(docs, "RoleBinding"):
        assert (
            binding["subjects"][0]["namespace"] == NAMESPACE
        )  # the operator's SA, bound into each namespace


def test_aggregated_roles_extend_edit_admin_and_view(helm: str, tmp_path: Path) -> None:
    docs = render(helm, tmp_path)
    by_label = {label: r["metadata"]["name"] for r in of_kind(docs, "ClusterRole")
                for label, v in r["metadata"]["labels"].items() if label.startswith("rbac.authorization.k8s.io/aggregate-to-") and v == "true"}  # fmt: skip
    assert by_label["rbac.authorization.k8s.io/aggregate-to-edit"].endswith("-editor")
    assert by_label["rbac.authorization.k8s.io/aggregate-to-admin"].endswith("-editor")
    assert by_label["rbac.authorization.k8s.io/aggregate-to-view"].endswith("-viewer")
    viewer = next(r for r in of_kind(docs, "ClusterRole") if r["metadata"]["name"].endswith("-viewer"))
    assert {v for _, _, v in granted([viewer])} == {"get", "list", "watch"}


# ---------------------------------------------------------------------------------------------
# the operator Deployment


def container(docs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    (deployment,) = of_kind(docs, "Deployment")
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    return c


def test_deployment_runs_two_hardened_operators_with_leader_election(helm: str, tmp_path: Path) -> None:
    docs = render(helm, tmp_path)
    (deployment,) = of_kind(docs, "Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 2
    assert spec["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}
    c = container(docs)
    assert c["command"] == ["hps"]
    assert c["args"] == ["operator", "run", "--all-namespaces", "--standalone", "--liveness=http://$(POD_IP):8080/healthz",
                         "--leader-elect", "--leader-election-id=hps-hps-operator-leader", "--lease-seconds=10"]
    env = {e["name"]: e.get("valueFrom") for e in c["env"]}
    assert env["POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["POD_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    anti = deployment["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    assert anti["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    # the leader election Role: the Lease alone, in the release namespace
    (role,) = [r for r in of_kind(docs, "Role") if r["metadata"]["name"].endswith("-leader")]
    assert role["metadata"]["namespace"] == NAMESPACE
    assert granted([role]) == {(g, r, v) for g, r, verbs in LEADER_ELECTION_PERMISSIONS for v in verbs}

    single = render(helm, tmp_path, {"leaderElection": {"enabled": False}})
    (deployment,) = of_kind(single, "Deployment")
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert "--leader-elect" not in container(single)["args"]
    assert not [r for r in of_kind(single, "Role") if r["metadata"]["name"].endswith("-leader")]
    for probe in (c["livenessProbe"], c["readinessProbe"]):
        assert probe["httpGet"] == {"path": "/healthz", "port": "probes"}
    assert {"name": "probes", "containerPort": 8080, "protocol": "TCP"} in c["ports"]
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] and sc["readOnlyRootFilesystem"] and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]} and sc["seccompProfile"] == {"type": "RuntimeDefault"}
    pod = spec["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] != 0
    assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]
    assert any(v["name"] == "tmp" and "emptyDir" in v for v in pod["volumes"])
    assert c["resources"]["requests"] and c["resources"]["limits"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["HPS_AGENT_IMAGE"] == "ghcr.io/hps-operator/hps-agent:0.1.0"
    assert env["HPS_AGENT_IMAGE_PULL_POLICY"] == "IfNotPresent"
    assert "HPS_OPERATOR_METRICS_PORT" not in env  # metrics are off by default
    assert pod["serviceAccountName"] == of_kind(docs, "ServiceAccount")[0]["metadata"]["name"]


def test_deployment_follows_non_default_values(helm: str, tmp_path: Path) -> None:
    docs = render(helm, tmp_path, VALUE_SETS["custom"])
    (deployment,) = of_kind(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    c = container(docs)
    assert c["image"] == "registry.example.com/hps/operator:1.2.3" and c["imagePullPolicy"] == "Always"
    assert c["args"][0] == "-v"
    assert pod["imagePullSecrets"] == [{"name": "regcred"}, {"name": "plain"}]
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert pod["tolerations"][0]["key"] == "dedicated"
    assert "nodeAffinity" in pod["affinity"]
    assert pod["priorityClassName"] == "system-cluster-critical"
    assert c["resources"]["limits"]["memory"] == "1Gi"
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["HPS_AGENT_IMAGE"] == "registry.example.com/hps/agent:1.2.3-cuda12"
    assert env["HPS_AGENT_IMAGE_PULL_POLICY"] == "Always"
    assert env["HPS_OPERATOR_METRICS_PORT"] == "9300" and env["EXTRA"] == "1"


def test_namespaced_mode_passes_each_namespace_to_the_operator(helm: str, tmp_path: Path) -> None:
    args = container(render(helm, tmp_path, {"watchNamespaces": ["recsys", "ads"]}))["args"]
    assert "--all-namespaces" not in args
    assert [a for a in args if a.startswith("--namespace")] == ["--namespace=recsys", "--namespace=ads"]


@pytest.mark.parametrize("values", ["default", "namespaced", "custom"])
def test_the_operator_cli_accepts_the_chart_args_and_honours_its_env(helm: str, tmp_path: Path, values: str,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """The Deployment's command line, parsed by the real ``hps`` parser with the Deployment's env set:
    every flag exists, and every variable the chart sets reaches the operator's configuration."""
    c = container(render(helm, tmp_path, VALUE_SETS[values]))

    def kubelet(text: str) -> str:  # what the kubelet does to $(VAR) in args and env values
        return text.replace("$(POD_IP)", POD_IP)

    env = {e["name"]: kubelet(e["value"]) for e in c["env"] if "value" in e}
    user_env = {e["name"] for e in VALUE_SETS[values].get("operator", {}).get("extraEnv", [])}
    known = {IMAGE_ENV, PULL_POLICY_ENV, METRICS_PORT_ENV, METRICS_ADDRESS_ENV}
    assert set(env) - user_env <= known, "the chart sets a variable the operator ignores"
    assert {e["name"]: e.get("valueFrom") for e in c["env"]}["POD_IP"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    for name in known:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert c["command"] == ["hps"]
    args = build_parser().parse_args([kubelet(a) for a in c["args"]])  # SystemExit on a flag the CLI lacks
    assert (args.command, args.verb, args.standalone) == ("operator", "run", True)
    # the probe and metrics endpoints listen on the pod's own address only
    assert args.liveness_endpoint == f"http://{POD_IP}:8080/healthz"
    expected_namespaces = VALUE_SETS[values].get("watchNamespaces", [])
    assert args.namespace == expected_namespaces and args.all_namespaces == (not expected_namespaces)
    config = operator_config(args)
    assert config.options.image == env[IMAGE_ENV]
    assert config.options.image_pull_policy == env[PULL_POLICY_ENV]
    assert config.metrics_port == (int(env[METRICS_PORT_ENV]) if METRICS_PORT_ENV in env else None)
    if METRICS_PORT_ENV in env:
        assert config.metrics_address == POD_IP
        assert {"name": "metrics", "containerPort": config.metrics_port, "protocol": "TCP"} in c["ports"]


def test_the_operator_cli_rejects_a_namespace_glob() -> None:
    """kopf's namespace scanning is off (least privilege), so a glob could only ever match nothing."""
    with pytest.raises(SystemExit):
        build_parser().parse_args(["operator", "run", "--namespace=ml-*"])


def test_existing_service_account_is_used_and_not_created(helm: str, tmp_path: Path) -> None:
    docs = render(helm, tmp_path, VALUE_SETS["existing-service-account"])
    assert not of_kind(docs, "ServiceAccount")
    (deployment,) = of_kind(docs, "Deployment")
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == "ops"
    for binding in of_kind(docs, "ClusterRoleBinding"):
        assert binding["subjects"][0]["name"] == "ops"
    assert not [
        r for r in of_kind(docs, "ClusterRole") if r["metadata"]["name"].endswith(("-editor", "-viewer"))
    ]


# ---------------------------------------------------------------------------------------------
# metrics


def test_metrics_are_off_by_default(helm: str, tmp_path: Path) -> None:
    docs = render(helm, tmp_path)
    assert not of_kind(docs, "Service") and not of_kind(docs, "ServiceMonitor")


def test_service_monitor_scrapes_the_operator_metrics_port(helm: str, tmp_path: Path) -> None:
    """ServiceMonitor has no official schema here: check it structurally and against the Service."""
    docs = render(helm, tmp_path, VALUE_SETS["service-monitor"])
    (monitor,) = of_kind(docs, "ServiceMonitor")
    (service,) = of_kind(docs, "Service")
    (deployment,) = of_kind(docs, "Deployment")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics" and endpoint["interval"] == "30s"
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] in {p["name"] for p in container(docs)["ports"]}


# ---------------------------------------------------------------------------------------------
# monitoring: PodMonitor, PrometheusRule, dashboard, and the adapter rule read metrics that exist


def exported_metric_names() -> set[str]:
    """Every series name the agents and the operator export (counters with their _total)."""
    from hps_operator.metrics import OperatorMetrics
    from prometheus_client import generate_latest
    from prometheus_client.registry import CollectorRegistry

    from node_agent.metrics import AgentCollector

    class Snapshot:
        def snapshot(self) -> dict[str, Any]:
            return {"model": "m", "server": {"lookups": 1, "keys": 1, "errors.NOT_FOUND": 1}, "degraded": False,
                    "lookup": {"tables": {"t": {"hits": 1, "misses": 1, "size": 1, "capacity_rows": 2}}},
                    "updates": {"applied_entries": 1, "lag_ms_last": 5.0, "entries_behind": 0}}  # fmt: skip

    registry = CollectorRegistry()
    registry.register(AgentCollector(Snapshot(), partition=0))  # type: ignore[arg-type]
    names = {line.split("{")[0].split(" ")[0] for line in generate_latest(registry).decode().splitlines()
             if line and not line.startswith("#")}  # fmt: skip
    # the operator's labelled series appear once a model is seen: take its families' names
    suffixes = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_count", "_sum")}
    for family in OperatorMetrics().registry.collect():
        names |= {family.name + s for s in suffixes.get(family.type, ("",))}
    return names


def test_monitoring_reads_only_metrics_the_agents_and_operator_export(helm: str, tmp_path: Path) -> None:
    import re

    docs = render(helm, tmp_path, {"monitoring": {"podMonitor": {"enabled": True}, "prometheusRule": {"enabled": True},
                                                  "grafanaDashboard": {"enabled": True}}})  # fmt: skip
    (monitor,) = of_kind(docs, "PodMonitor")
    assert monitor["spec"]["selector"]["matchLabels"] == {
        "app.kubernetes.io/component": "agent", "app.kubernetes.io/managed-by": "hps-operator"}  # fmt: skip
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"  # the agents' container port name
    (rule,) = of_kind(docs, "PrometheusRule")
    exprs = [r["expr"] for g in rule["spec"]["groups"] for r in g["rules"]]
    dashboard = next(d for d in of_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("-dashboard"))
    panels = json.loads(dashboard["data"]["hps-operator.json"])["panels"]
    exprs += [t["expr"] for p in panels for t in p["targets"]]
    recorded = {r["record"] for g in rule["spec"]["groups"] for r in g["rules"] if "record" in r}
    exported = exported_metric_names()
    for expr in exprs:
        for name in set(re.findall(r"\b(hps[a-z_:0-9]*)\b", expr)):
            assert name in exported or name in recorded, f"{name} in {expr!r} is not exported"
    alerts = {r["alert"] for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r}
    assert alerts == {"HpsModelDegraded", "HpsAgentDegraded", "HpsLowL1HitRate", "HpsUpdateLag"}


def test_the_adapter_rule_serves_the_metrics_the_hpa_and_the_operator_ask_for() -> None:
    import re

    from hps_operator.core.render import QPS_METRIC
    from hps_operator.kopf_handlers.embedding_model import HIT_METRICS

    values = yaml.safe_load((ROOT / "charts" / "hps-operator" / "monitoring" / "prometheus-adapter-values.yaml").read_text())
    (rule,) = values["rules"]["custom"]
    pattern = re.search(r'__name__=~"([^"]+)"', rule["seriesQuery"]).group(1)  # type: ignore[union-attr]
    exported = exported_metric_names()
    series = sorted(n for n in exported if re.fullmatch(pattern, n))
    assert series == ["hps_l1_hits_total", "hps_l1_misses_total", "hps_lookup_requests_total"]
    renamed = {re.sub(rule["name"]["matches"], rule["name"]["as"].replace("${1}", r"\1"), n) for n in series}
    assert renamed == {QPS_METRIC, *HIT_METRICS}
