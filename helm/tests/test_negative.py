"""Each check can fail: broken renders (by values or by editing the output) are reported."""

from __future__ import annotations

import copy

import pytest

import chartlib
from conftest import rendered


def broken(value_set: str, edit) -> chartlib.Render:
    r = copy.deepcopy(rendered(value_set))
    edit(r)
    return r


def deployment(r, suffix="-edge"):
    return next(o for o in r.kind("Deployment") if o.name.endswith(suffix)).doc


def container(r, suffix="-edge"):
    return deployment(r, suffix)["spec"]["template"]["spec"]["containers"][0]


def test_probe_path_that_the_service_does_not_serve():
    r = broken("default", lambda r: container(r)["readinessProbe"]["httpGet"].update(path="/ready"))
    assert any("/ready is not served" in p for p in chartlib.check_probes(r))


def test_probe_paths_come_from_the_source():
    # Were /readyz gone from admin.rs, the chart's readiness probes would be reported.
    paths = chartlib.admin_paths() - {"/readyz"}
    assert any("/readyz is not served" in p for p in chartlib.check_probes(rendered("default"), paths))


def test_probe_on_the_traffic_port():
    r = broken("default", lambda r: container(r, "-gateway")["livenessProbe"]["httpGet"].update(port="http"))
    assert any("not the admin port" in p for p in chartlib.check_probes(r))


def test_service_port_mismatch():
    r = broken("default", lambda r: r.get("Service", "orders-edge-gateway").doc["spec"]["ports"][0].update(targetPort=8081))
    assert any("targetPort 8081" in p for p in chartlib.check_ports(r))


def test_container_port_differs_from_listen_address():
    r = chartlib.render("default", {"gateway": {"extraEnv": [{"name": "GATEWAY_ADMIN_LISTEN", "value": "0.0.0.0:9999"}]}})
    assert any("listens on 9999" in p for p in chartlib.check_ports(r))


def test_network_policy_port_mismatch():
    def edit(r):
        np = r.get("NetworkPolicy", "orders-edge-gateway").doc
        np["spec"]["ingress"][0]["ports"][0]["port"] = "https"
    assert any("ingress port https" in p for p in chartlib.check_ports(broken("default", edit)))


def test_network_policy_egress_to_a_wrong_gateway_port():
    r = chartlib.render("default", {"gateway": {"ports": {"http": 8080}}})
    r = copy.deepcopy(r)
    r.get("NetworkPolicy", "orders-edge-edge").doc["spec"]["egress"][0]["ports"][0]["port"] = 8081
    assert any("egress port 8081" in p for p in chartlib.check_ports(r))


def test_service_monitor_port_mismatch():
    r = broken("openshift-keda", lambda r: r.get("ServiceMonitor", "orders-edge-gateway").doc["spec"]["endpoints"][0].update(port="metrics"))
    assert any("endpoint port metrics" in p for p in chartlib.check_ports(r))


def test_service_monitor_scraping_the_traffic_port():
    def edit(r):
        svc = r.get("Service", "orders-edge-gateway-admin").doc
        svc["spec"]["ports"][0]["targetPort"] = "http"
    assert any("not the admin port" in p for p in chartlib.check_ports(broken("openshift-keda", edit)))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c, s: c["securityContext"].pop("readOnlyRootFilesystem"), "readOnlyRootFilesystem"),
        (lambda c, s: c["securityContext"].update(allowPrivilegeEscalation=True), "allowPrivilegeEscalation"),
        (lambda c, s: c["securityContext"]["capabilities"].update(drop=["NET_RAW"]), "drop ALL"),
        (lambda c, s: c["securityContext"]["capabilities"].update(add=["NET_BIND_SERVICE"]), "capabilities added"),
        (lambda c, s: s["securityContext"].pop("runAsNonRoot"), "runAsNonRoot"),
        (lambda c, s: s["securityContext"].update(runAsUser=1000), "runAsUser is fixed"),
        (lambda c, s: s["securityContext"].pop("seccompProfile") and c["securityContext"].pop("seccompProfile"), "seccompProfile"),
        (lambda c, s: c["resources"].pop("limits"), "no limits.cpu"),
        (lambda c, s: s.update(automountServiceAccountToken=True), "automountServiceAccountToken"),
        (lambda c, s: c["volumeMounts"][1].update(subPath="default.toml"), "subPath"),
    ],
)
def test_security_context_violations(edit, message):
    target = "-edge" if message == "subPath" else "-worker-persist"

    def apply(r):
        spec = deployment(r, target)["spec"]["template"]["spec"]
        edit(spec["containers"][0], spec)
    problems = chartlib.check_security(broken("default", apply))
    assert any(message in p for p in problems), problems


def test_policy_configmap_without_default():
    def edit(r):
        cm = next(o for o in r.kind("ConfigMap") if o.name.endswith("-policies")).doc
        cm["data"] = {"other.toml": cm["data"]["default.toml"]}
    problems = chartlib.check_policy_configmap(broken("default", edit))
    assert any("no policies/default.*" in p for p in problems), problems


def test_policy_mount_with_subpath_or_checksum():
    def edit(r):
        c = container(r)
        next(m for m in c["volumeMounts"] if m["name"] == "policies")["subPath"] = "default.toml"
        deployment(r)["spec"]["template"]["metadata"]["annotations"]["checksum/policies"] = "x"
    problems = chartlib.check_policy_configmap(broken("default", edit))
    assert any("subPath" in p for p in problems) and any("checksum/policies" in p for p in problems), problems


def test_env_typo_is_reported():
    r = chartlib.render("default", {"edge": {"extraEnv": [{"name": "EDGE_POLICY__RELOAD_INTERVAL", "value": "5"}]},
                                    "gateway": {"extraEnv": [{"name": "WORKERS_JOBS", "value": "x"}]}})
    problems = chartlib.check_env_keys(r)
    assert any("no key policy.reload_interval" in p for p in problems), problems
    assert any("belongs to workers" in p for p in problems), problems


def test_service_links_are_reported():
    r = broken("default", lambda r: deployment(r)["spec"]["template"]["spec"].update(enableServiceLinks=True))
    assert any("enableServiceLinks" in p for p in chartlib.check_env_keys(r))


def test_short_termination_grace_is_reported():
    r = broken("default", lambda r: deployment(r, "-gateway")["spec"]["template"]["spec"].update(terminationGracePeriodSeconds=25))
    assert any("terminationGracePeriodSeconds 25" in p for p in chartlib.check_termination(r))


def test_session_affinity_removed():
    r = broken("default", lambda r: r.get("Service", "orders-edge-edge").doc["spec"].pop("sessionAffinity"))
    assert any("sessionAffinity" in p for p in chartlib.check_session_affinity(r))
    r = broken("default", lambda r: r.get("Service", "orders-edge-edge").doc["spec"].update(externalTrafficPolicy="Cluster"))
    assert any("externalTrafficPolicy" in p for p in chartlib.check_session_affinity(r))


def test_open_network_policies_are_reported():
    def edit(r):
        gw = r.get("NetworkPolicy", "orders-edge-gateway").doc
        gw["spec"]["ingress"][0].pop("from")
        wk = r.get("NetworkPolicy", "orders-edge-worker-validate").doc
        wk["spec"]["egress"].append({"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]})
        ed = r.get("NetworkPolicy", "orders-edge-edge").doc
        ed["spec"]["ingress"][1]["from"] = [{"namespaceSelector": {}}]
    problems = chartlib.check_network_policies(broken("default", edit))
    assert any("gateway reachable from more than the edge" in p for p in problems), problems
    assert any("egress rule without ports" in p for p in problems), problems
    assert any("admin port open" in p for p in problems), problems


def test_kubernetes_schema_catches_a_misspelt_field():
    r = broken("default", lambda r: container(r).update(readinesProbe={}))
    assert any("readinesProbe" in p for p in chartlib.kube_validate(r, "1.30"))


def test_kubernetes_schema_catches_a_removed_api():
    r = broken("default", lambda r: next(o for o in r.kind("PodDisruptionBudget")).doc.update(apiVersion="policy/v1beta1"))
    assert any("no schema" in p for p in chartlib.kube_validate(r, "1.30"))


@pytest.mark.parametrize(
    "value_set, kind, edit, message",
    [
        ("openshift-keda", "Route", lambda d: d["spec"]["to"].update(name="nope"), "rendered Service"),
        ("openshift-keda", "ScaledObject", lambda d: d["spec"]["triggers"][0]["metadata"].update(lagThreshold=100), "not a string"),
        ("openshift-keda", "ScaledObject", lambda d: d["spec"]["scaleTargetRef"].update(name="nope"), "scaleTargetRef"),
        ("openshift-keda", "ServiceMonitor", lambda d: d["spec"].update(endpoints=[{"port": 9102}]), "named ports"),
        ("openshift-keda", "PrometheusRule", lambda d: d["spec"]["groups"][0]["rules"].append({"alert": "X"}), "needs alert or record"),
        ("kubernetes-ingress", "Certificate", lambda d: d["spec"].pop("issuerRef"), "issuerRef.name"),
    ],
)
def test_custom_resource_checks_fail(value_set, kind, edit, message):
    r = broken(value_set, lambda r: edit(r.kind(kind)[0].doc))
    problems = chartlib.check_crds(r)
    assert any(message in p for p in problems), problems


def test_unknown_custom_resource_is_reported():
    r = broken("default", lambda r: r.objects.append(chartlib.Obj("x", {"apiVersion": "example.com/v1", "kind": "Thing", "metadata": {"name": "t", "namespace": "n"}, "spec": {}})))
    assert any("without a check" in p for p in chartlib.check_crds(r))


def test_checkov_reports_a_container_without_limits():
    r = broken("minimal", lambda r: container(r, "-gateway")["resources"].pop("limits"))
    failed, _, _ = chartlib.checkov_scan(r)
    assert any(f.startswith("CKV_K8S_11") for f in failed), failed


def test_checkov_reports_an_unjustified_finding():
    r = broken("minimal", lambda r: deployment(r, "-gateway")["metadata"]["annotations"].pop("checkov.io/skip1"))
    failed, _, _ = chartlib.checkov_scan(r)
    assert any(f.startswith("CKV_K8S_40") for f in failed), failed
