#!/usr/bin/env python3
"""The edge against nginx and against the bare Pingora proxy, on this machine, as ratios measured in one run.

Targets, each a TLS reverse proxy on one core (taskset -c 1) in front of the same upstream (an nginx answering
a 221-byte body on plain HTTP, with the load generator on core 0):
  nginx  Debian's nginx, one worker, TLS 1.2/1.3 + h2, keep-alive to the upstream, limit_req with a zone that
         never rejects, access log to a file;
  bare   loadtest/bare-proxy: Pingora with no logic, the edge's TLS backend (OpenSSL), allocator (mimalloc) and runtime
         settings (a single-threaded runtime per thread, the runtime's timers; PINGORA_DEFAULTS=1 in the
         environment runs it with Pingora's defaults instead: work stealing, its clock-thread timers;
         BARE_PEER_TIMEOUTS=1 gives its upstream the edge's default connect, read and idle timeouts, whose
         runtime timers the edge pays and the bare proxy without them does not);
  edge   the edge, one thread, its default policy engine with a zone that never rejects, access log to a file;
and the upstream directly (plain HTTP: the ceiling of the load generator and the upstream).

Loads: HTTP/1.1 keep-alive (wrk -c64), HTTP/2 (h2load -c64 -m10), a new connection and TLS handshake per
request (wrk -c64 with Connection: close). For each: req/s, latency p50/p99 (h2load: mean and max), CPU
seconds of the proxy per 100k requests (from /proc) and its peak RSS. Rounds alternate the targets (in the
reverse order every other round, so that no target always follows the same one). The tables
show each target's median round; a ratio is the median over the rounds of the ratio of the two targets' figures in
the same round (they ran back to back, so a slow stretch of this shared machine moves both), RSS the ratio of the
peaks.

Usage (via loadtest/edge-bench, which builds the release binaries): edge_bench.py BIN_DIR [SECONDS] [ROUNDS]
A subset for a quick look: LOADS=h1 TARGETS=bare,edge (comma-separated; PROFILE=1 adds perf reports; COUNT=1
adds the proxy's thousands of instructions per request, user and kernel, which vary far less than req/s;
perf's counting slows every target a little, so take req/s from a run without it).
Loopback only; every process it starts is stopped by PID at the end.
"""

import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BODY = ("x" * 220) + "\n"  # 221 bytes, the planning measurement's upstream body
CLK_TCK = os.sysconf("SC_CLK_TCK")
PROXY_CORE, LOAD_CORE = "1", "0"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_cert(work: Path) -> tuple[Path, Path]:
    """A self-signed P-256 certificate for localhost and 127.0.0.1 in `work`: (certificate, key)."""
    cert, key = work / "cert.pem", work / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
                    "-days", "2", "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


def edge_environment(port: int, admin: int, upstream: int, cert: Path, key: Path, policies: Path,
                     work: Path) -> dict:
    """The edge's settings here: one thread, one upstream, the policies in `policies`, warnings only."""
    return {
        "EDGE_LISTEN": f"127.0.0.1:{port}", "EDGE_ADMIN_LISTEN": f"127.0.0.1:{admin}",
        "EDGE_THREADS": "1", "EDGE_UPSTREAM__ADDRESS": f"127.0.0.1:{upstream}",
        "EDGE_UPSTREAM__HEALTH__PORT": "0", "EDGE_TLS__CERT_PATH": str(cert), "EDGE_TLS__KEY_PATH": str(key),
        "EDGE_POLICY__DIR": str(policies), "EDGE_UPGRADE_SOCK": str(work / f"upgrade-{port}.sock"),
        # nginx has no limit_conn here; 64 connections x 10 streams would exceed the default 100.
        "EDGE_LIMITS__MAX_REQUESTS_PER_CLIENT": "0", "RUST_LOG": "warn",
    }


def wait_ready(admin_port: int, timeout: float = 20.0) -> bool:
    """Until the edge's `/readyz` answers 200 (it takes requests once its upstream passed a health check); False
    when it did not within `timeout`."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if subprocess.run(["curl", "-sf", f"http://127.0.0.1:{admin_port}/readyz"],
                              capture_output=True).returncode == 0:
                return True
        except OSError:
            pass
        time.sleep(0.2)
    return False


def wait_port(port: int, timeout: float = 20.0) -> None:
    import socket

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {port} after {timeout} s")


def tree(pid: int) -> list[int]:
    """`pid` and its descendants."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_seconds(pid: int) -> float:
    total = 0.0
    for p in tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / CLK_TCK
        except (OSError, IndexError, ValueError):
            pass
    return total


def rss_mib(pid: int) -> float:
    total = 0
    for p in tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def base_environment() -> dict:
    """This shell's environment without `SSL_CERT_FILE` / `SSL_CERT_DIR`: as the proxies run in their images. Some
    development shells set them (to the system CA bundle), and OpenSSL then parses that bundle into every
    `SslConnector` the Rust proxies build for upstream TLS, which none of them use: 1.7 MiB of RSS that no
    deployment carries."""
    return {k: v for k, v in os.environ.items() if k not in ("SSL_CERT_FILE", "SSL_CERT_DIR")}


class Proc:
    """A process we started, stopped by PID."""

    def __init__(self, name: str, argv: list[str], log: Path, env: dict | None = None, core: str | None = None):
        if core is not None:
            argv = ["taskset", "-c", core, *argv]
        self.name = name
        self.log = open(log, "ab")
        self.p = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, env={**base_environment(), **(env or {})})

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        self.log.close()


def nginx_conf(work: Path, name: str, server: str, http_extra: str = "") -> Path:
    d = work / name
    d.mkdir(exist_ok=True)
    conf = d / "nginx.conf"
    conf.write_text(
        f"""worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  client_body_temp_path {d}/body; proxy_temp_path {d}/proxy; fastcgi_temp_path {d}/fastcgi;
  uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;
  keepalive_requests 1000000;
  {http_extra}
  {server}
}}
"""
    )
    return conf


def start_nginx(work: Path, name: str, conf: Path, core: str) -> Proc:
    return Proc(name, ["/usr/sbin/nginx", "-p", f"{work / name}/", "-c", str(conf), "-g", "daemon off;"],
                work / f"{name}.log", core=core)


def start_upstream(work: Path, port: int) -> Proc:
    """The upstream every proxy forwards to: an nginx answering BODY to any request, on the load's core."""
    conf = nginx_conf(work, "upstream",
                      f"server {{ listen 127.0.0.1:{port}; access_log off; "
                      f"location / {{ default_type text/plain; return 200 '{BODY[:-1]}\\n'; }} }}")
    return start_nginx(work, "upstream", conf, LOAD_CORE)


def start_bare(bin_dir: Path, work: Path, port: int, upstream: int, cert: Path, key: Path) -> Proc:
    """The bare Pingora proxy from `bin_dir`, one thread, on the proxies' core."""
    return Proc("bare", [str(bin_dir / "bare-proxy"), f"127.0.0.1:{port}", f"127.0.0.1:{upstream}", str(cert),
                         str(key), "1"], work / "bare.log", core=PROXY_CORE)


def ms(v: str | None) -> float:
    """A latency as wrk and h2load print it (`850.00us`, `1.23ms`, `2.00s`) in milliseconds."""
    m = re.match(r"([\d.]+)(us|ms|s)", v or "")
    return float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)] if m else float("nan")


def run_load(load: str, url: str, secs: int) -> dict:
    """`load` (h1, h2 or conn) against `url` for `secs`."""
    if load == "h2":
        return run_h2load(url, secs)
    return run_wrk(url, secs, close=(load == "conn"))


def run_wrk(url: str, secs: int, close: bool) -> dict:
    argv = ["taskset", "-c", LOAD_CORE, "wrk", "-t1", "-c64", f"-d{secs}s", "--latency"]
    if close:
        argv += ["-H", "Connection: close"]
    out = subprocess.run(argv + [url], capture_output=True, text=True, check=True).stdout
    def field(prefix):
        for line in out.splitlines():
            if line.strip().startswith(prefix):
                return line.split()[1]
        return None
    total = int(re.search(r"(\d+) requests in", out).group(1))
    errors = sum(int(x) for x in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"rps": float(field("Requests/sec:") or 0), "p50": ms(field("50%")), "p99": ms(field("99%")),
            "requests": total, "errors": errors + (int(non2xx.group(1)) if non2xx else 0)}


def run_h2load(url: str, secs: int) -> dict:
    argv = ["taskset", "-c", LOAD_CORE, "h2load", "-c64", "-m10", "-D", str(secs), "--warm-up-time=1", url]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out).group(1))
    done = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored", out)
    # "time for request:  min  max  mean  sd  +/- sd"
    t = re.search(r"time for request:\s+(\S+)\s+(\S+)\s+(\S+)", out)
    return {"rps": rps, "p50": ms(t.group(3)), "p99": ms(t.group(2)), "requests": int(done.group(1)),
            "errors": int(done.group(3)) + int(done.group(4))}


def measure(target: str, pid: int | None, url: str, load: str, secs: int) -> dict:
    """One measured run: the load's figures plus the proxy's CPU per 100k requests and peak RSS."""
    run_load(load, url, 2)  # warm-up (connections, caches), not counted
    peak, stop = [0.0], threading.Event()
    def sample():
        while not stop.is_set():
            if pid:
                peak[0] = max(peak[0], rss_mib(pid))
            stop.wait(0.5)
    sampler = threading.Thread(target=sample)
    sampler.start()
    counter = start_count(pid) if pid and os.environ.get("COUNT") == "1" and shutil.which("perf") else None
    before = cpu_seconds(pid) if pid else 0.0
    r = run_load(load, url, secs)
    after = cpu_seconds(pid) if pid else 0.0
    stop.set()
    sampler.join()
    r["cpu_per_100k"] = (after - before) * 100_000 / r["requests"] if r["requests"] and pid else float("nan")
    r["rss_mib"] = peak[0] if pid else float("nan")
    if counter:
        r.update(stop_count(counter, r["requests"]))
    return r


def start_count(pid: int) -> subprocess.Popen:
    """COUNT=1: the proxy's instructions (user, kernel) during the measured run, from `perf stat`. Unlike req/s
    and CPU time they hardly vary between runs on a shared machine: the measure for small changes."""
    return subprocess.Popen(["perf", "stat", "-x,", "-e", "instructions:u,instructions:k", "-p", str(pid)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def stop_count(counter: subprocess.Popen, requests: int) -> dict:
    counter.send_signal(signal.SIGINT)
    _, err = counter.communicate(timeout=10)
    out = {}
    for line in err.splitlines():
        parts = line.split(",")
        if len(parts) > 2 and parts[0].isdigit() and requests:
            key = {"instructions:u": "kinstr_user", "instructions:k": "kinstr_kernel"}.get(parts[2])
            if key:
                out[key] = int(parts[0]) / requests / 1000
    return out


def main() -> int:
    if len(sys.argv) < 2:
        print(__doc__)
        return 2
    bin_dir = Path(sys.argv[1])
    secs = int(sys.argv[2]) if len(sys.argv) > 2 else 10
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    for tool in ["wrk", "h2load", "taskset", "openssl", "/usr/sbin/nginx"]:
        if not shutil.which(tool):
            sys.exit(f"edge_bench: {tool} is missing (scripts/prereqs installs it)")
    work = Path(tempfile.mkdtemp(prefix="edge-bench-"))
    cert, key = make_cert(work)
    (work / "body.txt").write_text(BODY)
    ports = {k: free_port() for k in ["upstream", "nginx", "bare", "edge", "edge_admin"]}
    procs: list[Proc] = []
    try:
        procs.append(start_upstream(work, ports["upstream"]))
        proxy = nginx_conf(
            work, "nginx",
            f"""server {{
    listen 127.0.0.1:{ports['nginx']} ssl http2;
    ssl_certificate {cert}; ssl_certificate_key {key}; ssl_protocols TLSv1.2 TLSv1.3;
    access_log {work}/nginx/access.log;
    location / {{
      limit_req zone=bench burst=1000000 nodelay;
      proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection "";
    }}
  }}""",
            f"limit_req_zone $binary_remote_addr zone=bench:10m rate=1000000r/s;\n"
            f"  upstream up {{ server 127.0.0.1:{ports['upstream']}; keepalive 64; }}")
        nginx = start_nginx(work, "nginx", proxy, PROXY_CORE)
        procs.append(nginx)
        bare = start_bare(bin_dir, work, ports["bare"], ports["upstream"], cert, key)
        procs.append(bare)
        policies = work / "policies"
        policies.mkdir()
        (policies / "bench.toml").write_text(
            '[zones.bench]\nrate = "1000000r/s"\nburst = 1000000\nmode = "nodelay"\n'
            '[[routes]]\nname = "all"\npath_prefix = "/"\nzones = ["bench"]\n')
        edge_env = edge_environment(ports["edge"], ports["edge_admin"], ports["upstream"], cert, key, policies, work)
        edge = Proc("edge", [str(bin_dir / "edge")], work / "edge-access.log", env=edge_env, core=PROXY_CORE)
        procs.append(edge)
        for name in ["upstream", "nginx", "bare", "edge"]:
            wait_port(ports[name])
        wait_ready(ports["edge_admin"])
        nginx_worker = max(tree(nginx.p.pid))  # the worker (the master only waits)
        targets = {
            "nginx": (nginx_worker, f"https://127.0.0.1:{ports['nginx']}/"),
            "bare": (bare.p.pid, f"https://127.0.0.1:{ports['bare']}/"),
            "edge": (edge.p.pid, f"https://127.0.0.1:{ports['edge']}/"),
        }
        results: dict[tuple[str, str], list[dict]] = {}
        variant = ", bare proxy with the edge's upstream timeouts" if os.environ.get("BARE_PEER_TIMEOUTS") == "1" else ""
        print(f"edge benchmark: {rounds} rounds of {secs} s, proxies on core {PROXY_CORE}, load on core {LOAD_CORE}"
              f"{variant}", flush=True)
        loads = os.environ.get("LOADS", "h1,h2,conn").split(",")
        only = os.environ.get("TARGETS", "nginx,bare,edge").split(",")
        targets = {k: v for k, v in targets.items() if k in only}
        for rnd in range(1, rounds + 1):
            for load in loads:
                # Counterbalanced: even rounds run the targets in the reverse order, so that a target is not
                # always the one right after another (a drift of this shared machine, or what one target leaves
                # behind in the upstream and the kernel, would otherwise always fall on the same one).
                order = list(targets.items()) if rnd % 2 else list(reversed(targets.items()))
                for target, (pid, url) in order:
                    profile = (os.environ.get("PROFILE") == "1" and rnd == rounds and load == "h1"
                               and target in ("edge", "bare") and shutil.which("perf"))
                    perf = start_perf(pid, work / f"perf-{target}.data", secs) if profile else None
                    r = measure(target, pid, url, load, secs)
                    if perf:
                        report_perf(perf, work / f"perf-{target}.data", target)
                    results.setdefault((target, load), []).append(r)
                    print(f"round {rnd} {load:4} {target:8} {json.dumps({k: round(v, 2) for k, v in r.items()})}",
                          flush=True)
        # What each proxy keeps once the load has stopped: the edge hands memory that has been free for the
        # allocator's purge delay (1 s) back to the OS; see `Housekeeping` in its `main`.
        time.sleep(3)
        idle = {target: rss_mib(pid) for target, (pid, _) in targets.items()}
        for load in [l for l in ["h1", "conn"] if l in loads]:
            r = measure("upstream", None, f"http://127.0.0.1:{ports['upstream']}/", load, secs)
            results[("upstream", load)] = [r]
            print(f"upstream {load:4} {json.dumps({k: round(v, 2) for k, v in r.items()})}", flush=True)
        report(results, idle)
        problems = check(results, work)
        for problem in problems:
            print(f"INVALID: {problem}")
        return 1 if problems else 0
    finally:
        for p in reversed(procs):
            p.stop()
        shutil.rmtree(work, ignore_errors=True)


def check(results: dict, work: Path) -> list[str]:
    """What would make the figures meaningless: an error or a non-2xx answer in any run, or a proxy that did not
    do the work it is measured with: the edge logs one access line per request with its limiter's decision, nginx
    one access line per request (both count the warm-ups too). A request the load generator abandons when a run
    ends is logged with status 0 (nothing answered; nginx writes 499). Printed with the counts; the script exits 1
    when the list is not empty."""
    problems = [f"{target} {load}: {r['errors']} errors in round {i + 1}"
                for (target, load), runs in results.items() for i, r in enumerate(runs) if r["errors"]]
    served = {t: sum(r["requests"] for (target, _), runs in results.items() if target == t for r in runs)
              for t in ["nginx", "edge"]}
    # Read a line at a time (15 rounds leave ~2 GB of lines); the usual line is recognised by its two fields as
    # the edge writes them (a client's text in another field has its quotes escaped), the others parsed.
    seen: dict[tuple, int] = {}
    ok = 0
    with (work / "edge-access.log").open("rb") as log:
        for line in log:
            if b'"log":"access"' not in line:
                continue
            if b'"status":200,' in line and b'"rate_limit":"immediate",' in line:
                ok += 1
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                entry = {}
            what = (entry.get("status"), entry.get("rate_limit")) if isinstance(entry, dict) else (None, None)
            seen[what] = seen.get(what, 0) + 1
    abandoned = seen.pop((0, "immediate"), 0)
    nginx_log = work / "nginx" / "access.log"
    nginx_lines = 0
    if nginx_log.exists():
        with nginx_log.open("rb") as log:
            nginx_lines = sum(1 for _ in log)
    print(f"\naccess logs (warm-ups included): edge {ok} lines of status 200 with the limiter's decision "
          f"\"immediate\" and {abandoned} of requests abandoned at a run's end ({served['edge']} requests measured); "
          f"nginx {nginx_lines} lines ({served['nginx']} requests measured)")
    if ok < served["edge"]:
        problems.append(f"the edge logged {ok} answered requests with the limiter's decision for {served['edge']} "
                        "requests measured")
    if seen:
        problems.append(f"the edge logged other lines (status, rate-limit decision: count): {seen}")
    if nginx_lines < served["nginx"]:
        problems.append(f"nginx logged {nginx_lines} access lines for {served['nginx']} requests measured")
    return problems


def start_perf(pid: int, out: Path, secs: int) -> subprocess.Popen:
    """Samples `pid` during the measured part of the next run (after its 2-second warm-up)."""
    # PROFILE_DWARF=1: call graphs from DWARF (release builds have no frame pointers), for inclusive times.
    graph = ["--call-graph", "dwarf,16384"] if os.environ.get("PROFILE_DWARF") == "1" else ["-g"]
    return subprocess.Popen(["perf", "record", "-F", "499", *graph, "-o", str(out), "-p", str(pid), "--",
                             "sleep", str(secs + 1)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def report_perf(perf: subprocess.Popen, data: Path, target: str) -> None:
    perf.wait()
    for title, args in [("by library", ["--sort", "dso"]), ("by function", ["--sort", "sym"])]:
        out = subprocess.run(["perf", "report", "--stdio", "--no-children", "-g", "none", "--percent-limit", "1",
                              *args, "-i", str(data)], capture_output=True, text=True).stdout
        print(f"--- perf: {target} CPU {title} (self time, HTTP/1.1 keep-alive) ---")
        for line in [l for l in out.splitlines() if l.strip() and not l.startswith("#")][:40]:
            print(line)
    if os.environ.get("PROFILE_DWARF") == "1":
        out = subprocess.run(["perf", "report", "--stdio", "--children", "-g", "none", "--percent-limit", "0.5",
                              "--sort", "sym", "-i", str(data)], capture_output=True, text=True).stdout
        print(f"--- perf: {target} CPU by function including callees (HTTP/1.1 keep-alive) ---")
        for line in [l for l in out.splitlines() if l.strip() and not l.startswith("#")][:150]:
            print(line)


def median(runs: list[dict]) -> dict:
    """The run with the median req/s (its other figures with it), with the peak RSS of all the runs: memory
    grows over a run (nginx's worker measured 12 MiB in its first HTTP/1.1 round, 14-17 in later ones), and
    the median run by req/s may be a first one."""
    ordered = sorted(runs, key=lambda r: r["rps"])
    return {**ordered[len(ordered) // 2], "rss_mib": max(r["rss_mib"] for r in runs)}


def per_round(results: dict, a: str, b: str, load: str, key: str) -> list[float]:
    """`a`'s figure over `b`'s in each round."""
    return [x[key] / y[key] for x, y in zip(results[(a, load)], results[(b, load)], strict=True)]


def paired(results: dict, a: str, b: str, load: str, key: str) -> float:
    """The median over rounds of `a`'s figure over `b`'s in the same round."""
    return statistics.median(per_round(results, a, b, load, key))


def spread(results: dict, a: str, b: str, load: str, key: str) -> str:
    """The per-round ratios' range and middle half (quartiles), to read a median against."""
    r = sorted(per_round(results, a, b, load, key))
    if len(r) < 4:
        return f"rounds {r[0]:.2f}-{r[-1]:.2f}"
    q1, _, q3 = statistics.quantiles(r, n=4)
    return f"rounds {r[0]:.2f}-{r[-1]:.2f}, middle half {q1:.2f}-{q3:.2f}"


def report(results: dict, idle: dict) -> None:
    med = {k: median(v) for k, v in results.items()}
    names = {"h1": "HTTP/1.1 keep-alive", "h2": "HTTP/2 (h2load -m10)", "conn": "new connection per request"}
    print("\n| load | target | req/s | p50 ms | p99 ms | CPU s / 100k req | peak RSS MiB | errors |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for load in ["h1", "h2", "conn"]:
        for target in ["nginx", "bare", "edge", "upstream"]:
            r = med.get((target, load))
            if r:
                print(f"| {names[load]} | {target} | {r['rps']:.0f} | {r['p50']:.2f} | {r['p99']:.2f} | "
                      f"{r['cpu_per_100k']:.2f} | {r['rss_mib']:.0f} | {r['errors']} |")
    print("\n(h2load reports mean and max latency: they stand in the p50 and p99 columns for HTTP/2.)")
    print("\nRSS 3 s after the last round, idle: " + ", ".join(f"{t} {v:.1f} MiB" for t, v in idle.items()))
    if any((t, l) not in med for t in ["nginx", "bare", "edge"] for l in ["h1", "h2", "conn"]):
        print("\n(ratios and targets need every target and load: run without LOADS / TARGETS)")
        if ("edge", "h1") in med and ("bare", "h1") in med:
            print(f"HTTP/1.1 keep-alive: edge / bare req/s {paired(results, 'edge', 'bare', 'h1', 'rps'):.3f} "
                  f"({spread(results, 'edge', 'bare', 'h1', 'rps')}), "
                  f"CPU {paired(results, 'edge', 'bare', 'h1', 'cpu_per_100k'):.3f} "
                  f"({spread(results, 'edge', 'bare', 'h1', 'cpu_per_100k')})")
        return
    print("\n| load | edge / bare req/s | edge / bare CPU | bare / nginx req/s | edge / nginx req/s | "
          "edge / nginx p99 | edge / nginx RSS |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    # Each load's ratios, once: the table shows them and the targets read them.
    ratio = {load: {"rps": paired(results, "edge", "bare", load, "rps"),
                    "cpu": paired(results, "edge", "bare", load, "cpu_per_100k"),
                    "bare_nginx": paired(results, "bare", "nginx", load, "rps"),
                    "nginx": paired(results, "edge", "nginx", load, "rps"),
                    "p99": paired(results, "edge", "nginx", load, "p99"),
                    "rss": med[("edge", load)]["rss_mib"] / med[("nginx", load)]["rss_mib"]}
             for load in ["h1", "h2", "conn"]}
    for load, r in ratio.items():
        print(f"| {names[load]} | {r['rps']:.2f} | {r['cpu']:.2f} | {r['bare_nginx']:.2f} | {r['nginx']:.2f} | "
              f"{r['p99']:.2f} | {r['rss']:.2f} |")
    e, b, n = med[("edge", "h1")], med[("bare", "h1")], med[("nginx", "h1")]
    print(f"\n(The same from the median rounds instead, HTTP/1.1: edge / bare req/s {e['rps'] / b['rps']:.2f}, "
          f"CPU {e['cpu_per_100k'] / b['cpu_per_100k']:.2f}; edge / nginx req/s {e['rps'] / n['rps']:.2f}, "
          f"p99 {e['p99'] / n['p99']:.2f}.)")
    print("\nTargets (HTTP/1.1 keep-alive unless said):")
    checks = [
        ("edge >= 0.9x bare req/s", ratio["h1"]["rps"], 0.9, True),
        ("edge <= 1.15x bare CPU per request", ratio["h1"]["cpu"], 1.15, False),
        ("edge >= 0.6x nginx req/s", ratio["h1"]["nginx"], 0.6, True),
        ("edge >= 0.95x nginx req/s, new connection per request", ratio["conn"]["nginx"], 0.95, True),
        ("edge p99 <= 1.5x nginx", ratio["h1"]["p99"], 1.5, False),
        ("edge RSS <= 1.5x nginx", ratio["h1"]["rss"], 1.5, False),
    ]
    for name, value, bound, at_least in checks:
        ok = value >= bound if at_least else value <= bound
        print(f"  {'met    ' if ok else 'NOT met'} {name}: {value:.2f}")
    print(f"\nedge / bare, HTTP/1.1, per round: req/s {spread(results, 'edge', 'bare', 'h1', 'rps')}; "
          f"CPU {spread(results, 'edge', 'bare', 'h1', 'cpu_per_100k')}")


if __name__ == "__main__":
    sys.exit(main())
