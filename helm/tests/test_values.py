"""Values: wrong ones fail at render with a clear message; switches do what they say."""

from __future__ import annotations

import re

import pytest
import yaml

import helm_python as helm

import chartlib
from conftest import rendered


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"edge": {"replicas": 0}}, r"/edge/replicas.*minimum"),
        ({"edge": {"expose": "nodePort"}}, r"/edge/expose.*must be one of"),
        ({"edge": {"route": {"termination": "edge"}}}, r"/edge/route/termination"),
        ({"edge": {"resources": {"limits": None}}}, r"/edge/resources.*limits"),
        ({"gateway": {"auth": {"issuer": "keycloak"}}}, r"/gateway/auth/issuer.*pattern"),
        ({"gateway": {"ports": {"http": 70000}}}, r"/gateway/ports/http.*maximum"),
        ({"kafka": {"brokers": "kafka"}}, r"/kafka/brokers.*pattern"),
        ({"kafka": {"topics": {"commands": {"partitions": 0}}}}, r"/kafka/topics/commands/partitions.*minimum"),
        ({"workers": {"rules": {"currencies": ["euro"]}}}, r"/workers/rules/currencies/0.*pattern"),
        ({"workers": {"jobs": {"sweep": {}}}}, r"additional properties 'sweep'"),
        ({"edge": {"image": {"digest": "latest"}}}, r"/edge/image/digest.*pattern"),
        ({"edge": {"policies": {"files": {"extra.conf": "x"}}}}, r"'extra.conf' does not match pattern .*toml"),
        ({"edge": {"limits": {"maxHeaders": 300}}}, r"/edge/limits/maxHeaders.*maximum"),
        ({"edge": {"limits": {"maxConnections": 0}}}, r"/edge/limits/maxConnections.*minimum"),
        ({"otel": {"enabled": True}}, r"/otel/endpoint.*minLength"),
        ({"database": {"url": "mysql://x"}}, r"/database/url.*pattern"),
        ({"edgeReplicas": 3}, r"additional properties 'edgeReplicas'"),
        ({"image": {"pullPolicy": "Sometimes"}}, r"/image/pullPolicy"),
    ],
)
def test_schema_rejects_wrong_values(extra, message):
    with pytest.raises(helm.HelmValuesError) as e:
        chartlib.render("default", extra)
    assert re.search(message, str(e.value), re.S), str(e.value)


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"edge": {"tls": {"existingSecret": "x", "openshiftServiceCA": True}}}, "set only one of"),
        ({"edge": {"tls": {"certificate": {"enabled": True}}}}, "issuerRef.name is required"),
        ({"edge": {"expose": "route", "route": {"termination": "reencrypt"}}}, "router must trust"),
        ({"edge": {"terminationGracePeriodSeconds": 15}}, r"edge.terminationGracePeriodSeconds \(15\) must exceed .* \(20\)"),
        ({"gateway": {"terminationGracePeriodSeconds": 30}}, r"gateway.terminationGracePeriodSeconds \(30\) must exceed"),
        ({"database": {"existingSecret": {"name": ""}, "url": ""}}, "set database.existingSecret.name"),
    ],
)
def test_inconsistent_values_fail_with_a_message(extra, message):
    with pytest.raises(helm.HelmRenderError) as e:
        chartlib.render("default", extra)
    assert re.search(message, str(e.value)), str(e.value)


@pytest.mark.parametrize("job, topic", [("validate", "commands"), ("persist", "validated")])
@pytest.mark.parametrize("mode", ["replicas", "hpa", "keda"])
def test_replicas_above_partitions_fail(job, topic, mode):
    parts = 4
    extra = {"kafka": {"topics": {topic: {"partitions": parts}}}, "keda": {"enabled": mode == "keda"}}
    # at the bound: renders
    ok = {"replicas": {"replicas": parts}, "hpa": {"autoscaling": {"maxReplicas": parts}}, "keda": {"keda": {"maxReplicas": parts}}}[mode]
    over = {"replicas": {"replicas": parts + 1}, "hpa": {"autoscaling": {"maxReplicas": parts + 1}},
            "keda": {"keda": {"maxReplicas": parts + 1}}}[mode]
    low = {"replicas": 1, "autoscaling": {"maxReplicas": parts}, "keda": {"maxReplicas": parts}}
    r = chartlib.render("default", chartlib.deep_merge(extra, {"workers": {"jobs": {job: chartlib.deep_merge(low, ok)}}}))
    scaler = [o for o in r.kind("ScaledObject" if mode == "keda" else "HorizontalPodAutoscaler") if o.name.endswith(job)]
    if mode != "replicas":
        assert scaler and (scaler[0].doc["spec"].get("maxReplicaCount") or scaler[0].doc["spec"].get("maxReplicas")) == parts
    with pytest.raises(helm.HelmRenderError) as e:
        chartlib.render("default", chartlib.deep_merge(extra, {"workers": {"jobs": {job: chartlib.deep_merge(low, over)}}}))
    assert f"above the partitions of its input topic" in str(e.value)
    assert f"{parts + 1}" in str(e.value) and f"partitions: {parts}" in str(e.value)


def test_policy_change_does_not_restart_the_edge_but_config_does():
    base = chartlib.render("default")
    changed = chartlib.render("default", {"edge": {"policies": {"files": {"zz-extra.toml": "[zones.api]\nkey = \"client_ip\"\nrate = \"5r/s\"\n"}}}})
    name = next(o.name for o in base.kind("Deployment") if o.name.endswith("-edge"))
    assert base.get("ConfigMap", name + "-policies").doc["data"] != changed.get("ConfigMap", name + "-policies").doc["data"]
    assert base.get("Deployment", name).doc == changed.get("Deployment", name).doc, "a policy change changed the edge Deployment"
    cfg = chartlib.render("default", {"edge": {"log": {"level": "debug"}}})
    a = base.get("Deployment", name).doc["spec"]["template"]["metadata"]["annotations"]["checksum/env"]
    b = cfg.get("Deployment", name).doc["spec"]["template"]["metadata"]["annotations"]["checksum/env"]
    assert a != b, "a configuration change must roll the edge"


def test_edge_limits_reach_the_edge_environment():
    r = chartlib.render("default", {"edge": {"limits": {"maxConnections": 2500000, "maxRequestsPerClient": 0}}})
    name = next(o.name for o in r.kind("Deployment") if o.name.endswith("-edge"))
    env = r.get("ConfigMap", name + "-env").doc["data"]
    # Large numbers stay integers (Helm reads YAML numbers as floats: 2.5e+06 would not parse).
    assert env["EDGE_LIMITS__MAX_CONNECTIONS"] == "2500000"
    assert env["EDGE_LIMITS__MAX_REQUESTS_PER_CLIENT"] == "0"
    assert env["EDGE_LIMITS__MAX_BODY_BYTES"] == "1048576"


def test_edge_runtime_model_reaches_the_edge_environment():
    for values, expected in [({}, "false"), ({"edge": {"workStealing": True}}, "true")]:
        r = chartlib.render("default", values)
        name = next(o.name for o in r.kind("Deployment") if o.name.endswith("-edge"))
        assert r.get("ConfigMap", name + "-env").doc["data"]["EDGE_WORK_STEALING"] == expected
    with pytest.raises(helm.HelmValuesError) as e:
        chartlib.render("default", {"edge": {"workStealing": "sometimes"}})
    assert "/edge/workStealing" in str(e.value)


def test_policy_files_override_by_name():
    r = chartlib.render("openshift-keda")
    cm = next(o for o in r.kind("ConfigMap") if o.name.endswith("-policies"))
    assert "10.128.0.0/14" in cm.doc["data"]["default.toml"]
    assert set(cm.doc["data"]) == set(chartlib.policy_files())


def test_policy_configmap_is_the_repository_content():
    r = rendered("default")
    cm = next(o for o in r.kind("ConfigMap") if o.name.endswith("-policies"))
    for f in chartlib.policy_files():
        assert cm.doc["data"][f] == (chartlib.ROOT / "policies" / f).read_text(), f


def test_existing_policy_configmap_replaces_the_chart_one():
    r = chartlib.render("default", {"edge": {"policies": {"existingConfigMap": "my-policies"}}})
    assert not [o for o in r.kind("ConfigMap") if o.name.endswith("-policies")]
    edge = next(o for o in r.kind("Deployment") if o.name.endswith("-edge"))
    assert {"name": "policies", "configMap": {"name": "my-policies"}} in edge.doc["spec"]["template"]["spec"]["volumes"]
    assert not chartlib.check_policy_configmap(r)


@pytest.mark.parametrize(
    "value_set, secret",
    [("default", None), ("openshift-keda", "orders-edge-edge-tls"), ("kubernetes-ingress", "orders-edge-edge-tls")],
)
def test_edge_tls_modes(value_set, secret):
    r = rendered(value_set)
    edge = next(o for o in r.kind("Deployment") if o.name == "orders-edge-edge")
    spec = edge.doc["spec"]["template"]["spec"]
    env = chartlib.container_env(r, spec["containers"][0])
    if secret is None:
        assert env["EDGE_TLS__DEV_CERT_DIR"].startswith("/tmp/")
        assert "EDGE_TLS__CERT_PATH" not in env
        assert "development certificate" in r.notes
    else:
        vol = next(v for v in spec["volumes"] if v["name"] == "tls")
        assert vol["secret"]["secretName"] == secret
        assert {i["key"] for i in vol["secret"]["items"]} == {"tls.crt", "tls.key"}
        assert env["EDGE_TLS__CERT_PATH"] == "/etc/orders/tls/tls.crt" and env["EDGE_TLS__KEY_PATH"] == "/etc/orders/tls/tls.key"
    if value_set == "kubernetes-ingress":
        assert r.get("Certificate", "orders-edge-edge").doc["spec"]["secretName"] == secret
    if value_set == "openshift-keda":
        svc = r.get("Service", "orders-edge-edge")
        assert svc.doc["metadata"]["annotations"]["service.beta.openshift.io/serving-cert-secret-name"] == secret


def test_exposure_modes():
    lb = rendered("default").get("Service", "orders-edge-edge").doc["spec"]
    assert lb["type"] == "LoadBalancer" and lb["externalTrafficPolicy"] == "Local" and lb["sessionAffinity"] == "ClientIP"
    assert not rendered("default").kind("Route") and not rendered("default").kind("Ingress")
    os_ = rendered("openshift-keda")
    assert os_.kind("Route") and os_.get("Service", "orders-edge-edge").doc["spec"]["type"] == "ClusterIP"
    assert os_.kind("Route")[0].doc["spec"]["tls"]["termination"] == "reencrypt"
    k8s = rendered("kubernetes-ingress")
    assert k8s.kind("Ingress") and not k8s.kind("Route")
    passthrough = chartlib.render("default", {"edge": {"expose": "route"}})
    assert passthrough.kind("Route")[0].doc["spec"]["tls"]["termination"] == "passthrough"
    assert not chartlib.check_crds(passthrough)


def test_keda_replaces_worker_hpas():
    r = rendered("openshift-keda")
    assert {o.name for o in r.kind("ScaledObject")} == {"orders-edge-worker-validate", "orders-edge-worker-persist"}
    assert {o.name for o in r.kind("HorizontalPodAutoscaler")} == {"orders-edge-edge", "orders-edge-gateway"}
    so = r.get("ScaledObject", "orders-edge-worker-persist").doc["spec"]["triggers"][0]["metadata"]
    assert so["consumerGroup"] == "orders.persist" and so["topic"] == "orders.validated"
    d = rendered("default")
    assert not d.kind("ScaledObject")
    assert len(d.kind("HorizontalPodAutoscaler")) == 4


def test_worker_jobs_are_separate_deployments():
    r = rendered("default")
    for job in ("validate", "persist"):
        d = r.get("Deployment", f"orders-edge-worker-{job}")
        c = d.doc["spec"]["template"]["spec"]["containers"][0]
        assert c["args"] == ["run", job]
        env = chartlib.container_env(r, c)
        assert ("WORKERS_DATABASE__URL" in env) == (job == "persist"), "only persist gets the database"
        assert env["WORKERS_MIGRATE_ON_START"] == ("true" if job == "persist" else "false")


def test_otel_environment():
    r = rendered("openshift-keda")
    for d in r.kind("Deployment"):
        env = chartlib.container_env(r, d.doc["spec"]["template"]["spec"]["containers"][0])
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector.observability.svc:4317"
        assert env["OTEL_EXPORTER_OTLP_PROTOCOL"] == "grpc"
        assert env["OTEL_TRACES_SAMPLER"] == "parentbased_traceidratio"
        assert env["OTEL_TRACES_SAMPLER_ARG"] == "0.05"
        assert env["OTEL_SERVICE_NAME"] in ("edge", "gateway", "workers")
        assert "deployment.environment.name=staging" in env["OTEL_RESOURCE_ATTRIBUTES"]
    d = rendered("default")
    for w in d.kind("Deployment"):
        assert not [k for k in chartlib.container_env(d, w.doc["spec"]["template"]["spec"]["containers"][0]) if k.startswith("OTEL_")]


def test_secrets_come_from_secret_refs():
    r = rendered("kubernetes-ingress")
    gw = r.get("Deployment", "orders-edge-gateway").doc["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in gw["env"]}
    assert env["GATEWAY_DATABASE__URL"]["valueFrom"]["secretKeyRef"] == {"name": "orders-db", "key": "url"}
    assert env["GATEWAY_KAFKA__PROPERTIES__SASL_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "orders-kafka-user"
    m = chartlib.render("minimal")
    assert m.get("Secret", "orders-edge-database").doc["stringData"]["url"].startswith("postgres://")
    for o in r.objects:
        assert o.kind != "Secret", "with existing secrets the chart renders none"


def test_strimzi_example_matches_its_resources():
    values = yaml.safe_load((chartlib.CHART / "examples" / "strimzi-cnpg.yaml").read_text())
    resources = list(yaml.safe_load_all((chartlib.CHART / "examples" / "strimzi-cnpg-resources.yaml").read_text()))
    topics = {d["metadata"]["name"]: d["spec"]["partitions"] for d in resources if d["kind"] == "KafkaTopic"}
    for key, t in values["kafka"]["topics"].items():
        assert t["name"] in topics, t
        if "partitions" in t:
            assert t["partitions"] == topics[t["name"]], t
    kafka = next(d for d in resources if d["kind"] == "Kafka")
    assert values["kafka"]["brokers"].startswith(kafka["metadata"]["name"] + "-kafka-bootstrap.")  # Strimzi's name
    cluster = next(d for d in resources if d["kind"] == "Cluster")
    assert values["database"]["existingSecret"] == {"name": cluster["metadata"]["name"] + "-app", "key": "uri"}
    user = next(d for d in resources if d["kind"] == "KafkaUser")
    for ref in values["kafka"].get("secretProperties") or []:
        assert ref["secretName"] == user["metadata"]["name"]


def test_packaged_chart_carries_the_symlinked_files(tmp_path):
    archive = helm.package(str(chartlib.CHART), destination=str(tmp_path))
    import tarfile

    with tarfile.open(archive) as tar:
        names = tar.getnames()
        assert "orders-edge/files/policies/default.toml" in names, names
        member = tar.extractfile("orders-edge/files/policies/default.toml")
        assert member.read().decode() == (chartlib.ROOT / "policies" / "default.toml").read_text()


def test_gateway_keys_from_url_or_discovery():
    def gateway_env(r):
        c = r.get("Deployment", "orders-edge-gateway").doc["spec"]["template"]["spec"]["containers"][0]
        return chartlib.container_env(r, c)

    env = gateway_env(rendered("default"))
    assert env["GATEWAY_AUTH__JWKS_URL"] == "https://keycloak.example.com/realms/orders/protocol/openid-connect/certs"
    assert "GATEWAY_AUTH__DISCOVERY" not in env
    assert env["GATEWAY_AUTH__JWKS_MIN_REFRESH_SECS"] == "10"
    env = gateway_env(chartlib.render("default", {"gateway": {"auth": {"discovery": True}}}))
    assert env["GATEWAY_AUTH__DISCOVERY"] == "true"
    assert "GATEWAY_AUTH__JWKS_URL" not in env, "discovery must not be overridden by the Keycloak default URL"


def test_gateway_idempotency_settings():
    r = chartlib.render("default", {"gateway": {"idempotency": {"enabled": False, "ttlSecs": 600, "poolSize": 2}}})
    c = r.get("Deployment", "orders-edge-gateway").doc["spec"]["template"]["spec"]["containers"][0]
    env = chartlib.container_env(r, c)
    assert (env["GATEWAY_IDEMPOTENCY__ENABLED"], env["GATEWAY_IDEMPOTENCY__TTL_SECS"]) == ("false", "600")
    assert env["GATEWAY_IDEMPOTENCY__POOL_SIZE"] == "2"


def test_edge_balances_over_the_gateway_pods_and_checks_their_readiness():
    r = rendered("default")
    c = r.get("Deployment", "orders-edge-edge").doc["spec"]["template"]["spec"]["containers"][0]
    env = chartlib.container_env(r, c)
    host, port = env["EDGE_UPSTREAM__SERVERS"].rsplit(":", 1)
    headless = r.get("Service", "orders-edge-gateway-pods").doc["spec"]
    assert headless["clusterIP"] == "None" and host.startswith("orders-edge-gateway-pods.")
    ports = {p["name"]: p["port"] for p in headless["ports"]}
    assert int(port) == ports["http"] and int(env["EDGE_UPSTREAM__HEALTH__PORT"]) == ports["admin"]
