#!/usr/bin/env python3
"""Renders a load-test run directory into a report: five PNG plots, report.md and report.html.

    python3 loadtest/report.py RUN_DIR       # writes into RUN_DIR, prints the path of report.md
    python3 loadtest/report.py --self-test   # checks the parsing and arithmetic helpers; exit 0 or 1

RUN_DIR holds what the scenario runner wrote:
- summary.json: the scenario, its phases, the loads and their results, facts and invariants;
- metrics.jsonl: one JSON object per line, about one per second, `t` being seconds since the run started:
  a service's Prometheus samples {"t", "service", "lines"} (no row while the service was down), or the
  runner's own measures {"t", "service": "loadtest", "lag": {job: messages}, "orders": stored orders}.

Rates and quantiles follow Prometheus: a counter that goes down was reset by a restart, so its new value is
the increase (as in rate()), and a quantile interpolates linearly inside its histogram bucket (as in
histogram_quantile()). Only the standard library and matplotlib are used.
"""

import argparse
import html
import itertools
import json
import math
import re
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Hashable

RUNNER = "loadtest"  # the `service` of the runner's own rows in metrics.jsonl
REQUESTS = "http_server_request_duration_seconds"  # the edge's and the gateway's request histogram
QUANTILES = {"p50": 0.5, "p90": 0.9, "p99": 0.99}


class ReportError(Exception):
    """A run directory that cannot be rendered: a file missing or malformed. The message says where."""


# ---------------------------------------------------------------------------------------------------------
# The Prometheus text format
# ---------------------------------------------------------------------------------------------------------

_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"')
_SPACE = re.compile(r"\s*")
_ESCAPE = re.compile(r"\\(.)")


def parse_sample(line: str) -> tuple[str, dict[str, str], float]:
    """Parses one sample line of the Prometheus text format, `name value` or `name{k="v",...} value`, with an
    optional timestamp after the value (ignored). Label values are unescaped (\\\\, \\" and \\n); the value
    may be NaN, +Inf, -Inf or in scientific notation. Raises ValueError when the line is not a sample."""
    match = _NAME.match(line)
    if match is None:
        raise ValueError("no metric name at the start of the line")
    name, pos = match.group(), match.end()
    labels = {}
    if line.startswith("{", pos):
        pos += 1
        while True:
            pos = _SPACE.match(line, pos).end()
            if line.startswith("}", pos):  # also after a trailing comma, which the format allows
                break
            match = _LABEL.match(line, pos)
            if match is None:
                raise ValueError(f'expected label="value" at column {pos + 1}')
            labels[match.group(1)] = _ESCAPE.sub(lambda e: "\n" if e.group(1) == "n" else e.group(1), match.group(2))
            pos = _SPACE.match(line, match.end()).end()
            if line.startswith(",", pos):
                pos += 1
            elif not line.startswith("}", pos):
                raise ValueError(f"expected ',' or '}}' at column {pos + 1}")
        pos += 1
    fields = line[pos:].split()
    if len(fields) not in (1, 2):
        raise ValueError("expected a value, and optionally a timestamp, after the name and labels")
    try:
        value = float(fields[0])
    except ValueError:
        raise ValueError(f"the value {fields[0]!r} is not a number") from None
    return name, labels, value


# ---------------------------------------------------------------------------------------------------------
# Counters and histograms over successive scrapes
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Scrape:
    """One scrape of one service: its samples, (labels, value) pairs by metric name."""

    t: float
    samples: dict[str, list[tuple[dict[str, str], float]]]


@dataclass
class Series:
    """Lines over time sharing one x axis: per line label, one y value per time (NaN breaks the line)."""

    times: list[float]
    lines: dict[Hashable, list[float]]


def counter_increase(previous: float | None, current: float) -> float:
    """How much a counter grew between two scrapes. A counter that went down was reset by a restart and
    counted again from 0, so its new value is the increase (as Prometheus's rate() reads it); a series absent
    from the previous scrape (`None`) appeared since, so all of its value is new too."""
    if previous is None or current < previous:
        return current
    return current - previous


def interval_increases(
    scrapes: list[Scrape], name: str, group_of: Callable[[dict[str, str]], Hashable]
) -> list[tuple[float, float, dict[Hashable, float]]]:
    """The increase of the counters named `name` over each interval between two consecutive scrapes of one
    service, summed per group of series (group_of maps a series' labels to its group): a list of (end of the
    interval, its length in seconds, {group: increase}). Each series is compared with its own value in the
    previous scrape, so that a restart (a reset) and series appearing later are both counted right."""
    out = []
    previous: dict[tuple, float] | None = None
    previous_t = 0.0
    for scrape in scrapes:
        current = {}
        by_group: dict[Hashable, float] = {}
        for labels, value in scrape.samples.get(name, ()):
            key = tuple(sorted(labels.items()))
            current[key] = value
            if previous is not None:
                group = group_of(labels)
                by_group[group] = by_group.get(group, 0.0) + counter_increase(previous.get(key), value)
        if previous is not None:
            out.append((scrape.t, scrape.t - previous_t, by_group))
        previous, previous_t = current, scrape.t
    return out


def gap_limit(intervals: list[float]) -> float:
    """The longest interval between two scrapes still read as continuous: three times the usual (median) one.
    A longer one means the service was down or unreachable in between; its rates are left out (NaN), so the
    plotted lines break there instead of drawing an average over the outage."""
    return 3 * statistics.median(intervals) if intervals else math.inf


def counter_rates(scrapes: list[Scrape], name: str, group_of: Callable[[dict[str, str]], Hashable]) -> Series:
    """Per-second rates of the counters named `name`, per group, over each interval between scrapes (at the
    end of the interval). A group absent from an interval had no increase: 0."""
    increases = interval_increases(scrapes, name, group_of)
    limit = gap_limit([dt for _, dt, _ in increases])
    groups = sorted({group for _, _, by_group in increases for group in by_group}, key=str)
    lines = {
        group: [by_group.get(group, 0.0) / dt if 0 < dt <= limit else math.nan for _, dt, by_group in increases]
        for group in groups
    }
    return Series([t for t, _, _ in increases], lines)


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """The q-quantile (0 <= q <= 1) of a histogram given as (upper bound `le`, cumulative count) pairs, as
    Prometheus's histogram_quantile() computes it: linear interpolation inside the bucket where the rank
    falls, the first bucket starting at 0; the highest finite bound when the rank falls in the +Inf bucket;
    NaN when the histogram is empty or has no +Inf bucket."""
    buckets = sorted(buckets)
    if len(buckets) < 2 or buckets[-1][0] != math.inf:
        return math.nan
    # Bucket counts from series reset at different moments can dip: made cumulative again, as Prometheus does.
    counts = list(itertools.accumulate((count for _, count in buckets), max))
    if not counts[-1] > 0:  # also false for NaN
        return math.nan
    rank = q * counts[-1]
    b = next((i for i, count in enumerate(counts[:-1]) if count >= rank), len(buckets) - 1)
    if b == len(buckets) - 1:
        return buckets[-2][0]
    upper = buckets[b][0]
    if b == 0:
        if upper <= 0:
            return upper
        lower, below = 0.0, 0.0
    else:
        lower, below = buckets[b - 1][0], counts[b - 1]
    return lower + (upper - lower) * (rank - below) / (counts[b] - below)


def latency_quantiles_ms(scrapes: list[Scrape], family: str) -> Series:
    """QUANTILES of the histogram `family` (in seconds) over each interval between scrapes, in milliseconds:
    bucket increases summed per `le` over every other label. NaN for an interval without observations."""
    increases = interval_increases(scrapes, f"{family}_bucket", lambda labels: float(labels["le"]))
    limit = gap_limit([dt for _, dt, _ in increases])
    lines: dict[Hashable, list[float]] = {label: [] for label in QUANTILES}
    for _, dt, by_le in increases:
        for label, q in QUANTILES.items():
            lines[label].append(1000 * histogram_quantile(q, list(by_le.items())) if dt <= limit else math.nan)
    return Series([t for t, _, _ in increases], lines)


def status_class(labels: dict[str, str]) -> str:
    """A request series' status class: the edge's status_class label, else the first digit of the status
    code (the gateway's http_response_status_code), else "other"."""
    if "status_class" in labels:
        return labels["status_class"]
    code = labels.get("http_response_status_code", "")
    return f"{code[0]}xx" if code[:1].isdigit() else "other"


# ---------------------------------------------------------------------------------------------------------
# Reading the run directory
# ---------------------------------------------------------------------------------------------------------

NUMBER = (int, float)
_KIND_NAMES = {str: "a string", bool: "true or false", int: "an integer", NUMBER: "a number", list: "a list",
               dict: "an object"}


def _value(value, kind, where: str):
    """value, checked to be of kind (a key of _KIND_NAMES; JSON's true and false are not numbers). `where` is
    the value's place in the document, for the error message."""
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ReportError(f"{where}: expected {_KIND_NAMES[kind]}, got {json.dumps(value)[:80]}")
    return value


def _field(obj: dict, key: str, kind, where: str = ""):
    """obj[key], checked to be of kind; `where` is obj's place in the document ("" for the top level)."""
    if key not in obj:
        raise ReportError(f"{where or 'top level'}: missing {key!r}")
    return _value(obj[key], kind, f"{where}.{key}" if where else key)


def _objects(obj: dict, key: str, where: str = "") -> list[tuple[dict, str]]:
    """The list obj[key] of JSON objects, each with its place in the document."""
    items = _field(obj, key, list, where)
    place = f"{where}.{key}" if where else key
    return [(_value(item, dict, f"{place}[{i}]"), f"{place}[{i}]") for i, item in enumerate(items)]


@dataclass
class Phase:
    name: str
    start: float
    end: float
    action: str


@dataclass
class Load:
    phase: str
    name: str
    requests: int
    rps: float
    latency_ms: dict[str, float]  # p50, p90, p99, max
    statuses: dict[str, int]  # status code -> requests
    errors: dict[str, int]  # kind (connect, read, ...) -> count


@dataclass
class Invariant:
    name: str
    ok: bool
    detail: str


@dataclass
class Summary:
    scenario: str
    title: str
    description: str
    started_at: str
    machine: str
    binaries: str
    phases: list[Phase]
    loads: list[Load]
    facts: list[tuple[str, str]]
    invariants: list[Invariant]
    passed: bool


def load_summary(path: Path) -> Summary:
    """Reads and checks summary.json."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ReportError(f"{path}: missing (the scenario runner writes it)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ReportError(f"{path}: cannot be read as JSON: {e}") from None
    try:
        return parse_summary(_value(doc, dict, "top level"))
    except ReportError as e:
        raise ReportError(f"{path}: {e}") from None


def parse_summary(doc: dict) -> Summary:
    """The summary in summary.json's document, checked."""
    text = {key: _field(doc, key, str) for key in ("scenario", "title", "description", "started_at", "machine",
                                                   "binaries")}
    phases = [
        Phase(_field(p, "name", str, w), float(_field(p, "start", NUMBER, w)), float(_field(p, "end", NUMBER, w)),
              _field(p, "action", str, w))
        for p, w in _objects(doc, "phases")
    ]
    loads = []
    for load, w in _objects(doc, "loads"):
        latency = _field(load, "latency_ms", dict, w)
        statuses, errors = _field(load, "statuses", dict, w), _field(load, "errors", dict, w)
        loads.append(Load(
            phase=_field(load, "phase", str, w),
            name=_field(load, "name", str, w),
            requests=_field(load, "requests", int, w),
            rps=float(_field(load, "rps", NUMBER, w)),
            latency_ms={key: float(_field(latency, key, NUMBER, f"{w}.latency_ms"))
                        for key in ("p50", "p90", "p99", "max")},
            statuses={code: _value(n, int, f"{w}.statuses.{code}") for code, n in statuses.items()},
            errors={kind: _value(n, int, f"{w}.errors.{kind}") for kind, n in errors.items()},
        ))
    facts = []
    for i, fact in enumerate(_field(doc, "facts", list)):
        if not (isinstance(fact, list) and len(fact) == 2):
            raise ReportError(f"facts[{i}]: expected a [label, value] pair, got {json.dumps(fact)[:80]}")
        facts.append((_value(fact[0], str, f"facts[{i}][0]"), _value(fact[1], str, f"facts[{i}][1]")))
    invariants = [
        Invariant(_field(inv, "name", str, w), _field(inv, "ok", bool, w), _field(inv, "detail", str, w))
        for inv, w in _objects(doc, "invariants")
    ]
    return Summary(**text, phases=phases, loads=loads, facts=facts, invariants=invariants,
                   passed=_field(doc, "passed", bool))


def _is_number(text: str | None) -> bool:
    """Whether text is a number as the Prometheus text format writes one (1, 0.5, 1e-3, +Inf, NaN)."""
    try:
        float(text)
    except (TypeError, ValueError):
        return False
    return True


@dataclass
class RunnerRow:
    """The runner's own measures at one moment: consumer lag per job and orders stored, when measured."""

    t: float
    lag: dict[str, float]
    orders: float | None


@dataclass
class Metrics:
    scrapes: dict[str, list[Scrape]]  # service -> its scrapes in time order
    runner: list[RunnerRow]  # in time order


def load_metrics(path: Path) -> Metrics:
    """Reads and checks metrics.jsonl."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ReportError(f"{path}: missing (the scenario runner writes it)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ReportError(f"{path}: cannot be read: {e}") from None
    scrapes: dict[str, list[Scrape]] = {}
    runner: list[RunnerRow] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = parse_row(line)
        except ReportError as e:
            raise ReportError(f"{path}:{number}: {e}") from None
        if isinstance(row, RunnerRow):
            runner.append(row)
        else:
            scrapes.setdefault(row[0], []).append(row[1])
    for service_scrapes in scrapes.values():
        service_scrapes.sort(key=lambda s: s.t)
    runner.sort(key=lambda r: r.t)
    return Metrics(scrapes, runner)


def parse_row(line: str) -> RunnerRow | tuple[str, Scrape]:
    """One line of metrics.jsonl: the runner's measures, or a service's name and its scrape."""
    try:
        row = _value(json.loads(line), dict, "the line")
    except json.JSONDecodeError as e:
        raise ReportError(f"not JSON: {e}") from None
    t = float(_field(row, "t", NUMBER))
    service = _field(row, "service", str)
    if service == RUNNER:
        lag = {}
        measured = row.get("lag")
        for job, v in _value({} if measured is None else measured, dict, "lag").items():
            if v is not None:  # null: not measured at that moment
                lag[job] = float(_value(v, NUMBER, f"lag.{job}"))
        orders = row.get("orders")
        return RunnerRow(t, lag, None if orders is None else float(_value(orders, NUMBER, "orders")))
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for i, sample in enumerate(_field(row, "lines", list)):
        try:
            name, labels, value = parse_sample(_value(sample, str, f"lines[{i}]"))
        except ValueError as e:
            raise ReportError(f"lines[{i}]: {e}: {sample}") from None
        if name.endswith("_bucket") and not _is_number(labels.get("le")):
            raise ReportError(f"lines[{i}]: a histogram bucket without a numeric le label: {sample}")
        samples.setdefault(name, []).append((labels, value))
    return service, Scrape(t, samples)


# ---------------------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------------------

STATUS_COLORS = {"1xx": "tab:gray", "2xx": "tab:green", "3xx": "tab:blue", "4xx": "tab:orange", "5xx": "tab:red"}
OUTCOME_COLORS = {"immediate": "tab:green", "delayed": "tab:orange", "rejected": "tab:red"}
QUANTILE_COLORS = {"p50": "tab:blue", "p90": "tab:orange", "p99": "tab:red"}
OTHER_COLORS = ["tab:blue", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:gray", "tab:green",
                "tab:orange", "tab:red"]
PHASE_SHADES = ["#e6edf5", "#f6f6f6"]  # alternating backgrounds of consecutive phases


def colors_for(keys, fixed: dict[str, str]) -> dict:
    """A color per key: its fixed one when it has one, else the next of OTHER_COLORS that no fixed one uses."""
    spare = itertools.cycle([c for c in OTHER_COLORS if c not in fixed.values()])
    return {key: fixed[key] if key in fixed else next(spare) for key in keys}


def drawable(values: list[float]) -> bool:
    """Whether a line has anything to show: a value that is neither 0 nor NaN."""
    return any(v != 0 and not math.isnan(v) for v in values)


class Plotter:
    """Draws the plots of one run with a shared time axis and the phases as shaded, labelled bands."""

    def __init__(self, run_dir: Path, phases: list[Phase], end: float):
        # Imported here so that --self-test and errors in the input do not wait for matplotlib.
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker as ticker

        self.plt, self.ticker = plt, ticker
        self.run_dir, self.phases, self.end = run_dir, phases, end

    def figure(self, title: str, ylabels: list[str]):
        """A figure of one subplot per y label, stacked, with the phases drawn and the x axis labelled."""
        fig, axes = self.plt.subplots(len(ylabels), 1, figsize=(10, 1.2 + 2.8 * len(ylabels)), dpi=100,
                                      sharex=True, squeeze=False, layout="constrained")
        axes = list(axes[:, 0])
        fig.suptitle(title, fontsize=13)
        for i, (ax, ylabel) in enumerate(zip(axes, ylabels)):
            ax.set_xlim(0, self.end)
            ax.set_ylabel(ylabel)
            ax.grid(True, color="#dddddd", linewidth=0.6)
            for n, phase in enumerate(self.phases):
                ax.axvspan(phase.start, phase.end, color=PHASE_SHADES[n % 2], zorder=0, linewidth=0)
                if n > 0:
                    ax.axvline(phase.start, color="#aaaaaa", linewidth=0.8, zorder=1)
                if i == 0:  # phase names once, above the top subplot
                    ax.text((phase.start + phase.end) / 2, 1.01, phase.name, transform=ax.get_xaxis_transform(),
                            ha="center", va="bottom", fontsize=9, color="#444444")
        axes[-1].set_xlabel("seconds since start")
        return fig, axes

    @staticmethod
    def note(ax, text: str) -> None:
        """A grey note in the middle of the subplot, for missing or all-zero data."""
        ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=14, color="#888888")

    @staticmethod
    def legend(ax, handles=None) -> None:
        """The legend, in rows under the subplot so that it hides no data (nor a second y axis)."""
        if handles is None:
            handles = ax.get_legend_handles_labels()[0]
        if handles:
            # Below the x axis' labels on the bottom subplot, right under the axis on the others.
            below = -0.17 if ax.get_subplotspec().is_last_row() else -0.03
            ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, below), ncol=min(len(handles), 6),
                      frameon=False, fontsize=9)

    def rates(self, ax, series: list[tuple[str, Series]], fixed_colors: dict[str, str], empty: str) -> None:
        """Draws per-second rates, one line per (label prefix, group) that is not zero throughout, with notes
        when there is no data at all or only zeros (the `empty` note)."""
        labelled = [(f"{prefix}{group}", s.times, values) for prefix, s in series for group, values in s.lines.items()]
        shown = [line for line in labelled if drawable(line[2])]
        colors = colors_for([label for label, _, _ in shown], fixed_colors)
        for label, times, values in shown:
            ax.plot(times, values, label=label, color=colors[label], linewidth=1.4)
        ax.set_ylim(bottom=0)
        if not labelled:
            self.note(ax, "no data")
        elif not shown:
            self.note(ax, empty)
        self.legend(ax)

    def save(self, fig, name: str) -> None:
        fig.savefig(self.run_dir / name)
        self.plt.close(fig)


def plot_requests(p: Plotter, metrics: Metrics) -> str:
    """requests.png: requests per second by status class, at the edge (else the gateway); returns its caption."""
    source = "edge" if _has(metrics, "edge", f"{REQUESTS}_count") else "gateway"
    series = counter_rates(metrics.scrapes.get(source, []), f"{REQUESTS}_count", status_class)
    fig, (ax,) = p.figure(f"Requests per second by status class ({source})", ["requests/s"])
    p.rates(ax, [("", series)], STATUS_COLORS, "no requests")
    p.save(fig, "requests.png")
    if source == "edge":
        return "Requests per second at the edge, by status class."
    return "Requests per second at the gateway, by status class (the edge reported none)."


def plot_latency(p: Plotter, metrics: Metrics) -> str:
    """latency.png: p50, p90 and p99 per scrape interval, edge solid and gateway dashed; returns its caption."""
    fig, (ax,) = p.figure("Request latency per scrape interval", ["ms (log scale)"])
    drawn = False
    for service, style in (("edge", "-"), ("gateway", "--")):
        series = latency_quantiles_ms(metrics.scrapes.get(service, []), REQUESTS)
        for label, values in series.lines.items():
            if any(not math.isnan(v) for v in values):
                ax.plot(series.times, values, style, color=QUANTILE_COLORS[label], label=f"{service} {label}",
                        linewidth=1.4)
                drawn = True
    if drawn:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(p.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    else:
        p.note(ax, "no data")
    p.legend(ax)
    p.save(fig, "latency.png")
    return ("Request latency (p50, p90, p99, in ms on a log scale) over each scrape interval, from the histogram "
            "buckets: edge solid, gateway dashed.")


def plot_lag(p: Plotter, metrics: Metrics) -> str:
    """lag.png: consumer lag per job and orders stored (second y axis), from the runner; returns its caption."""
    fig, (ax,) = p.figure("Consumer lag and orders stored", ["messages behind"])
    times = [row.t for row in metrics.runner]
    jobs = sorted({job for row in metrics.runner for job in row.lag})
    colors = colors_for(jobs, {})
    for job in jobs:
        ax.plot(times, [row.lag.get(job, math.nan) for row in metrics.runner], color=colors[job],
                label=f"lag: {job}", linewidth=1.4)
    ax.set_ylim(bottom=0)
    handles = ax.get_legend_handles_labels()[0]
    orders = [math.nan if row.orders is None else row.orders for row in metrics.runner]
    if any(not math.isnan(v) for v in orders):
        right = ax.twinx()
        handles += right.plot(times, orders, "--", color="black", label="orders stored", linewidth=1.2)
        right.set_ylabel("orders stored")
        right.set_ylim(bottom=0)
    if not handles:
        p.note(ax, "no data")
    p.legend(ax, handles)
    p.save(fig, "lag.png")
    return ("Consumer lag per job (messages behind, left axis) and orders stored in PostgreSQL (right axis, "
            "dashed), both measured by the runner.")


def plot_ratelimit(p: Plotter, metrics: Metrics) -> str:
    """ratelimit.png: the edge's rate-limit decisions per second by outcome; returns its caption."""
    series = counter_rates(metrics.scrapes.get("edge", []), "edge_ratelimit_decisions_total",
                           lambda labels: labels.get("outcome", "unknown"))
    fig, (ax,) = p.figure("Rate-limit decisions per second by outcome (edge)", ["decisions/s"])
    p.rates(ax, [("", series)], OUTCOME_COLORS, "no decisions")
    p.save(fig, "ratelimit.png")
    return "Rate-limit decisions per second at the edge, by outcome, all zones together."


def plot_database(p: Plotter, metrics: Metrics) -> str:
    """database.png: database operations per second by operation, over worker retries per second by cause;
    returns its caption."""
    fig, (top, bottom) = p.figure("Database operations and worker retries", ["operations/s", "retries/s"])
    operations = per_service_rates(metrics, "db_client_operation_duration_seconds_count",
                                   lambda labels: labels.get("db_operation_name", "unknown"))
    p.rates(top, operations, {}, "no operations")
    retries = per_service_rates(metrics, "worker_retries_total", lambda labels: labels.get("cause", "unknown"))
    p.rates(bottom, retries, {}, "no retries")
    p.save(fig, "database.png")
    return "Database operations per second by operation (top) and worker retries per second by cause (bottom)."


def per_service_rates(
    metrics: Metrics, name: str, group_of: Callable[[dict[str, str]], Hashable]
) -> list[tuple[str, Series]]:
    """counter_rates of `name` in each service that reports it, each with the prefix of its lines' labels:
    none when one service reports it, else the service's name."""
    services = sorted(s for s in metrics.scrapes if _has(metrics, s, name))
    return [(f"{s}: " if len(services) > 1 else "", counter_rates(metrics.scrapes[s], name, group_of))
            for s in services]


def _has(metrics: Metrics, service: str, name: str) -> bool:
    """Whether any scrape of the service has a sample named `name`."""
    return any(name in scrape.samples for scrape in metrics.scrapes.get(service, []))


# ---------------------------------------------------------------------------------------------------------
# The report, as Markdown and as HTML, from one list of blocks
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Heading:
    level: int
    text: str


@dataclass
class Paragraph:
    text: str


@dataclass
class Verdict:
    passed: bool


@dataclass
class Fields:
    pairs: list[tuple[str, str]]


@dataclass
class Table:
    headers: list[str]
    align: str  # one letter per column: "l" or "r"
    rows: list[list[str]]


@dataclass
class Figure:
    file: str
    title: str
    caption: str


def _ms(v: float) -> str:
    """A latency in ms with about three significant digits."""
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}" if v >= 1 else f"{v:.2f}"


def _table_or_none(headers: list[str], align: str, rows: list[list[str]], none: str):
    return Table(headers, align, rows) if rows else Paragraph(none)


def report_blocks(summary: Summary, figures: list[Figure]) -> list:
    """The report's content, in order."""
    loads = [
        [load.phase, load.name, str(load.requests), f"{load.rps:.1f}",
         *(_ms(load.latency_ms[k]) for k in ("p50", "p90", "p99", "max")),
         ", ".join(f"{code}×{n}" for code, n in sorted(load.statuses.items())) or "none",
         ", ".join(f"{kind} {n}" for kind, n in load.errors.items() if n) or "0"]
        for load in summary.loads
    ]
    return [
        Heading(1, summary.title),
        Verdict(summary.passed),
        Fields([("Scenario", summary.scenario), ("Started at", summary.started_at), ("Machine", summary.machine),
                ("Binaries", summary.binaries)]),
        Paragraph(summary.description),
        Heading(2, "Phases"),
        _table_or_none(["Phase", "From (s)", "To (s)", "Action"], "lrrl",
                       [[p.name, f"{p.start:g}", f"{p.end:g}", p.action] for p in summary.phases], "No phases."),
        Heading(2, "Loads"),
        _table_or_none(["Phase", "Load", "Requests", "req/s", "p50 ms", "p90 ms", "p99 ms", "max ms", "Statuses",
                        "Errors"], "llrrrrrrll", loads, "No load."),
        Heading(2, "Facts"),
        _table_or_none(["Fact", "Value"], "ll", [list(f) for f in summary.facts], "No facts."),
        Heading(2, "Invariants"),
        _table_or_none(["", "Invariant", "Detail"], "lll",
                       [["✅" if i.ok else "❌", i.name, i.detail] for i in summary.invariants], "No invariants."),
        Heading(2, "Over time"),
        *figures,
    ]


_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>|#])")


def _md(text: str) -> str:
    """Text safe in Markdown: special characters backslash-escaped, on one line (for table cells)."""
    return _MD_SPECIAL.sub(r"\\\1", " ".join(text.split()))


def to_markdown(blocks: list) -> str:
    out = []
    for block in blocks:
        match block:
            case Heading(level, text):
                out.append(f"{'#' * level} {_md(text)}")
            case Paragraph(text):
                out.append(_md(text))
            case Verdict(passed):
                out.append("**PASSED** ✅" if passed else "**FAILED** ❌")
            case Fields(pairs):
                out.append("\n".join(f"- **{_md(k)}:** {_md(v)}" for k, v in pairs))
            case Table(headers, align, rows):
                lines = ["| " + " | ".join(_md(h) for h in headers) + " |",
                         "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
                lines += ["| " + " | ".join(_md(cell) for cell in row) + " |" for row in rows]
                out.append("\n".join(lines))
            case Figure(file, title, caption):
                out.append(f"![{_md(title)}]({file})\n\n*{_md(caption)}*")
    return "\n\n".join(out) + "\n"


_CSS = """
body { font-family: system-ui, sans-serif; max-width: 72rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
h1 { margin-bottom: 0.3rem; } h2 { margin-top: 2rem; border-bottom: 1px solid #ddd; }
.verdict { font-weight: bold; font-size: 1.2rem; } .passed { color: #1a7f37; } .failed { color: #cf222e; }
table { border-collapse: collapse; } th, td { border: 1px solid #ddd; padding: 0.3rem 0.6rem; }
th { background: #f4f4f4; } td.r, th.r { text-align: right; } tr:nth-child(even) td { background: #fafafa; }
figure { margin: 1.5rem 0; } img { max-width: 100%; } figcaption { color: #555; font-style: italic; }
""".strip()


def to_html(blocks: list, title: str) -> str:
    e = html.escape
    out = []
    for block in blocks:
        match block:
            case Heading(level, text):
                out.append(f"<h{level}>{e(text)}</h{level}>")
            case Paragraph(text):
                out.append(f"<p>{e(text)}</p>")
            case Verdict(passed):
                out.append('<p class="verdict passed">PASSED ✅</p>' if passed
                           else '<p class="verdict failed">FAILED ❌</p>')
            case Fields(pairs):
                out.append("<ul>" + "".join(f"<li><strong>{e(k)}:</strong> {e(v)}</li>" for k, v in pairs) + "</ul>")
            case Table(headers, align, rows):
                head = "".join(f'<th class="{a}">{e(h)}</th>' for h, a in zip(headers, align))
                body = "".join("<tr>" + "".join(f'<td class="{a}">{e(c)}</td>' for c, a in zip(row, align)) + "</tr>"
                               for row in rows)
                out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
            case Figure(file, fig_title, caption):
                out.append(f'<figure><img src="{e(file)}" alt="{e(fig_title)}">'
                           f"<figcaption>{e(caption)}</figcaption></figure>")
    body = "\n".join(out)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{e(title)}</title>\n'
            f"<style>\n{_CSS}\n</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n")


# ---------------------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------------------

PLOTS = [  # file, title (the image's alt text), function drawing it
    ("requests.png", "Requests per second by status class", plot_requests),
    ("latency.png", "Request latency", plot_latency),
    ("lag.png", "Consumer lag and orders stored", plot_lag),
    ("ratelimit.png", "Rate-limit decisions by outcome", plot_ratelimit),
    ("database.png", "Database operations and worker retries", plot_database),
]


def render(run_dir: Path) -> Path:
    """Renders RUN_DIR's summary.json and metrics.jsonl into its plots, report.md and report.html; returns the
    path of report.md."""
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: not a directory")
    summary = load_summary(run_dir / "summary.json")
    metrics = load_metrics(run_dir / "metrics.jsonl")
    times = [s.t for scrapes in metrics.scrapes.values() for s in scrapes] + [r.t for r in metrics.runner]
    end = max([*times, *(phase.end for phase in summary.phases)], default=0.0) or 1.0
    plotter = Plotter(run_dir, summary.phases, end)
    figures = [Figure(file, title, draw(plotter, metrics)) for file, title, draw in PLOTS]
    blocks = report_blocks(summary, figures)
    markdown = run_dir / "report.md"
    markdown.write_text(to_markdown(blocks), encoding="utf-8")
    (run_dir / "report.html").write_text(to_html(blocks, summary.title), encoding="utf-8")
    return markdown


def self_test() -> bool:
    """Checks the parser, counter increases and quantiles on known inputs; prints each failure."""
    failures = []

    def expect(what: str, got, want) -> None:
        both_nan = isinstance(got, float) and isinstance(want, float) and math.isnan(got) and math.isnan(want)
        close = isinstance(got, float) and isinstance(want, float) and math.isclose(got, want, rel_tol=1e-9)
        if not (got == want or both_nan or close):
            failures.append(f"{what}: got {got!r}, want {want!r}")

    def expect_error(what: str, line: str) -> None:
        try:
            parse_sample(line)
        except ValueError:
            return
        failures.append(f"{what}: {line!r} parsed, want a ValueError")

    # Labels with an escaped quote, a comma, a backslash and a newline; a trailing comma; a timestamp.
    name, labels, value = parse_sample(r'm_total{a="say \"hi\", ok",b="C:\\dir",c="x\ny",} 1.5e3 1700000000000')
    expect("name", name, "m_total")
    expect("escaped labels", labels, {"a": 'say "hi", ok', "b": "C:\\dir", "c": "x\ny"})
    expect("scientific value", value, 1500.0)
    expect("no labels", parse_sample("up 1"), ("up", {}, 1.0))
    expect("+Inf", parse_sample('b{le="+Inf"} +Inf')[2], math.inf)
    expect("NaN", parse_sample("g{} NaN")[2], math.nan)
    expect_error("unterminated value", 'm{a="b} 1')
    expect_error("unquoted value", "m{a=b} 1")
    expect_error("missing value", 'm{a="b"}')
    expect_error("bad value", "m one")

    expect("increase", counter_increase(10.0, 15.0), 5.0)
    expect("reset", counter_increase(15.0, 3.0), 3.0)
    expect("new series", counter_increase(None, 7.0), 7.0)
    # One series restarts at t=3 (110 -> 5); another appears at t=2; the service is down between t=4 and t=20.
    scrapes = [Scrape(t, {"c": [({"k": "x"}, v)] + ([({"k": "y"}, w)] if w is not None else [])})
               for t, v, w in [(0, 100, None), (1, 110, None), (2, 115, 4), (3, 5, 6), (4, 12, 9), (20, 40, 10)]]
    expect("increases", [by["all"] for _, _, by in interval_increases(scrapes, "c", lambda _: "all")],
           [10.0, 9.0, 7.0, 10.0, 29.0])
    rates = counter_rates(scrapes, "c", lambda labels: labels["k"])
    expect("rates of x", rates.lines["x"][:4], [10.0, 5.0, 5.0, 7.0])
    expect("rates of y", rates.lines["y"][:4], [0.0, 4.0, 2.0, 3.0])
    expect("gap", math.isnan(rates.lines["x"][4]), True)

    histogram = [(0.1, 50.0), (0.5, 90.0), (1.0, 100.0), (math.inf, 100.0)]
    expect("p50 at a bucket bound", histogram_quantile(0.5, histogram), 0.1)
    expect("p70 inside a bucket", histogram_quantile(0.7, histogram), 0.3)
    expect("p99 inside the last finite bucket", histogram_quantile(0.99, histogram), 0.95)
    expect("p90 in +Inf", histogram_quantile(0.9, [(1.0, 10.0), (math.inf, 20.0)]), 1.0)
    expect("unsorted, non-monotonic", histogram_quantile(0.5, [(math.inf, 10.0), (2.0, 9.0), (1.0, 10.0)]), 0.5)
    expect("empty", histogram_quantile(0.5, [(1.0, 0.0), (math.inf, 0.0)]), math.nan)
    expect("no +Inf", histogram_quantile(0.5, [(1.0, 5.0), (2.0, 10.0)]), math.nan)

    expect("status class", status_class({"status_class": "4xx", "http_response_status_code": "429"}), "4xx")
    expect("status class from code", status_class({"http_response_status_code": "202"}), "2xx")

    for failure in failures:
        print(f"FAIL {failure}")
    print(f"self-test: {'ok' if not failures else f'{len(failures)} failed'}")
    return not failures


def main() -> int:
    parser = argparse.ArgumentParser(description="Render a load-test run directory into plots, report.md and "
                                                 "report.html, written into it.")
    parser.add_argument("run_dir", metavar="RUN_DIR", type=Path, nargs="?",
                        help="directory holding summary.json and metrics.jsonl")
    parser.add_argument("--self-test", action="store_true", help="check the parsing and arithmetic helpers, then exit")
    args = parser.parse_args()
    if args.self_test:
        return 0 if self_test() else 1
    if args.run_dir is None:
        parser.error("RUN_DIR is required (or --self-test)")
    try:
        print(render(args.run_dir))
    except ReportError as e:
        print(f"report.py: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
