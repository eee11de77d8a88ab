"""Render, lint, Kubernetes schemas, custom resources and checkov, for every value set."""

from __future__ import annotations

import pytest

import chartlib
from conftest import rendered


def test_lint_strict(value_set):
    report = chartlib.lint(value_set)
    assert not report["errors"], report["errors"]
    # Helm's severities: 1 info (e.g. "icon is recommended"), 2 warning, 3 error; strict fails on warnings too.
    bad = [m for m in report.get("messages", []) if m.get("severity", 3) >= 2]
    assert not bad, bad


def test_every_template_renders_in_some_value_set():
    produced = {o.template for vs in chartlib.VALUE_SETS for o in rendered(vs).objects}
    missing = [t for t in chartlib.templates() if t not in produced]
    assert not missing, f"templates that no value set renders: {missing}"


def test_every_value_set_renders_the_core(r):
    kinds = {(o.kind, o.doc["metadata"]["labels"].get("app.kubernetes.io/component")) for o in r.objects}
    for comp in ("edge", "gateway", "validate", "persist"):
        assert ("Deployment", comp) in kinds, comp
    assert r.notes.strip(), "NOTES.txt is empty"


@pytest.mark.parametrize("version", chartlib.KUBE_VERSIONS)
def test_kubernetes_schemas_strict(r, version):
    problems = chartlib.kube_validate(r, version)
    assert not problems, "\n".join(problems)


def test_custom_resources_structure(r):
    problems = chartlib.check_crds(r)
    assert not problems, "\n".join(problems)


def test_every_object_is_namespaced_and_labelled(r):
    for o in r.objects:
        md = o.doc["metadata"]
        assert md.get("namespace"), o
        labels = md.get("labels", {})
        for k in ("app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/managed-by", "helm.sh/chart"):
            assert k in labels, f"{o}: no label {k}"
        assert len(o.name) <= 63, f"{o}: name longer than 63"


def test_checkov(r):
    failed, skipped, count = chartlib.checkov_scan(r)
    assert count > 0, "checkov scanned nothing"
    assert not failed, "\n".join(failed)
    # Every skip carries a reason on the object.
    for s in skipped:
        assert s.split(": ", 2)[-1].strip(), f"skip without a reason: {s}"
