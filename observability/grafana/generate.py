#!/usr/bin/env python3
"""Writes the Grafana dashboards of observability/grafana/dashboards/ (provisionable JSON).

The JSON files are committed; edit this generator and run it (`python3 observability/grafana/generate.py`)
rather than the JSON. Every query's metric names are checked against the running services by
e2e/tests/observability.rs, and every query must parse as PromQL.

Labels used: `service_name` (on every metric of our services), `worker` (validate, persist), `zone` and
`outcome` (rate limits), `messaging_destination_name` (Kafka topic), `db_operation_name`.
"""

import json
import pathlib
import urllib.parse

OUT = pathlib.Path(__file__).resolve().parent / "dashboards"
PROMETHEUS = {"type": "prometheus", "uid": "${datasource}"}
TEMPO_UID = "tempo"


def tempo_link(title, traceql):
    """A link to Tempo's search for `traceql` over the panel's time range (trace links from panels)."""
    pane = {
        "a": {
            "datasource": TEMPO_UID,
            "queries": [
                {
                    "refId": "A",
                    "datasource": {"type": "tempo", "uid": TEMPO_UID},
                    "queryType": "traceql",
                    "query": traceql,
                }
            ],
            "range": {"from": "${__from}", "to": "${__to}"},
        }
    }
    panes = urllib.parse.quote(json.dumps(pane, separators=(",", ":")), safe="${}_")
    return {"title": title, "url": f"/explore?schemaVersion=1&panes={panes}", "targetBlank": True}


class Board:
    def __init__(self, uid, title, description, tags):
        self.uid, self.title, self.description, self.tags = uid, title, description, tags
        self.panels, self.x, self.y, self.row_h = [], 0, 0, 0
        self.templating = [
            {
                "name": "datasource",
                "label": "Prometheus",
                "type": "datasource",
                "query": "prometheus",
                "current": {"text": "Prometheus", "value": "prometheus"},
                "hide": 0,
                "refresh": 1,
                "options": [],
            }
        ]

    def variable(self, name, label, query):
        self.templating.append(
            {
                "name": name,
                "label": label,
                "type": "query",
                "datasource": PROMETHEUS,
                "query": {"query": query, "refId": "PrometheusVariableQueryEditor-VariableQuery"},
                "definition": query,
                "includeAll": True,
                "multi": True,
                "allValue": ".*",
                "current": {"text": "All", "value": "$__all"},
                "refresh": 2,
                "sort": 1,
                "hide": 0,
                "options": [],
            }
        )

    def row(self, title):
        self.newline()
        self.panels.append(
            {
                "id": len(self.panels) + 1,
                "type": "row",
                "title": title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y},
                "panels": [],
            }
        )
        self.y += 1

    def newline(self):
        if self.x:
            self.y += self.row_h
            self.x, self.row_h = 0, 0

    def panel(self, kind, title, description, targets, unit="short", w=12, h=8, links=(), stack=False, extra=None):
        if self.x + w > 24:
            self.newline()
        panel = {
            "id": len(self.panels) + 1,
            "type": kind,
            "title": title,
            "description": description,
            "datasource": PROMETHEUS,
            "gridPos": {"h": h, "w": w, "x": self.x, "y": self.y},
            "targets": [
                {
                    "refId": chr(ord("A") + i),
                    "datasource": PROMETHEUS,
                    "expr": expr,
                    "legendFormat": legend,
                    "range": kind != "stat",
                    "instant": kind == "stat",
                }
                for i, (expr, legend) in enumerate(targets)
            ],
            "fieldConfig": {"defaults": {"unit": unit, "links": list(links)}, "overrides": []},
            "options": {"legend": {"displayMode": "table", "placement": "bottom", "calcs": ["lastNotNull", "max"]},
                        "tooltip": {"mode": "multi", "sort": "desc"}},
            "links": [],
        }
        if kind == "timeseries":
            panel["fieldConfig"]["defaults"]["custom"] = {
                "drawStyle": "line",
                "lineWidth": 1,
                "fillOpacity": 10,
                "stacking": {"mode": "normal" if stack else "none", "group": "A"},
                "showPoints": "never",
            }
        if kind == "stat":
            panel["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                                "colorMode": "value", "graphMode": "area", "textMode": "value_and_name",
                                "orientation": "auto", "justifyMode": "auto"}
        if extra:
            panel.update(extra)
        self.panels.append(panel)
        self.x += w
        self.row_h = max(self.row_h, h)

    def write(self):
        board = {
            "uid": self.uid,
            "title": self.title,
            "description": self.description,
            "tags": self.tags,
            "timezone": "browser",
            "editable": True,
            "graphTooltip": 1,
            "schemaVersion": 39,
            "version": 1,
            "refresh": "10s",
            "time": {"from": "now-1h", "to": "now"},
            "timepicker": {},
            "templating": {"list": self.templating},
            "annotations": {"list": []},
            "links": [
                {"title": "Application", "type": "link", "url": "/d/orders-application"},
                {"title": "Database", "type": "link", "url": "/d/orders-database"},
            ],
            "panels": self.panels,
        }
        path = OUT / f"{self.uid.removeprefix('orders-')}.json"
        path.write_text(json.dumps(board, indent=2) + "\n")
        return path


def application():
    b = Board("orders-application", "Orders: application",
              "Edge, gateway and workers at a glance: pods, CPU, HTTP traffic, rate limits, Kafka and the DLQ.",
              ["orders-edge"])
    b.row("Pods and resources")
    b.panel("stat", "Pods per service", "Instances exporting metrics, per service (target_info: one per process).",
            [("count by (service_name) (target_info{service_name=~\"edge|gateway|workers\"})", "{{service_name}}")],
            w=6)
    b.panel("timeseries", "Gateway replicas vs autoscaler maximum",
            "Kubernetes only (kube-state-metrics): the gateway's HPA current and maximum replicas.",
            [("kube_horizontalpodautoscaler_status_current_replicas{horizontalpodautoscaler=~\".*gateway.*\"}",
              "current {{horizontalpodautoscaler}}"),
             ("kube_horizontalpodautoscaler_spec_max_replicas{horizontalpodautoscaler=~\".*gateway.*\"}",
              "max {{horizontalpodautoscaler}}")], w=6)
    b.panel("timeseries", "CPU per service", "CPU seconds per second used by each service's processes.",
            [("sum by (service_name) (rate(process_cpu_time_seconds_total[$__rate_interval]))", "{{service_name}}")],
            unit="percentunit", w=6, stack=True)
    b.panel("timeseries", "Memory per service", "Resident memory of each service's processes.",
            [("sum by (service_name) (process_memory_usage_bytes)", "{{service_name}}")], unit="bytes", w=6,
            stack=True)

    b.row("HTTP")
    errors = tempo_link("Failed requests in Tempo", "{ span.http.response.status_code >= 500 }")
    slow = tempo_link("Slow requests in Tempo", "{ kind = server && duration > 500ms }")
    b.panel("timeseries", "Requests received by status", "HTTP requests answered by the edge and the gateway.",
            [("sum by (service_name, http_response_status_code) "
              "(rate(http_server_request_duration_seconds_count[$__rate_interval]))",
              "{{service_name}} {{http_response_status_code}}")], unit="reqps", links=[errors])
    b.panel("timeseries", "Latency p50 / p99", "Request duration percentiles (the edge's include rate-limit delays).",
            [("histogram_quantile(0.5, sum by (le, service_name) "
              "(rate(http_server_request_duration_seconds_bucket[$__rate_interval])))", "p50 {{service_name}}"),
             ("histogram_quantile(0.99, sum by (le, service_name) "
              "(rate(http_server_request_duration_seconds_bucket[$__rate_interval])))", "p99 {{service_name}}")],
            unit="s", links=[slow])
    b.panel("timeseries", "Gateway requests by route", "Requests per route and status code.",
            [("sum by (http_route, http_response_status_code) "
              "(rate(http_server_request_duration_seconds_count{service_name=\"gateway\"}[$__rate_interval]))",
              "{{http_route}} {{http_response_status_code}}")], unit="reqps", w=24,
            links=[tempo_link("Gateway traces in Tempo", "{ resource.service.name = \"gateway\" }")])

    b.row("Rate limits")
    b.panel("timeseries", "Rate-limit decisions per zone", "Decisions of every zone consulted, by outcome.",
            [("sum by (zone, outcome) (rate(edge_ratelimit_decisions_total[$__rate_interval]))",
              "{{zone}} {{outcome}}")], unit="reqps", stack=True,
            links=[tempo_link("Rejected requests in Tempo", "{ span.edge.rate_limit.outcome = \"rejected\" }")])
    b.panel("timeseries", "Rejected share per zone", "Rejected / all decisions per zone (alert above 20%).",
            [("sum by (zone) (rate(edge_ratelimit_decisions_total{outcome=\"rejected\"}[$__rate_interval])) / "
              "sum by (zone) (rate(edge_ratelimit_decisions_total[$__rate_interval]))", "{{zone}}")],
            unit="percentunit")
    b.panel("timeseries", "Delay imposed (p95)", "Delay of delayed requests per zone (burst smoothing).",
            [("histogram_quantile(0.95, sum by (le, zone) (rate(edge_ratelimit_delay_seconds_bucket"
              "[$__rate_interval])))", "{{zone}}")], unit="s")
    b.panel("timeseries", "Tracked client keys", "Keys held per zone, and evictions of live keys (zone too small).",
            [("sum by (zone) (edge_ratelimit_tracked_keys)", "{{zone}}"),
             ("sum by (zone) (rate(edge_ratelimit_evictions_total[$__rate_interval]))", "evicted/s {{zone}}")])

    b.row("Kafka and workers")
    b.panel("timeseries", "Messages queued per job (consumer lag)", "Messages behind the end of each topic, per job.",
            [("sum by (worker) (worker_consumer_lag)", "{{worker}}")], stack=True)
    b.panel("timeseries", "Incoming Kafka messages per topic", "Messages our services produced, per topic.",
            [("sum by (messaging_destination_name) (rate(messaging_client_sent_messages_total"
              "[$__rate_interval]))", "{{messaging_destination_name}}")], unit="short", stack=True)
    b.panel("timeseries", "Messages processed by outcome", "accepted / rejected (validate), applied / duplicate "
            "(persist), dead_lettered (both).",
            [("sum by (worker, outcome) (rate(worker_messages_processed_total[$__rate_interval]))",
              "{{worker}} {{outcome}}")], stack=True,
            links=[tempo_link("Persist traces in Tempo", "{ name = \"process orders.validated\" }")])
    b.panel("stat", "Dead-lettered (last hour)", "Messages sent to the dead-letter topic in the last hour "
            "(alert when not zero).",
            [("sum by (worker) (increase(worker_messages_processed_total{outcome=\"dead_lettered\"}[1h]))",
              "{{worker}}")], w=6)
    b.panel("timeseries", "Retries", "Retries by cause (database, kafka).",
            [("sum by (worker, cause) (rate(worker_retries_total[$__rate_interval]))", "{{worker}} {{cause}}")],
            w=6)
    b.panel("timeseries", "Readiness", "1 when a service instance's check passes.",
            [("min by (service_name, check) (service_readiness)", "{{service_name}} {{check}}")], w=12)
    b.newline()
    return b.write()


def database():
    b = Board("orders-database", "Orders: database",
              "PostgreSQL as the services use it (their statements) and as postgres_exporter sees it.",
              ["orders-edge", "postgresql"])
    b.variable("datname", "Database", "label_values(pg_stat_database_numbackends, datname)")
    b.row("Statements")
    b.panel("stat", "Statements/s by type (now)", "Statements our services run, by operation.",
            [("sum by (db_operation_name) (rate(db_client_operation_duration_seconds_count[$__rate_interval]))",
              "{{db_operation_name}}")], unit="ops", w=8)
    b.panel("timeseries", "Statements by type", "Statements our services run, by operation and table.",
            [("sum by (db_operation_name, db_collection_name) "
              "(rate(db_client_operation_duration_seconds_count[$__rate_interval]))",
              "{{db_operation_name}} {{db_collection_name}}")], unit="ops", w=16, stack=True,
            links=[tempo_link("SQL spans in Tempo", "{ span.db.system.name = \"postgresql\" }")])
    b.panel("timeseries", "Statement latency p95", "Per operation, as the services measure it.",
            [("histogram_quantile(0.95, sum by (le, db_operation_name) "
              "(rate(db_client_operation_duration_seconds_bucket[$__rate_interval])))", "{{db_operation_name}}")],
            unit="s",
            links=[tempo_link("Slow SQL in Tempo", "{ span.db.system.name = \"postgresql\" && duration > 100ms }")])
    b.panel("timeseries", "Persist transactions", "Batch transactions of the persist job by outcome, and p95 time.",
            [("sum by (outcome) (rate(worker_db_duration_seconds_count[$__rate_interval]))", "{{outcome}}/s"),
             ("histogram_quantile(0.95, sum by (le) (rate(worker_db_duration_seconds_bucket[$__rate_interval])))",
              "p95 s")])
    b.row("PostgreSQL (postgres_exporter)")
    b.panel("timeseries", "Rows by operation", "Rows read (returned, fetched), inserted, updated, deleted.",
            [("sum(rate(pg_stat_database_tup_fetched{datname=~\"$datname\"}[$__rate_interval]))", "fetched (select)"),
             ("sum(rate(pg_stat_database_tup_inserted{datname=~\"$datname\"}[$__rate_interval]))", "inserted"),
             ("sum(rate(pg_stat_database_tup_updated{datname=~\"$datname\"}[$__rate_interval]))", "updated"),
             ("sum(rate(pg_stat_database_tup_deleted{datname=~\"$datname\"}[$__rate_interval]))", "deleted")],
            unit="rowsps")
    b.panel("timeseries", "Transactions", "Commits and rollbacks per second.",
            [("sum(rate(pg_stat_database_xact_commit{datname=~\"$datname\"}[$__rate_interval]))", "commits"),
             ("sum(rate(pg_stat_database_xact_rollback{datname=~\"$datname\"}[$__rate_interval]))", "rollbacks")],
            unit="ops")
    b.panel("timeseries", "Connections", "Server backends against max_connections, and the services' pools.",
            [("sum(pg_stat_database_numbackends{datname=~\"$datname\"})", "backends"),
             ("max(pg_settings_max_connections)", "max_connections"),
             ("sum by (service_name, state) (worker_db_pool_connections)", "pool {{service_name}} {{state}}")])
    b.panel("timeseries", "Rows scanned", "Rows returned by sequential and index scans.",
            [("sum(rate(pg_stat_database_tup_returned{datname=~\"$datname\"}[$__rate_interval]))", "returned")],
            unit="rowsps")
    b.panel("timeseries", "PostgreSQL CPU", "Kubernetes only (cAdvisor): CPU of the PostgreSQL containers.",
            [("sum by (pod) (rate(container_cpu_usage_seconds_total{container=~\"postgres.*\"}"
              "[$__rate_interval]))", "{{pod}}")], unit="percentunit")
    b.panel("stat", "PostgreSQL up", "1 when postgres_exporter reaches the server.",
            [("min(pg_up)", "up")], w=6)
    b.panel("timeseries", "Deadlocks and conflicts", "Deadlocks detected per second.",
            [("sum(rate(pg_stat_database_deadlocks{datname=~\"$datname\"}[$__rate_interval]))", "deadlocks")],
            w=6)
    b.newline()
    return b.write()


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    for path in (application(), database()):
        print(path)
