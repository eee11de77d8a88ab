"""Alert rules and dashboards come from observability/ (one source, through the chart's symlink)."""

from __future__ import annotations

import json

import pytest
import yaml

import helm_python as helm

import chartlib
from conftest import rendered

MONITORED = ["openshift-keda", "kubernetes-ingress"]


def test_symlinks_point_into_the_repository():
    for name, target in (("policies", chartlib.ROOT / "policies"), ("observability", chartlib.ROOT / "observability")):
        link = chartlib.CHART / "files" / name
        assert link.is_symlink(), f"{link} must be a symlink (one source, not a copy)"
        assert link.resolve() == target.resolve()


@pytest.mark.parametrize("value_set", MONITORED)
def test_prometheus_rule_is_the_alerts_file(value_set):
    assert chartlib.ALERTS_FILE.is_file(), f"{chartlib.ALERTS_FILE} is missing"
    source = yaml.safe_load(chartlib.ALERTS_FILE.read_text())
    rules = rendered(value_set).kind("PrometheusRule")
    assert len(rules) == 1
    assert rules[0].doc["spec"]["groups"] == source["groups"]


@pytest.mark.parametrize("value_set", MONITORED)
def test_one_dashboard_configmap_per_file(value_set):
    files = sorted(chartlib.DASHBOARDS_DIR.glob("*.json"))
    assert files, f"no dashboards in {chartlib.DASHBOARDS_DIR}"
    r = rendered(value_set)
    cms = [o for o in r.kind("ConfigMap") if "orders-edge/dashboard-file" in o.doc["metadata"].get("annotations", {})]
    assert sorted(o.doc["metadata"]["annotations"]["orders-edge/dashboard-file"] for o in cms) == [f.name for f in files]
    assert len({o.name for o in cms}) == len(cms), "dashboard ConfigMap names collide"
    want_ns = r.values["monitoring"]["dashboards"].get("namespace") or chartlib.NAMESPACE
    for o in cms:
        assert o.doc["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert o.doc["metadata"]["namespace"] == want_ns
        (key, text), = o.doc["data"].items()
        assert json.loads(text) == json.loads((chartlib.DASHBOARDS_DIR / key).read_text())


def test_service_monitors_cover_every_component():
    r = rendered("openshift-keda")
    sms = {o.doc["metadata"]["labels"]["app.kubernetes.io/component"] for o in r.kind("ServiceMonitor")}
    assert sms == {"edge", "gateway", "validate", "persist"}
    assert not rendered("default").kind("ServiceMonitor")


def test_monitoring_off_by_default():
    d = rendered("default")
    assert not d.kind("PrometheusRule") and not d.kind("ServiceMonitor")
    assert not [o for o in d.kind("ConfigMap") if "grafana_dashboard" in o.doc["metadata"]["labels"]]


def _chart_copy(tmp_path, alerts: str | None, dashboards: dict[str, str]):
    """The chart with files/observability replaced by a directory of our own (for the failure cases)."""
    import shutil

    dst = tmp_path / "orders-edge"
    shutil.copytree(chartlib.CHART, dst)  # follows the symlinks: a self-contained copy
    shutil.rmtree(dst / "files" / "observability")
    obs = dst / "files" / "observability"
    (obs / "prometheus").mkdir(parents=True)
    (obs / "grafana" / "dashboards").mkdir(parents=True)
    if alerts is not None:
        (obs / "prometheus" / "alerts.yml").write_text(alerts)
    for name, text in dashboards.items():
        (obs / "grafana" / "dashboards" / name).write_text(text)
    return dst


def test_missing_alerts_file_fails_clearly(tmp_path):
    chart = _chart_copy(tmp_path, None, {"a.json": "{}"})
    with pytest.raises(helm.HelmRenderError, match="alerts.yml is missing"):
        chartlib.render("openshift-keda", chart_dir=chart)


def test_rule_file_without_groups_fails_clearly(tmp_path):
    chart = _chart_copy(tmp_path, "rules: []\n", {"a.json": "{}"})
    with pytest.raises(helm.HelmRenderError, match="no top-level groups"):
        chartlib.render("openshift-keda", chart_dir=chart)


def test_any_rule_file_and_any_number_of_dashboards(tmp_path):
    alerts = "groups:\n  - name: g\n    rules:\n      - alert: A\n        expr: up == 0\n        for: 5m\n        labels: {severity: page}\n        annotations: {summary: '{{ $labels.instance }} down'}\n"
    boards = {f"Board {i}.json": json.dumps({"title": f"b{i}", "panels": []}) for i in range(3)}
    r = chartlib.render("openshift-keda", chart_dir=_chart_copy(tmp_path, alerts, boards))
    assert r.kind("PrometheusRule")[0].doc["spec"]["groups"] == yaml.safe_load(alerts)["groups"]
    cms = [o for o in r.kind("ConfigMap") if "grafana_dashboard" in o.doc["metadata"]["labels"]]
    assert sorted(o.name for o in cms) == [f"orders-edge-dashboard-board-{i}" for i in range(3)]
