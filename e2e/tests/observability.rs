//! The monitoring files in `observability/` are checked against the real tools and the real services:
//! - the alert rules pass `promtool check rules` and their unit tests (`promtool test rules`), and every alert
//!   has a test where it fires and one where it stays silent;
//! - the dashboards are Grafana dashboard JSON whose every query parses as PromQL and whose data sources are
//!   the provisioned ones;
//! - every metric name a dashboard or an alert uses is exported by a running service of the stack (after some
//!   traffic), by a real postgres_exporter, or is listed in `external-metrics.txt` with its source.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use promql_parser::parser::{self, Expr};
use serde_json::{Value, json};
use testkit::{Service, Stack, StackOptions, eventually, free_port};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn observability(path: &str) -> PathBuf {
    repo().join("observability").join(path)
}

fn promtool(args: &[&str]) -> anyhow::Result<(bool, String)> {
    let out = Command::new("promtool").args(args).output()?;
    Ok((
        out.status.success(),
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
    ))
}

fn yaml(path: &Path) -> anyhow::Result<serde_yaml::Value> {
    Ok(serde_yaml::from_str(&std::fs::read_to_string(path)?)?)
}

/// Every alert rule: (name, expression).
fn alert_rules() -> anyhow::Result<Vec<(String, String)>> {
    let rules = yaml(&observability("prometheus/alerts.yml"))?;
    let mut out = Vec::new();
    for group in rules["groups"].as_sequence().into_iter().flatten() {
        for rule in group["rules"].as_sequence().into_iter().flatten() {
            let name = rule["alert"].as_str().unwrap_or_default().to_owned();
            out.push((name, rule["expr"].as_str().unwrap_or_default().to_owned()));
        }
    }
    Ok(out)
}

/// Every dashboard: (file name, JSON).
fn dashboards() -> anyhow::Result<Vec<(String, Value)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(observability("grafana/dashboards"))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "json") {
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            out.push((name, serde_json::from_str(&std::fs::read_to_string(&path)?)?));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// Grafana's variables replaced by values PromQL accepts.
fn substitute(expr: &str) -> String {
    expr.replace("$__rate_interval", "1m").replace("$__interval", "1m").replace("$datname", "orders")
}

/// Every PromQL query of a dashboard: (panel title, expression).
fn dashboard_queries(board: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for panel in board["panels"].as_array().into_iter().flatten() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = target["expr"].as_str() {
                out.push((panel["title"].as_str().unwrap_or_default().to_owned(), expr.to_owned()));
            }
        }
    }
    for var in board["templating"]["list"].as_array().into_iter().flatten() {
        if let Some(q) = var["query"]["query"].as_str()
            && let Some(inner) = q.strip_prefix("label_values(").and_then(|q| q.rsplit_once(',')).map(|(m, _)| m)
        {
            out.push((format!("variable {}", var["name"]), inner.to_owned()));
        }
    }
    out
}

/// The metric names an expression selects.
fn metric_names(expr: &Expr, out: &mut BTreeSet<String>) {
    match expr {
        Expr::VectorSelector(vs) => {
            if let Some(name) = &vs.name {
                out.insert(name.clone());
            }
        }
        Expr::MatrixSelector(ms) => {
            if let Some(name) = &ms.vs.name {
                out.insert(name.clone());
            }
        }
        Expr::Aggregate(a) => {
            metric_names(&a.expr, out);
            if let Some(p) = &a.param {
                metric_names(p, out);
            }
        }
        Expr::Unary(u) => metric_names(&u.expr, out),
        Expr::Binary(b) => {
            metric_names(&b.lhs, out);
            metric_names(&b.rhs, out);
        }
        Expr::Paren(p) => metric_names(&p.expr, out),
        Expr::Subquery(s) => metric_names(&s.expr, out),
        Expr::Call(c) => {
            for arg in &c.args.args {
                metric_names(arg, out);
            }
        }
        Expr::NumberLiteral(_) | Expr::StringLiteral(_) | Expr::Extension(_) => {}
    }
}

#[test]
fn alert_rules_pass_promtool_and_every_alert_is_tested_both_ways() -> anyhow::Result<()> {
    let rules = observability("prometheus/alerts.yml");
    let (ok, out) = promtool(&["check", "rules", &rules.display().to_string()])?;
    assert!(ok, "promtool check rules: {out}");
    let (ok, out) = promtool(&["test", "rules", &observability("prometheus/alerts.test.yml").display().to_string()])?;
    assert!(ok, "promtool test rules: {out}");
    let (ok, out) = promtool(&["check", "config", &observability("prometheus/prometheus.yml").display().to_string()])?;
    assert!(ok, "promtool check config: {out}");

    // The check can fail: the same rules with one expression broken are refused, with the position.
    let dir = tempfile::tempdir()?;
    let broken = dir.path().join("broken.yml");
    let text = std::fs::read_to_string(&rules)?;
    std::fs::write(&broken, text.replacen("expr: pg_up == 0", "expr: pg_up == == 0", 1))?;
    let (ok, out) = promtool(&["check", "rules", &broken.display().to_string()])?;
    assert!(!ok && out.contains("parse error"), "a broken expression passed: {out}");

    // Each alert has a test case where it fires and one where it does not.
    let tests = yaml(&observability("prometheus/alerts.test.yml"))?;
    let mut fires: BTreeMap<String, (bool, bool)> = BTreeMap::new();
    for test in tests["tests"].as_sequence().into_iter().flatten() {
        for case in test["alert_rule_test"].as_sequence().into_iter().flatten() {
            let name = case["alertname"].as_str().unwrap_or_default().to_owned();
            let expected = case["exp_alerts"].as_sequence().map_or(0, Vec::len);
            let entry = fires.entry(name).or_default();
            if expected > 0 {
                entry.0 = true;
            } else {
                entry.1 = true;
            }
        }
    }
    let alerts = alert_rules()?;
    assert!(alerts.len() >= 6, "{alerts:?}");
    for (name, _) in &alerts {
        assert_eq!(fires.get(name), Some(&(true, true)), "alert {name} needs a firing and a silent test case");
    }
    Ok(())
}

#[test]
fn dashboards_are_grafana_json_with_parsable_queries_and_provisioned_sources() -> anyhow::Result<()> {
    let sources = yaml(&observability("grafana/provisioning/datasources/datasources.yml"))?;
    let uids: HashSet<String> = sources["datasources"]
        .as_sequence()
        .into_iter()
        .flatten()
        .filter_map(|d| d["uid"].as_str().map(str::to_owned))
        .collect();
    assert!(uids.contains("prometheus") && uids.contains("tempo"), "{uids:?}");

    let boards = dashboards()?;
    let names: Vec<&str> = boards.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["application.json", "database.json"]);
    let mut board_uids = HashSet::new();
    for (file, board) in &boards {
        for key in ["uid", "title"] {
            assert!(board[key].as_str().is_some_and(|v| !v.is_empty()), "{file}: {key}");
        }
        assert!(board_uids.insert(board["uid"].as_str().unwrap_or_default().to_owned()), "{file}: duplicate uid");
        assert!(board["schemaVersion"].as_u64().is_some_and(|v| v >= 36), "{file}: schemaVersion");
        let vars: Vec<&str> =
            board["templating"]["list"].as_array().into_iter().flatten().filter_map(|v| v["name"].as_str()).collect();
        assert!(vars.contains(&"datasource"), "{file}: a datasource variable");

        let mut ids = HashSet::new();
        let mut cells = HashSet::new();
        let mut trace_links = 0;
        for panel in board["panels"].as_array().into_iter().flatten() {
            let title = panel["title"].as_str().unwrap_or_default();
            assert!(ids.insert(panel["id"].as_u64().unwrap_or(0)), "{file}: duplicate panel id at {title}");
            let kind = panel["type"].as_str().unwrap_or_default();
            assert!(
                ["row", "timeseries", "stat", "table", "gauge", "bargauge"].contains(&kind),
                "{file}: {title}: {kind}"
            );
            let g = &panel["gridPos"];
            let (x, y, w, h) = (g["x"].as_u64(), g["y"].as_u64(), g["w"].as_u64(), g["h"].as_u64());
            let (Some(x), Some(y), Some(w), Some(h)) = (x, y, w, h) else { panic!("{file}: {title}: gridPos {g}") };
            assert!(w > 0 && h > 0 && x + w <= 24, "{file}: {title}: gridPos {g}");
            for cx in x..x + w {
                for cy in y..y + h {
                    assert!(cells.insert((cx, cy)), "{file}: {title} overlaps another panel at {cx},{cy}");
                }
            }
            if kind == "row" {
                continue;
            }
            assert!(panel["datasource"]["uid"] == json!("${datasource}"), "{file}: {title}: datasource");
            let targets = panel["targets"].as_array().map_or(0, Vec::len);
            assert!(targets > 0, "{file}: {title}: no query");
            for link in panel["fieldConfig"]["defaults"]["links"].as_array().into_iter().flatten() {
                let url = link["url"].as_str().unwrap_or_default();
                assert!(url.starts_with("/explore?") && url.contains("%22tempo%22"), "{file}: {title}: {url}");
                trace_links += 1;
            }
        }
        assert!(trace_links >= 2, "{file}: panels link to Tempo");
        for (title, expr) in dashboard_queries(board) {
            if let Err(e) = parser::parse(&substitute(&expr)) {
                panic!("{file}: {title}: {expr}: {e}");
            }
        }
    }
    // The parser is the real thing: a broken query is refused.
    assert!(parser::parse("sum by (zone) (rate(edge_ratelimit_decisions_total[1m])").is_err());
    Ok(())
}

/// The metric names of a Prometheus text exposition (histograms and summaries by their family name too).
fn exported_names(text: &str, into: &mut BTreeSet<String>) {
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
        let name = line.split(['{', ' ']).next().unwrap_or_default();
        into.insert(name.to_owned());
    }
}

/// Debian's postgres_exporter against `url`, listening on `port` (stopped when dropped).
fn postgres_exporter(url: &str, port: u16, dir: &Path) -> anyhow::Result<Service> {
    let url = if url.contains('?') { format!("{url}&sslmode=disable") } else { format!("{url}?sslmode=disable") };
    Service::spawn(
        "postgres_exporter",
        Path::new("/usr/bin/prometheus-postgres-exporter"),
        &[&format!("--web.listen-address=127.0.0.1:{port}")],
        &[("DATA_SOURCE_NAME".to_owned(), url)],
        dir,
    )
}

/// A policy whose zone delays a client's second request (so the delay histogram has data) and otherwise lets
/// everything through.
const DELAYING_POLICY: &str = "[zones.per_ip]\nrate = \"2r/s\"\nburst = 50\n\
                               [[routes]]\npath_prefix = \"/\"\nzones = [\"per_ip\"]\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboards_and_alerts_use_is_exported() -> anyhow::Result<()> {
    let stack = Stack::start(StackOptions { policy: DELAYING_POLICY.to_owned(), ..StackOptions::default() }).await?;
    let exporter_port = free_port();
    let _exporter = postgres_exporter(&stack.postgres.url(), exporter_port, stack.dir.path())?;

    // Traffic that touches every path: sync orders (accepted, rejected), a read, and a delayed request.
    let client = stack.https_client()?;
    let token = stack.token();
    let mut ids = Vec::new();
    for currency in ["EUR", "EUR", "XXX"] {
        let body = json!({"customer_id": "metrics", "currency": currency,
                          "items": [{"sku": "SKU-1", "qty": 1, "unit_price_cents": 100}]});
        let r = client.post(format!("{}/v1/orders", stack.edge_url())).bearer_auth(&token).json(&body).send().await?;
        assert!([201, 422].contains(&r.status().as_u16()), "{}", r.status());
        ids.push(r.json::<Value>().await?["id"].as_str().unwrap_or_default().to_owned());
    }
    let first = ids[0].clone();
    eventually(Duration::from_secs(20), "the order stored", || async {
        let r = client.get(format!("{}/v1/orders/{first}", stack.edge_url())).bearer_auth(&token).send().await.ok()?;
        (r.status().as_u16() == 200).then_some(())
    })
    .await?;

    let mut exported = BTreeSet::new();
    for port in [stack.ports.edge_admin, stack.ports.gateway_admin, stack.ports.workers_admin] {
        let text = reqwest::get(stack.admin_url(port, "/metrics")).await?.text().await?;
        for line in text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
            assert_eq!(line.matches("service_name=").count(), 1, "one service_name label per sample: {line}");
        }
        exported_names(&text, &mut exported);
    }
    let pg = eventually(Duration::from_secs(20), "postgres_exporter's metrics", || async {
        let text = reqwest::get(format!("http://127.0.0.1:{exporter_port}/metrics")).await.ok()?.text().await.ok()?;
        text.lines().any(|l| l.starts_with("pg_up ") && l.ends_with(" 1")).then_some(text)
    })
    .await?;
    exported_names(&pg, &mut exported);
    let external: BTreeSet<String> = std::fs::read_to_string(observability("external-metrics.txt"))?
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect();

    let mut used: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut add = |place: String, expr: &str| -> anyhow::Result<()> {
        let ast = parser::parse(&substitute(expr)).map_err(|e| anyhow::anyhow!("{place}: {e}"))?;
        let mut names = BTreeSet::new();
        metric_names(&ast, &mut names);
        for n in names {
            used.entry(n).or_default().insert(place.clone());
        }
        Ok(())
    };
    for (name, expr) in alert_rules()? {
        add(format!("alert {name}"), &expr)?;
    }
    for (file, board) in dashboards()? {
        for (title, expr) in dashboard_queries(&board) {
            add(format!("{file}: {title}"), &expr)?;
        }
    }
    assert!(used.len() >= 25, "{used:?}");
    let missing: Vec<String> = used
        .iter()
        .filter(|(name, _)| {
            let family = ["_bucket", "_count", "_sum"].iter().find_map(|s| name.strip_suffix(s)).unwrap_or(name);
            !exported.contains(name.as_str()) && !exported.contains(family) && !external.contains(name.as_str())
        })
        .map(|(name, places)| format!("{name} (used by {places:?})"))
        .collect();
    assert!(missing.is_empty(), "metrics used but not exported: {missing:#?}\nexported: {exported:?}");

    // The names the services export follow Prometheus conventions: counters end in _total, durations in
    // _seconds, no dots or upper case.
    for name in
        exported.iter().filter(|n| !n.starts_with("pg_") && !n.starts_with("go_") && !n.starts_with("promhttp_"))
    {
        assert!(name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'), "{name}");
        assert!(!name.contains("_duration") || name.contains("_duration_seconds"), "{name}: a duration in seconds");
    }
    Ok(())
}
