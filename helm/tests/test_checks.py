"""The chart's promises, checked on every value set's render."""

from __future__ import annotations

import chartlib


def test_probes_use_real_admin_paths(r):
    assert chartlib.services_using_shared_admin() == set(chartlib.SERVICES), "a service has its own admin router"
    problems = chartlib.check_probes(r)
    assert not problems, "\n".join(problems)


def test_ports_agree(r):
    problems = chartlib.check_ports(r)
    assert not problems, "\n".join(problems)


def test_restricted_security(r):
    problems = chartlib.check_security(r)
    assert not problems, "\n".join(problems)


def test_policy_configmap(r):
    problems = chartlib.check_policy_configmap(r)
    assert not problems, "\n".join(problems)


def test_env_names_are_config_keys(r):
    problems = chartlib.check_env_keys(r)
    assert not problems, "\n".join(problems)


def test_termination_grace_exceeds_drain(r):
    problems = chartlib.check_termination(r)
    assert not problems, "\n".join(problems)


def test_edge_session_affinity(r):
    problems = chartlib.check_session_affinity(r)
    assert not problems, "\n".join(problems)


def test_network_policies(r):
    problems = chartlib.check_network_policies(r)
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
