"""Rendering the chart with the real Helm library and the checks the tests apply to its output.

Every check is a function that takes rendered objects and returns a list of problems (empty: fine), so that the
negative tests can feed it a broken render and prove it reports. Facts about the services (admin paths,
configuration keys, policy files) are read from the repository's sources, never restated here.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml

import helm_python as helm

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "orders-edge"
RELEASE = "orders-edge"
NAMESPACE = "orders"
# Value sets rendered by the tests: name -> values file (None: the chart's defaults).
VALUE_SETS = {
    "default": None,
    "minimal": CHART / "ci" / "minimal.yaml",
    "openshift-keda": CHART / "ci" / "openshift-keda.yaml",
    "kubernetes-ingress": CHART / "ci" / "kubernetes-ingress.yaml",
    "strimzi-cnpg": CHART / "examples" / "strimzi-cnpg.yaml",
}
ALERTS_FILE = ROOT / "observability" / "prometheus" / "alerts.yml"
DASHBOARDS_DIR = ROOT / "observability" / "grafana" / "dashboards"
SERVICES = {"edge": "EDGE_", "gateway": "GATEWAY_", "workers": "WORKERS_"}
KUBE_VERSIONS = ("1.30", "1.37")

try:  # the Go library logs every followed symlink at INFO
    helm.disable_logging()
except Exception:  # pragma: no cover - older bindings
    pass


# ----------------------------------------------------------------------------------------------------- render
@dataclass
class Obj:
    template: str  # e.g. templates/edge/deployment.yaml
    doc: dict

    @property
    def kind(self) -> str:
        return self.doc.get("kind", "")

    @property
    def name(self) -> str:
        return self.doc.get("metadata", {}).get("name", "")

    def __repr__(self) -> str:
        return f"{self.kind}/{self.name} ({self.template})"


@dataclass
class Render:
    objects: list[Obj]
    notes: str = ""
    values: dict = field(default_factory=dict)

    def kind(self, kind: str) -> list[Obj]:
        return [o for o in self.objects if o.kind == kind]

    def get(self, kind: str, name: str) -> Obj | None:
        return next((o for o in self.objects if o.kind == kind and o.name == name), None)

    def docs(self) -> list[dict]:
        return [o.doc for o in self.objects]


def load_values(value_set: str | None = None, extra: dict | None = None) -> dict:
    values: dict = {}
    path = VALUE_SETS.get(value_set) if value_set else None
    if path is not None:
        values = helm.values_from_yaml(path.read_text())
    if extra:
        values = deep_merge(values, extra)
    return values


def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def render(value_set: str | None = "default", extra: dict | None = None, chart_dir: Path = CHART) -> Render:
    """Renders like `helm template orders-edge helm/orders-edge -n orders -f <set> --set ...`; raises HelmError."""
    values = load_values(value_set, extra)
    with helm.Chart.load(str(chart_dir)) as chart:
        out = chart.render(values, name=RELEASE, namespace=NAMESPACE)
    objects, notes = [], ""
    for path, text in sorted(out.items()):
        rel = path.split("/", 1)[1]  # strip the chart name
        if rel.endswith("NOTES.txt"):
            notes = text
            continue
        if posixpath.basename(rel).startswith("_") or not rel.endswith((".yaml", ".yml", ".json")):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                objects.append(Obj(rel, doc))
    return Render(objects, notes, values)


def templates() -> list[str]:
    """Every template file that should produce objects (helpers and NOTES excluded)."""
    base = CHART / "templates"
    return sorted(
        str(p.relative_to(CHART))
        for p in base.rglob("*")
        if p.is_file() and p.suffix in (".yaml", ".yml", ".json") and not p.name.startswith("_")
    )


# ------------------------------------------------------------------------------------- facts from the sources
def admin_paths() -> set[str]:
    """The paths the shared admin router answers (crates/service-core/src/admin.rs, fn route)."""
    src = (ROOT / "crates" / "service-core" / "src" / "admin.rs").read_text()
    body = src[src.index("fn route(") :]
    body = body[: body.index("\nfn ", 1)] if "\nfn " in body[1:] else body
    paths = set(re.findall(r'^\s*"(/[^"]*)"\s*=>', body, re.M))
    assert paths, "no admin paths found in crates/service-core/src/admin.rs"
    return paths


def services_using_shared_admin() -> set[str]:
    """The services whose admin listener is service-core's (so admin_paths() applies to them)."""
    found = set()
    for svc in SERVICES:
        text = "".join(p.read_text() for p in (ROOT / svc / "src").rglob("*.rs"))
        if re.search(r"service_core::admin", text):
            found.add(svc)
    return found


_STRUCT = re.compile(r"pub struct (\w+)\s*\{(.*?)\n\}", re.S)
_FIELD = re.compile(r"^\s*pub (\w+):\s*([^,]+),", re.M)


def config_model(service: str) -> tuple[str, dict[str, dict[str, str]]]:
    """(root struct, {struct: {field: type}}) from <service>/src/config.rs, then service-core's shared structs
    (LogConfig, DatabaseConfig) for the names the service does not define itself."""
    structs: dict[str, dict[str, str]] = {}
    # config.rs first (the root struct), then the service's other modules (e.g. edge/src/upstream.rs), then
    # service-core's shared structs.
    src = ROOT / service / "src"
    files = [
        src / "config.rs",
        *sorted(p for p in src.glob("*.rs") if p.name != "config.rs"),
        *sorted((ROOT / "crates" / "service-core" / "src").glob("*.rs")),
    ]
    for f in files:
        for m in _STRUCT.finditer(f.read_text()):
            fields = {fm.group(1): fm.group(2).strip() for fm in _FIELD.finditer(m.group(2))}
            structs.setdefault(m.group(1), fields)
    return "Config", structs


def config_key_problem(service: str, env_name: str) -> str | None:
    """Why env_name is not a configuration key of the service (None: it is one)."""
    prefix = SERVICES[service]
    if not env_name.startswith(prefix):
        return None
    if env_name == prefix + "CONFIG":
        return None
    root, structs = config_model(service)
    path = env_name[len(prefix) :].lower().split("__")
    current = root
    for i, part in enumerate(path):
        fields = structs.get(current)
        if fields is None:
            return f"{env_name}: {'.'.join(path[:i])} is a value, not a table"
        if part not in fields:
            return f"{env_name}: no key {'.'.join(path[: i + 1])} in {service}'s configuration ({current} has {sorted(fields)})"
        ty = fields[part]
        if re.search(r"\b(BTreeMap|HashMap)\b", ty):
            return None  # free-form map (kafka.properties.*)
        inner = re.findall(r"\w+", ty)
        nxt = next((t for t in reversed(inner) if t in structs), None)
        if i == len(path) - 1:
            return None
        if nxt is None:
            return f"{env_name}: {'.'.join(path[: i + 1])} is a value ({ty}), not a table"
        current = nxt
    return None


def policy_files() -> list[str]:
    return sorted(p.name for p in (ROOT / "policies").iterdir() if p.is_file() and not p.name.startswith("."))


# ------------------------------------------------------------------------------------------------- selectors
def matches(selector: dict | None, labels: dict) -> bool:
    """Whether a LabelSelector (matchLabels, matchExpressions) selects these labels; {} selects everything."""
    if selector is None:
        return True
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, vals = expr["key"], expr["operator"], expr.get("values") or []
        if op == "In" and labels.get(key) not in vals:
            return False
        if op == "NotIn" and key in labels and labels[key] in vals:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def service_selects(service: dict, labels: dict) -> bool:
    sel = service["spec"].get("selector")
    return bool(sel) and matches({"matchLabels": sel}, labels)


WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob", "Pod")


def pod_spec(o: Obj) -> dict | None:
    d = o.doc
    if o.kind == "Pod":
        return d.get("spec")
    if o.kind == "CronJob":
        return d["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    if o.kind in WORKLOAD_KINDS:
        return d["spec"]["template"]["spec"]
    return None


def pod_labels(o: Obj) -> dict:
    if o.kind == "Pod":
        return o.doc["metadata"].get("labels", {})
    if o.kind == "CronJob":
        return o.doc["spec"]["jobTemplate"]["spec"]["template"]["metadata"].get("labels", {})
    return o.doc["spec"]["template"]["metadata"].get("labels", {})


def workloads(r: Render) -> list[Obj]:
    return [o for o in r.objects if o.kind in WORKLOAD_KINDS]


def containers(spec: dict) -> list[dict]:
    return list(spec.get("initContainers", []) or []) + list(spec.get("containers", []) or [])


def container_env(r: Render, c: dict) -> dict[str, str]:
    """The container's environment, with envFrom ConfigMaps resolved (Secrets as '<secret>')."""
    env: dict[str, str] = {}
    for src in c.get("envFrom", []) or []:
        if "configMapRef" in src:
            cm = r.get("ConfigMap", src["configMapRef"]["name"])
            if cm is not None:
                env.update({k: str(v) for k, v in (cm.doc.get("data") or {}).items()})
    for e in c.get("env", []) or []:
        env[e["name"]] = str(e["value"]) if "value" in e else "<secret>"
    return env


def service_of(c: dict) -> str | None:
    image = c.get("image", "")
    for svc in SERVICES:
        if re.search(rf"orders-{svc}(:|@)", image):
            return svc
    return None


# ---------------------------------------------------------------------------------------------------- checks
def check_probes(r: Render, paths: set[str] | None = None) -> list[str]:
    """Liveness /healthz, readiness /readyz on the admin port; every HTTP probe path is served by the service."""
    paths = admin_paths() if paths is None else paths
    problems = []
    for w in workloads(r):
        for c in containers(pod_spec(w)):
            ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
            for kind in ("livenessProbe", "readinessProbe", "startupProbe"):
                probe = c.get(kind)
                if probe is None:
                    if kind != "startupProbe":
                        problems.append(f"{w} {c['name']}: no {kind}")
                    continue
                get = probe.get("httpGet")
                if get is None:
                    problems.append(f"{w} {c['name']}: {kind} is not an HTTP probe on the admin port")
                    continue
                if get["path"] not in paths:
                    problems.append(f"{w} {c['name']}: {kind} path {get['path']} is not served (admin paths: {sorted(paths)})")
                port = get["port"]
                number = ports.get(port) if isinstance(port, str) else port
                if number is None or number != ports.get("admin"):
                    problems.append(f"{w} {c['name']}: {kind} port {port} is not the admin port {ports.get('admin')}")
            if (c.get("livenessProbe") or {}).get("httpGet", {}).get("path") not in (None, "/healthz"):
                problems.append(f"{w} {c['name']}: liveness must be /healthz")
            if (c.get("readinessProbe") or {}).get("httpGet", {}).get("path") not in (None, "/readyz"):
                problems.append(f"{w} {c['name']}: readiness must be /readyz")
    return problems


def _listen_port(value: str) -> int | None:
    m = re.search(r":(\d+)$", value or "")
    return int(m.group(1)) if m else None


def check_ports(r: Render) -> list[str]:
    """Container ports agree with what the service listens on, and every Service, NetworkPolicy, ServiceMonitor,
    Route, Ingress and probe refers to a port that exists on the pods it selects."""
    problems = []
    pods = []  # (workload, labels, {name: number}, set of numbers)
    for w in workloads(r):
        spec = pod_spec(w)
        named, numbers = {}, set()
        for c in containers(spec):
            for p in c.get("ports", []):
                numbers.add(p["containerPort"])
                if p.get("name"):
                    named[p["name"]] = p["containerPort"]
            svc = service_of(c)
            if svc:
                env = container_env(r, c)
                prefix = SERVICES[svc]
                listen = {"edge": "https", "gateway": "http"}.get(svc)
                want = {"admin": _listen_port(env.get(prefix + "ADMIN_LISTEN", ""))}
                if listen:
                    want[listen] = _listen_port(env.get(prefix + "LISTEN", ""))
                for pname, port in want.items():
                    have = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}.get(pname)
                    if port is None:
                        problems.append(f"{w} {c['name']}: {prefix}{'ADMIN_' if pname == 'admin' else ''}LISTEN not set")
                    elif have != port:
                        problems.append(f"{w} {c['name']}: container port {pname}={have} but the service listens on {port}")
        pods.append((w, pod_labels(w), named, numbers))

    def resolve(port, selected) -> bool:
        if not selected:
            return False
        for _, _, named, numbers in selected:
            if isinstance(port, str) and port in named:
                continue
            if isinstance(port, int) and port in numbers:
                continue
            return False
        return True

    services = {}
    for s in r.kind("Service"):
        selected = [p for p in pods if service_selects(s.doc, p[1])]
        if not selected:
            problems.append(f"{s}: selects no pod")
        services[s.name] = s
        for p in s.doc["spec"].get("ports", []):
            target = p.get("targetPort", p["port"])
            if not resolve(target, selected):
                problems.append(f"{s}: targetPort {target} is not a port of the selected pods")
    for np in r.kind("NetworkPolicy"):
        spec = np.doc["spec"]
        selected = [p for p in pods if matches(spec.get("podSelector"), p[1])]
        if not selected:
            problems.append(f"{np}: selects no pod")
        for rule in spec.get("ingress", []) or []:
            for p in rule.get("ports", []) or []:
                if not resolve(p["port"], selected):
                    problems.append(f"{np}: ingress port {p['port']} is not a port of the selected pods")
        for rule in spec.get("egress", []) or []:
            # Peers among the release's own pods (external ones, such as brokers, are not rendered here).
            peers = [t for t in rule.get("to", []) or [] if "podSelector" in t and "namespaceSelector" not in t
                     and (t["podSelector"].get("matchLabels") or {}).get("app.kubernetes.io/instance") == RELEASE]
            for peer in peers:
                targets = [p for p in pods if matches(peer["podSelector"], p[1])]
                if not targets:
                    problems.append(f"{np}: egress podSelector {peer['podSelector']} selects no pod of the release")
                for p in rule.get("ports", []) or []:
                    if not resolve(p["port"], targets):
                        problems.append(f"{np}: egress port {p['port']} is not a port of the target pods")
    for sm in r.kind("ServiceMonitor"):
        sel = sm.doc["spec"]["selector"]
        chosen = [s for s in services.values() if matches(sel, s.doc["metadata"].get("labels", {}))]
        if not chosen:
            problems.append(f"{sm}: selects no Service")
        for ep in sm.doc["spec"]["endpoints"]:
            for s in chosen:
                names = {p.get("name") for p in s.doc["spec"]["ports"]}
                if ep.get("port") not in names:
                    problems.append(f"{sm}: endpoint port {ep.get('port')} is not a port of {s}")
                else:
                    target = next(p.get("targetPort") for p in s.doc["spec"]["ports"] if p.get("name") == ep["port"])
                    sel_pods = [p for p in pods if service_selects(s.doc, p[1])]
                    if not all(p[2].get("admin") == (p[2].get(target) if isinstance(target, str) else target) for p in sel_pods):
                        problems.append(f"{sm}: scrapes {s} port {ep['port']}, which is not the admin port of its pods")
            if ep.get("path", "/metrics") not in admin_paths():
                problems.append(f"{sm}: path {ep.get('path')} is not served")
    for rt in r.kind("Route"):
        s = services.get(rt.doc["spec"]["to"]["name"])
        tp = rt.doc["spec"].get("port", {}).get("targetPort")
        if s is None:
            problems.append(f"{rt}: no Service {rt.doc['spec']['to']['name']}")
        elif tp not in {p.get("name") for p in s.doc["spec"]["ports"]} | {p.get("targetPort") for p in s.doc["spec"]["ports"]}:
            problems.append(f"{rt}: targetPort {tp} is not a port of {s}")
    for ing in r.kind("Ingress"):
        for rule in ing.doc["spec"].get("rules", []):
            for path in rule.get("http", {}).get("paths", []):
                b = path["backend"]["service"]
                s = services.get(b["name"])
                if s is None:
                    problems.append(f"{ing}: no Service {b['name']}")
                    continue
                port = b["port"].get("name", b["port"].get("number"))
                if port not in {p.get("name") for p in s.doc["spec"]["ports"]} | {p["port"] for p in s.doc["spec"]["ports"]}:
                    problems.append(f"{ing}: port {port} is not a port of {s}")
    return problems


def check_security(r: Render) -> list[str]:
    """restricted Pod Security Standard and OpenShift restricted-v2, resources for every container."""
    problems = []
    for w in workloads(r):
        spec = pod_spec(w)
        psc = spec.get("securityContext") or {}
        if psc.get("runAsNonRoot") is not True:
            problems.append(f"{w}: pod securityContext.runAsNonRoot is not true")
        if (psc.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
            problems.append(f"{w}: pod seccompProfile is not RuntimeDefault")
        for k in ("runAsUser", "runAsGroup", "fsGroup", "supplementalGroups"):
            if k in psc:
                problems.append(f"{w}: pod securityContext.{k} is fixed (OpenShift assigns it)")
        for k in ("hostNetwork", "hostPID", "hostIPC"):
            if spec.get(k):
                problems.append(f"{w}: {k}")
        if spec.get("automountServiceAccountToken") is not False:
            problems.append(f"{w}: automountServiceAccountToken is not false")
        for v in spec.get("volumes", []) or []:
            if "hostPath" in v:
                problems.append(f"{w}: hostPath volume {v['name']}")
        for c in containers(spec):
            sc = c.get("securityContext") or {}
            where = f"{w} container {c['name']}"
            if sc.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{where}: allowPrivilegeEscalation is not false")
            if sc.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{where}: readOnlyRootFilesystem is not true")
            if sc.get("privileged"):
                problems.append(f"{where}: privileged")
            if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
                problems.append(f"{where}: capabilities do not drop ALL")
            if (sc.get("capabilities") or {}).get("add"):
                problems.append(f"{where}: capabilities added")
            if sc.get("runAsNonRoot") is False:
                problems.append(f"{where}: runAsNonRoot false")
            if "runAsUser" in sc or "runAsGroup" in sc:
                problems.append(f"{where}: fixed UID/GID (OpenShift assigns it)")
            seccomp = (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
            if seccomp != "RuntimeDefault":
                problems.append(f"{where}: seccompProfile is not RuntimeDefault")
            res = c.get("resources") or {}
            for part in ("requests", "limits"):
                for res_name in ("cpu", "memory"):
                    if not (res.get(part) or {}).get(res_name):
                        problems.append(f"{where}: no {part}.{res_name}")
            for m in c.get("volumeMounts", []) or []:
                if m.get("subPath") or m.get("subPathExpr"):
                    problems.append(f"{where}: subPath mount {m['name']} (kubelet never updates it)")
    return problems


def check_policy_configmap(r: Render) -> list[str]:
    """The edge mounts a policy ConfigMap, as a directory, at its policy.dir, holding policies/default.* and every
    file of the repository's policies/."""
    problems = []
    edges = [w for w in workloads(r) if any(service_of(c) == "edge" for c in containers(pod_spec(w)))]
    if not edges:
        return ["no edge workload"]
    for w in edges:
        spec = pod_spec(w)
        c = next(c for c in containers(spec) if service_of(c) == "edge")
        policy_dir = container_env(r, c).get("EDGE_POLICY__DIR")
        if not policy_dir:
            problems.append(f"{w}: EDGE_POLICY__DIR not set")
            continue
        mount = next((m for m in c.get("volumeMounts", []) if m["mountPath"].rstrip("/") == policy_dir.rstrip("/")), None)
        if mount is None:
            problems.append(f"{w}: nothing mounted at the policy dir {policy_dir}")
            continue
        if mount.get("subPath"):
            problems.append(f"{w}: policy mount uses subPath (no hot reload)")
        vol = next((v for v in spec.get("volumes", []) if v["name"] == mount["name"]), {})
        cm_name = (vol.get("configMap") or {}).get("name")
        if not cm_name:
            problems.append(f"{w}: the policy dir is not a ConfigMap volume")
            continue
        if vol["configMap"].get("items"):
            problems.append(f"{w}: the policy ConfigMap volume lists items (new files would not appear)")
        cm = r.get("ConfigMap", cm_name)
        if cm is None:
            if r.values.get("edge", {}).get("policies", {}).get("existingConfigMap") == cm_name:
                continue
            problems.append(f"{w}: ConfigMap {cm_name} is not rendered")
            continue
        keys = set((cm.doc.get("data") or {}).keys())
        if not any(re.fullmatch(r"default\.[a-z]+", k) for k in keys):
            problems.append(f"{cm}: no policies/default.* (keys: {sorted(keys)})")
        missing = set(policy_files()) - keys
        if missing:
            problems.append(f"{cm}: repository policies missing: {sorted(missing)}")
        for k in keys:
            if not k.endswith(".toml"):
                problems.append(f"{cm}: {k} is not a *.toml file (the edge would ignore it)")
        checksums = {k: v for k, v in w.doc["spec"]["template"]["metadata"].get("annotations", {}).items() if k.startswith("checksum/")}
        for k in checksums:
            if "polic" in k:
                problems.append(f"{w}: {k}: a policy change would restart the edge")
    return problems


def check_env_keys(r: Render) -> list[str]:
    """Every EDGE_*/GATEWAY_*/WORKERS_* variable names a real configuration key (the services refuse unknown
    keys), and no pod gets Kubernetes' service-link variables."""
    problems = []
    for w in workloads(r):
        spec = pod_spec(w)
        for c in containers(spec):
            svc = service_of(c)
            if not svc:
                continue
            if spec.get("enableServiceLinks") is not False:
                problems.append(f"{w}: enableServiceLinks is not false (service variables may hit {SERVICES[svc]}*)")
            for name in container_env(r, c):
                problem = config_key_problem(svc, name)
                if problem:
                    problems.append(f"{w}: {problem}")
                for other, prefix in SERVICES.items():
                    if other != svc and name.startswith(prefix):
                        problems.append(f"{w}: {name} belongs to {other}, not {svc}")
    return problems


def check_termination(r: Render) -> list[str]:
    """terminationGracePeriodSeconds exceeds preStop sleep + the service's own drain timeouts."""
    problems = []
    for w in workloads(r):
        spec = pod_spec(w)
        grace = spec.get("terminationGracePeriodSeconds", 30)
        for c in containers(spec):
            svc = service_of(c)
            env = container_env(r, c)
            sleep = (((c.get("lifecycle") or {}).get("preStop") or {}).get("sleep") or {}).get("seconds", 0)
            drain = 0
            if svc == "edge":
                drain = int(env.get("EDGE_SHUTDOWN__GRACE_PERIOD_SECS", 2)) + int(env.get("EDGE_SHUTDOWN__TIMEOUT_SECS", 10))
            elif svc == "gateway":
                drain = int(env.get("GATEWAY_SHUTDOWN_TIMEOUT_SECS", 20)) + 5
            if grace <= sleep + drain:
                problems.append(f"{w}: terminationGracePeriodSeconds {grace} <= preStop {sleep} + drain {drain}")
            if (c.get("lifecycle") or {}).get("preStop", {}).get("exec"):
                problems.append(f"{w}: preStop exec needs a shell, the images have none")
    return problems


def is_core_group(api_version: str) -> bool:
    group = api_version.split("/")[0] if "/" in api_version else ""
    if group == "gateway.networking.k8s.io":
        return False
    return "." not in group or group.endswith(".k8s.io")


def kube_validate(r: Render, version: str) -> list[str]:
    import kubernetes_validate as kv

    problems = []
    for o in r.objects:
        if not is_core_group(o.doc.get("apiVersion", "")):
            continue
        try:
            kv.validate(o.doc, version, strict=True)
        except kv.ValidationError as e:
            problems.append(f"{o}: {'.'.join(map(str, e.path))}: {e.message}")
        except kv.SchemaNotFoundError as e:
            problems.append(f"{o}: no schema in Kubernetes {version}: {e}")
    return problems


def check_crds(r: Render) -> list[str]:
    """Minimal structural checks of the custom resources (no schema for them offline)."""
    problems = []
    names = {(o.kind, o.name) for o in r.objects}
    known = {
        "Route": "route.openshift.io/v1",
        "ScaledObject": "keda.sh/v1alpha1",
        "ServiceMonitor": "monitoring.coreos.com/v1",
        "PrometheusRule": "monitoring.coreos.com/v1",
        "Certificate": "cert-manager.io/v1",
    }
    for o in r.objects:
        av = o.doc.get("apiVersion", "")
        if is_core_group(av):
            continue
        if o.kind not in known:
            problems.append(f"{o}: custom resource without a check ({av})")
            continue
        if av != known[o.kind]:
            problems.append(f"{o}: apiVersion {av}, expected {known[o.kind]}")
        md = o.doc.get("metadata", {})
        if not md.get("name") or not md.get("namespace"):
            problems.append(f"{o}: metadata.name and metadata.namespace are required")
        spec = o.doc.get("spec")
        if not isinstance(spec, dict):
            problems.append(f"{o}: no spec")
            continue
        if o.kind == "Route":
            to = spec.get("to") or {}
            if to.get("kind") != "Service" or ("Service", to.get("name")) not in names:
                problems.append(f"{o}: spec.to must name a rendered Service")
            tls = spec.get("tls") or {}
            term = tls.get("termination")
            if term not in ("passthrough", "reencrypt", "edge"):
                problems.append(f"{o}: spec.tls.termination {term!r}")
            if term == "passthrough" and any(k in tls for k in ("certificate", "key", "caCertificate", "destinationCACertificate")):
                problems.append(f"{o}: passthrough takes no certificates")
            if tls.get("insecureEdgeTerminationPolicy") not in (None, "None", "Redirect", "Allow"):
                problems.append(f"{o}: insecureEdgeTerminationPolicy")
            if term == "passthrough" and tls.get("insecureEdgeTerminationPolicy") == "Allow":
                problems.append(f"{o}: passthrough cannot Allow insecure traffic")
        elif o.kind == "ScaledObject":
            ref = spec.get("scaleTargetRef") or {}
            if ("Deployment", ref.get("name")) not in names:
                problems.append(f"{o}: scaleTargetRef does not name a rendered Deployment")
            lo, hi = spec.get("minReplicaCount", 0), spec.get("maxReplicaCount", 100)
            if not (isinstance(lo, int) and isinstance(hi, int) and 0 <= lo <= hi):
                problems.append(f"{o}: minReplicaCount {lo} / maxReplicaCount {hi}")
            triggers = spec.get("triggers") or []
            if not triggers:
                problems.append(f"{o}: no triggers")
            for t in triggers:
                md_t = t.get("metadata") or {}
                if t.get("type") != "kafka":
                    problems.append(f"{o}: trigger type {t.get('type')}")
                for k in ("bootstrapServers", "consumerGroup", "topic", "lagThreshold"):
                    if not isinstance(md_t.get(k), str) or not md_t.get(k):
                        problems.append(f"{o}: trigger metadata.{k} must be a non-empty string")
                for k, v in md_t.items():
                    if not isinstance(v, str):
                        problems.append(f"{o}: trigger metadata.{k} is not a string (KEDA wants strings)")
        elif o.kind == "ServiceMonitor":
            if not (spec.get("selector") or {}).get("matchLabels"):
                problems.append(f"{o}: spec.selector.matchLabels is empty")
            eps = spec.get("endpoints") or []
            if not eps or not all(isinstance(e.get("port"), str) for e in eps):
                problems.append(f"{o}: endpoints need named ports")
        elif o.kind == "PrometheusRule":
            groups = spec.get("groups")
            if not isinstance(groups, list) or not groups:
                problems.append(f"{o}: spec.groups is empty")
                continue
            for g in groups:
                if not g.get("name") or not isinstance(g.get("rules"), list):
                    problems.append(f"{o}: group without name or rules")
                    continue
                for rule in g["rules"]:
                    if not (("alert" in rule) ^ ("record" in rule)) or not rule.get("expr"):
                        problems.append(f"{o}: group {g['name']}: rule needs alert or record, and expr: {rule}")
        elif o.kind == "Certificate":
            if not spec.get("secretName") or not (spec.get("issuerRef") or {}).get("name"):
                problems.append(f"{o}: secretName and issuerRef.name are required")
            if not spec.get("dnsNames") and not spec.get("commonName"):
                problems.append(f"{o}: no dnsNames")
    return problems


def check_session_affinity(r: Render) -> list[str]:
    problems = []
    edge_svcs = [s for s in r.kind("Service") if s.doc["metadata"].get("labels", {}).get("app.kubernetes.io/component") == "edge"
                 and any(p.get("name") == "https" for p in s.doc["spec"]["ports"])]
    if not edge_svcs:
        return ["no edge traffic Service"]
    for s in edge_svcs:
        spec = s.doc["spec"]
        if spec.get("sessionAffinity") != "ClientIP":
            problems.append(f"{s}: sessionAffinity is not ClientIP")
        if spec.get("type") == "LoadBalancer" and spec.get("externalTrafficPolicy") != "Local":
            problems.append(f"{s}: LoadBalancer without externalTrafficPolicy Local")
        if spec.get("type") in ("LoadBalancer", "NodePort") and any(p.get("name") == "admin" for p in spec["ports"]):
            problems.append(f"{s}: exposes the admin port")
    for rt in r.kind("Route"):
        if rt.doc["metadata"].get("annotations", {}).get("haproxy.router.openshift.io/balance") != "source":
            problems.append(f"{rt}: the router does not balance by source")
    return problems


def check_network_policies(r: Render) -> list[str]:
    """Only the edge is reachable from outside; the gateway only from the edge; admin ports only from the
    monitoring namespaces; every egress rule is bounded by ports."""
    problems = []
    if not r.values.get("networkPolicy", {}).get("enabled", True):
        return []
    monitoring = set(r.values.get("networkPolicy", {}).get("monitoringNamespaces") or ["monitoring"])
    policies = r.kind("NetworkPolicy")
    for w in workloads(r):
        labels = pod_labels(w)
        mine = [p for p in policies if matches(p.doc["spec"].get("podSelector"), labels)]
        comp = labels.get("app.kubernetes.io/component")
        if not mine:
            problems.append(f"{w}: no NetworkPolicy selects it")
            continue
        for np in mine:
            spec = np.doc["spec"]
            if set(spec.get("policyTypes", [])) != {"Ingress", "Egress"}:
                problems.append(f"{np}: policyTypes must be Ingress and Egress")
            for rule in spec.get("ingress", []) or []:
                ports = [p["port"] for p in rule.get("ports", []) or []]
                if not ports:
                    problems.append(f"{np}: ingress rule without ports")
                peers = rule.get("from")
                if "admin" in ports:
                    def monitoring_peer(p):
                        ns = (p.get("namespaceSelector") or {}).get("matchExpressions")
                        return bool(ns) and set((ns or [{}])[0].get("values", [])) <= monitoring

                    def edge_health_checks(p):
                        # The gateway's admin port also serves the edge's health checks (same namespace).
                        sel = (p.get("podSelector") or {}).get("matchLabels") or {}
                        return (comp == "gateway" and "namespaceSelector" not in p
                                and sel.get("app.kubernetes.io/component") == "edge")

                    ok = peers and all(monitoring_peer(p) or edge_health_checks(p) for p in peers)
                    if not ok:
                        problems.append(f"{np}: admin port open beyond the monitoring namespaces")
                elif comp == "gateway":
                    edge_only = peers and all(
                        "namespaceSelector" not in p and (p.get("podSelector") or {}).get("matchLabels", {}).get("app.kubernetes.io/component") == "edge"
                        for p in peers)
                    if not edge_only:
                        problems.append(f"{np}: gateway reachable from more than the edge")
                elif comp != "edge":
                    problems.append(f"{np}: {comp} accepts traffic on {ports}")
            for rule in spec.get("egress", []) or []:
                if not rule.get("ports"):
                    problems.append(f"{np}: egress rule without ports (open egress)")
    return problems


def checkov_scan(r: Render) -> tuple[list[str], list[str], int]:
    """(failed checks, skipped checks with their reasons, resources scanned)."""
    os.environ.setdefault("CKV_SKIP_PACKAGE_UPDATE_CHECK", "true")
    from checkov.kubernetes.runner import Runner
    from checkov.runner_filter import RunnerFilter

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rendered.yaml"
        path.write_text(yaml.safe_dump_all(r.docs(), sort_keys=False))
        report = Runner().run(root_folder=None, files=[str(path)], runner_filter=RunnerFilter(framework=["kubernetes"]))
    failed = [f"{c.check_id} {c.check_name}: {c.resource}" for c in report.failed_checks]
    skipped = [f"{c.check_id}: {c.resource}: {(c.check_result or {}).get('suppress_comment', '')}" for c in report.skipped_checks]
    return failed, skipped, report.get_summary().get("resource_count", 0)


def lint(value_set: str | None, extra: dict | None = None) -> dict:
    return helm.lint(str(CHART), load_values(value_set, extra), strict=True, namespace=NAMESPACE, kube_version="v1.30.0")


def dump(r: Render) -> str:
    return json.dumps(r.docs(), indent=1)
