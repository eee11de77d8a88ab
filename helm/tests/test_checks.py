"""The chart's promises, checked on every value set's render."""

from __future__ import annotations

import pytest

import chartlib


def test_probes_use_real_admin_paths(r):
    assert chartlib.services_using_shared_admin() == set(chartlib.SERVICES), "a service has its own admin router"
    problems = chartlib.check_probes(r)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    "check",
    [
        chartlib.check_ports,
        chartlib.check_security,
        chartlib.check_policy_configmap,
        chartlib.check_env_keys,
        chartlib.check_termination,
        chartlib.check_session_affinity,
        chartlib.check_network_policies,
    ],
    ids=lambda check: check.__name__.removeprefix("check_"),
)
def test_chart_check(r, check):
    """Ports agree, restricted security, the policy ConfigMap, env names that are config keys, grace periods
    longer than drains, the edge's session affinity, network policies: each check lists its problems."""
    problems = check(r)
    assert not problems, "\n".join(problems)


def test_pdbs_and_spread(r):
    for w in chartlib.workloads(r):
        labels = chartlib.pod_labels(w)
        comp = labels["app.kubernetes.io/component"]
        pdb_on = (r.values.get("edge", {}) if comp == "edge" else r.values.get("gateway", {}) if comp == "gateway"
                  else r.values.get("workers", {}).get("jobs", {}).get(comp, {})).get("pdb", {}).get("enabled", True)
        pdbs = [p for p in r.kind("PodDisruptionBudget") if chartlib.matches(p.doc["spec"]["selector"], labels)]
        assert len(pdbs) == (1 if pdb_on else 0), f"{w}: {pdbs}"
        spread = chartlib.pod_spec(w).get("topologySpreadConstraints") or []
        assert any(c["topologyKey"] == "kubernetes.io/hostname" and chartlib.matches(c["labelSelector"], labels) for c in spread), w


def test_scalers_target_rendered_deployments(r):
    deployments = {o.name for o in r.kind("Deployment")}
    targets = [o.doc["spec"]["scaleTargetRef"]["name"] for o in r.kind("HorizontalPodAutoscaler") + r.kind("ScaledObject")]
    assert len(targets) == len(set(targets)), "a Deployment has two scalers"
    assert set(targets) <= deployments
    for d in r.kind("Deployment"):
        if d.name in targets:
            assert "replicas" not in d.doc["spec"], f"{d}: replicas set although scaled (a helm upgrade would reset it)"


def test_notes_say_how_to_reach_and_where_dashboards_are(r):
    assert "How to reach the service" in r.notes
    assert "Dashboards" in r.notes
    expose = r.values.get("edge", {}).get("expose", "loadBalancer")
    assert {"route": "Route", "ingress": "Ingress", "loadBalancer": "LoadBalancer", "none": "port-forward"}[expose] in r.notes
