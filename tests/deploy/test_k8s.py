"""The Kubernetes overlays, checked offline.

Every overlay renders with kustomize and validates strictly against the Kubernetes schemas
(kubernetes-validate; the KEDA ScaledObject, a custom resource it has no schema for, is checked
here field by field). The NetworkPolicies are evaluated the way a cluster enforces them, and
the calls they allow must be exactly the calls the architecture makes.
"""

from __future__ import annotations

import copy
import ipaddress
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from foredeck_orchestrator.adapters.keys import Keys

ROOT = Path(__file__).resolve().parents[2]

Manifests = dict[str, list[dict[str, Any]]]

FOREDECK = (
    "gateway",
    "orchestrator-api",
    "orchestrator-worker",
    "llmrouter",
    "toolrunner",
    "memory",
)
GRPC, METRICS, OTLP, DNS = 50051, 9464, 4317, 53


def objects(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: str(e.get("value", "")) for e in container.get("env", [])}


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_overlay_validates_strictly(overlay: str, rendered: dict[str, str], find_tool: Any) -> None:
    result = subprocess.run(
        [find_tool("kubernetes-validate"), "--strict", "--quiet", "-"],
        input=rendered[overlay],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    output = (result.stdout + result.stderr).strip().splitlines()
    assert result.returncode == 0, "\n".join(output)
    # The only objects without a schema are KEDA's, checked below.
    unknown = [line for line in output if "Couldn't find schema" in line]
    assert all("ScaledObject" in line for line in unknown), unknown
    assert not [line for line in output if "ERROR" in line]


def test_every_overlay_is_tested(manifests: Manifests) -> None:
    assert set(manifests) == {"dev", "prod"}


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_deployments(overlay: str, manifests: Manifests) -> None:
    docs = manifests[overlay]
    deployments = objects(docs, "Deployment")
    accounts = objects(docs, "ServiceAccount")
    budgets = objects(docs, "PodDisruptionBudget")
    assert set(FOREDECK) <= set(deployments)
    for name in FOREDECK:
        pod = deployments[name]["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        env = env_of(container)
        prefix = f"FOREDECK_{name.split('-')[0].upper()}_"
        # Native gRPC probes on the service's port.
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"]["port"] == GRPC, (name, probe)
        assert env[f"{prefix}PORT"] == str(GRPC)
        assert env[f"{prefix}METRICS_PORT"] == str(METRICS)
        # The pod outlives the service's own stop: drain, then in-flight calls.
        drain = float(env.get(f"{prefix}DRAIN_SECONDS", "0"))
        grace = float(env.get(f"{prefix}GRACE_PERIOD_SECONDS", "10"))
        assert pod["terminationGracePeriodSeconds"] > drain + grace, name
        assert drain > 0, f"{name}: endpoints need time to drop the pod"
        resources = container["resources"]
        assert resources["requests"]["cpu"]
        assert resources["requests"]["memory"]
        assert resources["limits"]["memory"]
        assert pod["serviceAccountName"] == name
        assert name in accounts
        assert accounts[name].get("automountServiceAccountToken") is False
        assert pod["securityContext"]["runAsNonRoot"] is True
        selector = deployments[name]["spec"]["selector"]["matchLabels"]
        assert any(b["spec"]["selector"]["matchLabels"] == selector for b in budgets.values()), (
            f"{name} has no PodDisruptionBudget"
        )
    # The orchestrator's two roles run one image.
    images = {
        deployments[n]["spec"]["template"]["spec"]["containers"][0]["image"] for n in FOREDECK
    }
    api, worker = (
        deployments[n]["spec"]["template"]["spec"]["containers"][0] for n in FOREDECK[1:3]
    )
    assert api["image"] == worker["image"]
    assert len(images) == 5
    assert api["args"] == ["-m", "foredeck_orchestrator"]
    assert worker["args"] == ["-m", "foredeck_orchestrator.worker"]


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_toolrunner_pod_is_hardened(overlay: str, manifests: Manifests) -> None:
    pod = objects(manifests[overlay], "Deployment")["toolrunner"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    context = container["securityContext"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context.get("privileged", False) is False
    assert context["capabilities"]["drop"] == ["ALL"]
    assert not context["capabilities"].get("add")
    assert context["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["automountServiceAccountToken"] is False
    assert not pod.get("hostNetwork")
    assert not pod.get("hostPID")


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_scaling(overlay: str, manifests: Manifests) -> None:
    docs = manifests[overlay]
    hpas = objects(docs, "HorizontalPodAutoscaler")
    assert set(hpas) == {"gateway", "orchestrator-api", "llmrouter", "toolrunner", "memory"}
    for hpa in hpas.values():
        (metric,) = hpa["spec"]["metrics"]
        assert metric["resource"]["name"] == "cpu"
        assert hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    (scaled,) = objects(docs, "ScaledObject").values()
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    spec = scaled["spec"]
    assert spec["scaleTargetRef"]["name"] == "orchestrator-worker"
    assert "orchestrator-worker" in objects(docs, "Deployment")
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    namespace = scaled["metadata"]["namespace"]
    streams = set()
    for trigger in spec["triggers"]:
        assert trigger["type"] == "redis-streams"
        meta = trigger["metadata"]
        assert all(isinstance(v, str) for v in meta.values()), "KEDA metadata values are strings"
        assert meta["address"] == f"redis.{namespace}.svc.cluster.local:6379"
        assert int(meta["lagCount"]) > 0
        assert meta["consumerGroup"]
        streams.add(meta["stream"])
    # The orchestrator's own key names, so a renamed queue fails here rather than in a cluster.
    keys = Keys()
    assert streams == set(keys.queues())
    assert {t["metadata"]["consumerGroup"] for t in spec["triggers"]} == {keys.group}


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_secrets_carry_the_keys(overlay: str, manifests: Manifests) -> None:
    docs = manifests[overlay]
    referenced = {
        (e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
        for d in objects(docs, "Deployment").values()
        for c in d["spec"]["template"]["spec"]["containers"]
        for e in c.get("env", [])
        if "secretKeyRef" in e.get("valueFrom", {})
    }
    assert {
        ("foredeck-signing-keys", "principal-keys"),
        ("foredeck-signing-keys", "delegation-keys"),
        ("foredeck-provider-keys", "anthropic-api-key"),
        ("foredeck-provider-keys", "openai-api-key"),
    } <= referenced
    secrets = objects(docs, "Secret")
    if overlay == "prod":
        # Created outside git, so an apply never overwrites them.
        assert secrets == {}
    else:
        provided = {(name, key) for name, s in secrets.items() for key in s.get("data", {})}
        assert referenced <= provided


# --- NetworkPolicy evaluation -------------------------------------------------------------


@dataclass(frozen=True)
class Peer:
    """A pod (in or out of the namespace) or an address outside the cluster."""

    name: str
    namespace: str = ""
    labels: tuple[tuple[str, str], ...] = ()
    ip: str = ""
    ports: tuple[int, ...] = ()

    @property
    def label_map(self) -> dict[str, str]:
        return dict(self.labels)

    @property
    def namespace_labels(self) -> dict[str, str]:
        return {"kubernetes.io/metadata.name": self.namespace}


def matches(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    if selector is None:
        return True
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions", []):
        present, value = expression["key"] in labels, labels.get(expression["key"])
        operator = expression["operator"]
        if operator == "In" and value not in expression["values"]:
            return False
        if operator == "NotIn" and value in expression["values"]:
            return False
        if operator == "Exists" and not present:
            return False
        if operator == "DoesNotExist" and present:
            return False
    return True


def peer_matches(rule_peer: dict[str, Any], peer: Peer, namespace: str) -> bool:
    if "ipBlock" in rule_peer:
        if not peer.ip:
            return False
        block = rule_peer["ipBlock"]
        address = ipaddress.ip_address(peer.ip)
        return address in ipaddress.ip_network(block["cidr"]) and not any(
            address in ipaddress.ip_network(c) for c in block.get("except", [])
        )
    if not peer.namespace:
        return False
    if "namespaceSelector" in rule_peer:
        if not matches(rule_peer["namespaceSelector"], peer.namespace_labels):
            return False
    elif peer.namespace != namespace:
        return False
    return matches(rule_peer.get("podSelector"), peer.label_map)


def rule_allows(rule: dict[str, Any], key: str, peer: Peer, port: int, namespace: str) -> bool:
    ports = rule.get("ports")
    if ports and not any(p.get("port") in (None, port) for p in ports):
        return False
    peers = rule.get(key)
    return not peers or any(peer_matches(p, peer, namespace) for p in peers)


@dataclass
class Cluster:
    namespace: str
    policies: list[dict[str, Any]]
    peers: list[Peer] = field(default_factory=list)

    def selecting(self, peer: Peer, policy_type: str) -> list[dict[str, Any]]:
        if peer.namespace != self.namespace:
            return []
        return [
            p
            for p in self.policies
            if policy_type in p["spec"]["policyTypes"]
            and matches(p["spec"]["podSelector"], peer.label_map)
        ]

    def allowed(self, source: Peer, target: Peer, port: int) -> bool:
        egress = self.selecting(source, "Egress")
        if egress and not any(
            rule_allows(rule, "to", target, port, self.namespace)
            for p in egress
            for rule in p["spec"].get("egress", [])
        ):
            return False
        ingress = self.selecting(target, "Ingress")
        return not ingress or any(
            rule_allows(rule, "from", source, port, self.namespace)
            for p in ingress
            for rule in p["spec"].get("ingress", [])
        )

    def edges(self) -> set[tuple[str, str, int]]:
        return {
            (source.name, target.name, port)
            for source in self.peers
            for target in self.peers
            if source is not target
            for port in target.ports
            if self.allowed(source, target, port)
        }


WORKLOAD_PORTS = {
    **{name: (GRPC, METRICS) for name in FOREDECK},
    "otel-collector": (OTLP,),
    "redis": (6379,),
    "qdrant": (6333, 6334),
    "neo4j": (7687,),
}


def cluster(docs: list[dict[str, Any]]) -> Cluster:
    namespace = next(d["metadata"]["namespace"] for d in docs if d["kind"] == "Deployment")
    peers = []
    for kind in ("Deployment", "StatefulSet"):
        for name, workload in objects(docs, kind).items():
            labels = workload["spec"]["template"]["metadata"]["labels"]
            peers.append(
                Peer(name, namespace, tuple(sorted(labels.items())), "", WORKLOAD_PORTS[name])
            )
    # What lives outside the namespace: Prometheus, cluster DNS, KEDA's operator, the trace
    # backend, the internet (a public address), and another namespace's pods.
    peers += [
        Peer("prometheus", "monitoring", (("app.kubernetes.io/name", "prometheus"),)),
        Peer("kube-dns", "kube-system", (("k8s-app", "kube-dns"),), ports=(DNS,)),
        Peer("keda-operator", "keda", (("app", "keda-operator"),)),
        Peer("trace-backend", "observability", (("app", "jaeger"),), ports=(OTLP,)),
        Peer("other-namespace", "other", (("app.kubernetes.io/name", "redis"),), ports=(6379,)),
        Peer("internet", ip="203.0.113.7", ports=(80, 443, 6379)),
        Peer("metadata-service", ip="169.254.169.254", ports=(80, 443)),
        Peer("cluster-internal", ip="10.1.2.3", ports=(443,)),
    ]
    return Cluster(namespace, list(objects(docs, "NetworkPolicy").values()), peers)


def architecture(net: Cluster) -> set[tuple[str, str, int]]:
    """The calls Foredeck makes (deploy/k8s/base/network-policies.yaml draws them)."""
    # The gateway is the public edge: anything outside the namespace may call it.
    edges = {(p.name, "gateway", GRPC) for p in net.peers if p.namespace != net.namespace}
    edges |= {
        ("gateway", "orchestrator-api", GRPC),
        ("gateway", "redis", 6379),
        ("orchestrator-api", "redis", 6379),
        ("orchestrator-worker", "redis", 6379),
        ("orchestrator-worker", "llmrouter", GRPC),
        ("orchestrator-worker", "toolrunner", GRPC),
        ("orchestrator-worker", "memory", GRPC),
        ("memory", "llmrouter", GRPC),
        ("memory", "redis", 6379),
        ("memory", "neo4j", 7687),
        ("memory", "qdrant", 6333),
        ("memory", "qdrant", 6334),
        ("llmrouter", "redis", 6379),
        ("llmrouter", "internet", 443),
        ("toolrunner", "redis", 6379),
        ("keda-operator", "redis", 6379),
        ("otel-collector", "trace-backend", OTLP),
    }
    edges |= {(name, "otel-collector", OTLP) for name in FOREDECK}
    edges |= {("prometheus", name, METRICS) for name in FOREDECK}
    return edges


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_network_policies_allow_exactly_the_architecture(
    overlay: str, manifests: Manifests
) -> None:
    docs = manifests[overlay]
    net = cluster(docs)
    policies = objects(docs, "NetworkPolicy")
    deny = policies["default-deny-all"]["spec"]
    assert deny["podSelector"] == {}
    assert set(deny["policyTypes"]) == {"Ingress", "Egress"}
    assert "ingress" not in deny
    assert "egress" not in deny

    edges = net.edges()
    in_namespace = {p.name for p in net.peers if p.namespace == net.namespace}
    dns = {(s, t, p) for s, t, p in edges if t == "kube-dns"}
    assert {(s, t, p) for s, t, p in dns if s in in_namespace} == {
        (name, "kube-dns", DNS) for name in in_namespace
    }
    # Calls that start outside the namespace land on pods no policy of ours governs (their
    # own namespaces' policies do); only those into the namespace are ours to check.
    ours = {(s, t, p) for s, t, p in edges - dns if s in in_namespace or t in in_namespace}
    expected = architecture(net)
    assert ours - expected == set(), "allowed, but not a call the architecture makes"
    assert expected - ours == set(), "a call the architecture makes is blocked"


def test_toolrunner_egress_is_opt_in(find_tool: Any, tmp_path: Path) -> None:
    """With the toolrunner-egress component the tool runner reaches public HTTP(S), nothing more."""
    (tmp_path / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\n"
        "kind: Kustomization\n"
        f"resources: [{os.path.relpath(ROOT / 'deploy/k8s/overlays/dev', tmp_path)}]\n"
        "components: "
        f"[{os.path.relpath(ROOT / 'deploy/k8s/components/toolrunner-egress', tmp_path)}]\n"
    )
    result = subprocess.run(
        [find_tool("kubectl"), "kustomize", str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    net = cluster([d for d in yaml.safe_load_all(result.stdout) if d])
    edges = net.edges()
    added = {(s, t, p) for s, t, p in edges if s == "toolrunner" and t != "kube-dns"} - {
        (s, t, p) for s, t, p in architecture(net) if s == "toolrunner"
    }
    assert added == {("toolrunner", "internet", 80), ("toolrunner", "internet", 443)}


def test_the_edge_check_notices_a_widened_or_missing_rule(manifests: Manifests) -> None:
    docs = copy.deepcopy(manifests["dev"])
    policies = objects(docs, "NetworkPolicy")
    # The tool runner may now reach any address; memory loses Qdrant.
    policies["toolrunner"]["spec"]["egress"].append({"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]})
    memory = policies["memory"]["spec"]["egress"]
    memory[:] = [
        r
        for r in memory
        if r["to"][0]["podSelector"]["matchLabels"].get("app.kubernetes.io/name") != "qdrant"
    ]
    net = cluster(docs)
    edges = net.edges()
    assert ("toolrunner", "metadata-service", 80) in edges - architecture(net)
    assert ("memory", "qdrant", 6333) in architecture(net) - edges


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_only_the_orchestrator_and_the_services_it_calls_hold_delegation_keys(
    overlay: str, manifests: Manifests
) -> None:
    holders = {
        name
        for name, d in objects(manifests[overlay], "Deployment").items()
        for c in d["spec"]["template"]["spec"]["containers"]
        for e in c.get("env", [])
        if e.get("valueFrom", {}).get("secretKeyRef", {}).get("key") == "delegation-keys"
    }
    assert holders == set(FOREDECK) - {"gateway"}


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_every_foredeck_image_is_built_by_a_dockerfile(overlay: str, manifests: Manifests) -> None:
    images = {
        c["image"].partition(":")[0]
        for d in objects(manifests[overlay], "Deployment").values()
        for c in d["spec"]["template"]["spec"]["containers"]
        if c["image"].startswith("foredeck/")
    }
    assert images
    for image in images:
        assert (ROOT / "services" / image.removeprefix("foredeck/") / "Dockerfile").is_file()
    tags = {
        c["image"].partition(":")[2]
        for d in objects(manifests[overlay], "Deployment").values()
        for c in d["spec"]["template"]["spec"]["containers"]
        if c["image"].startswith("foredeck/")
    }
    # One release of the platform at a time, never a moving tag in production.
    assert len(tags) == 1
    if overlay == "prod":
        assert tags != {"latest"}
        assert tags != {"dev"}
