"""Evaluate NetworkPolicies the way Kubernetes does (enough for tests, no cluster).

A connection from `src` to `dst` on a port is allowed when the sender's side
allows it as egress and the receiver's side as ingress. A pod selected by no
policy of a direction is not isolated in it; a selected pod accepts only what
one of its policies' rules allows. Peers: a `podSelector` alone means the
policy's own namespace; a `namespaceSelector` with a `podSelector` means both;
an `ipBlock` matches addresses outside the cluster.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Peer:
    """A pod (namespace set) or an address outside the cluster (namespace None)."""

    name: str
    namespace: str | None
    labels: Mapping[str, str] = field(default_factory=dict)
    ports: Mapping[str, int] = field(default_factory=dict)  # named container ports
    ip: str = ""

    def namespace_labels(self) -> dict[str, str]:
        """The labels Kubernetes puts on every namespace (its name)."""
        return {"kubernetes.io/metadata.name": self.namespace or ""}


def selects(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    """Whether a label selector matches `labels` (an empty selector matches all)."""
    selector = selector or {}
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def peer_matches(rule_peer: Mapping[str, Any], policy_namespace: str, peer: Peer) -> bool:
    """Whether one entry of a rule's `from`/`to` list matches `peer`."""
    if "ipBlock" in rule_peer:
        if peer.namespace is not None:
            return False
        block = rule_peer["ipBlock"]
        address = ipaddress.ip_address(peer.ip)
        inside = address in ipaddress.ip_network(block["cidr"])
        return inside and not any(
            address in ipaddress.ip_network(e) for e in block.get("except") or []
        )
    if peer.namespace is None:
        return False
    if "namespaceSelector" in rule_peer:
        if not selects(rule_peer["namespaceSelector"], peer.namespace_labels()):
            return False
    elif peer.namespace != policy_namespace:
        return False
    return selects(rule_peer.get("podSelector"), peer.labels)


def port_matches(
    rule_ports: Sequence[Mapping[str, Any]] | None, port: int, protocol: str, target: Peer
) -> bool:
    """Whether a rule's `ports` admit `port`/`protocol` on `target` (named ports: its own)."""
    if not rule_ports:
        return True
    for entry in rule_ports:
        if entry.get("protocol", "TCP") != protocol:
            continue
        want = entry.get("port")
        if want is None:
            return True
        number = target.ports.get(want) if isinstance(want, str) else want
        if number == port or (number is not None and number <= port <= entry.get("endPort", 0)):
            return True
    return False


def _types(policy: Mapping[str, Any]) -> list[str]:
    spec = policy["spec"]
    default = ["Ingress", "Egress"] if "egress" in spec else ["Ingress"]
    return list(spec.get("policyTypes") or default)


def side_allows(
    policies: Sequence[Mapping[str, Any]],
    namespace: str,
    pod: Peer,
    other: Peer,
    port: int,
    protocol: str,
    direction: str,
) -> bool:
    """Whether `pod`'s policies let it receive from (Ingress) or send to (Egress) `other`."""
    key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    target = pod if direction == "Ingress" else other
    isolating = [
        p
        for p in policies
        if pod.namespace == namespace
        and direction in _types(p)
        and selects(p["spec"]["podSelector"], pod.labels)
    ]
    if not isolating:
        return True
    for policy in isolating:
        for rule in policy["spec"].get(key) or []:
            peers = rule.get(peers_key)
            if peers and not any(peer_matches(p, namespace, other) for p in peers):
                continue
            if port_matches(rule.get("ports"), port, protocol, target):
                return True
    return False


def connects(
    policies: Sequence[Mapping[str, Any]],
    namespace: str,
    src: Peer,
    dst: Peer,
    port: int,
    protocol: str = "TCP",
) -> bool:
    """Whether `src` may open a connection to `dst` on `port` under `policies`."""
    sending = src.namespace != namespace or side_allows(
        policies, namespace, src, dst, port, protocol, "Egress"
    )
    receiving = dst.namespace != namespace or side_allows(
        policies, namespace, dst, src, port, protocol, "Ingress"
    )
    return sending and receiving
