"""Profile-guided optimisation, the training run (see scripts/pgo-build): the edge and the bare Pingora proxy, built
with `-Cprofile-generate`, each serve a mix of traffic, then stop cleanly, which writes their profiles.

  python3 loadtest/pgo_train.py BIN_DIR [SECONDS per load, default 6]

BIN_DIR holds the instrumented `edge` and `bare-proxy`. The mix, on each: the benchmark's three loads
(loadtest/edge_bench.py: HTTP/1.1 keep-alive, HTTP/2, a new TLS connection per request), and HTTP/1.1 and HTTP/2
requests that take the edge's other paths (several routes, a client `traceparent`, `X-Request-Id` and
`X-Forwarded-For`, POST bodies, a route whose zone rejects most requests), so that the profile is not only one
request's. Loopback only, every process started here is stopped by PID; exits non-zero when a proxy did not
stop cleanly (no profile written) or a load failed outright.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import edge_bench as eb  # noqa: E402

# Requests of the mixed load, in turn on every connection (wrk's Lua API).
MIX_LUA = """
local reqs, i = {}, 0
init = function(args)
  reqs = {
    wrk.format("GET", "/"),
    wrk.format("GET", "/api/orders/7f3a?page=2", {
      ["traceparent"] = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
      ["X-Request-Id"] = "client-req-42", ["Accept"] = "application/json"}),
    wrk.format("POST", "/api/orders", {["Content-Type"] = "application/json",
      ["X-Forwarded-For"] = "198.51.100.7", ["Authorization"] = "Bearer x.y.z"}, string.rep("x", 2048)),
    wrk.format("GET", "/limited/item"),
  }
end
request = function()
  i = i + 1
  return reqs[i % #reqs + 1]
end
"""

# A route that never rejects (as in the benchmark) and one whose zone rejects most of the mix's requests to it.
POLICY = """[zones.bench]
rate = "1000000r/s"
burst = 1000000
mode = "nodelay"

[zones.tight]
rate = "20r/s"
burst = 5
mode = "nodelay"

[[routes]]
name = "limited"
path_prefix = "/limited"
zones = ["tight"]

[[routes]]
name = "all"
path_prefix = "/"
zones = ["bench"]
"""


def mixed(url: str, secs: int, work: Path) -> str:
    """The mixed load over HTTP/1.1 and then HTTP/2; a line saying how it went."""
    script = work / "mix.lua"
    script.write_text(MIX_LUA)
    h1 = subprocess.run(["taskset", "-c", eb.LOAD_CORE, "wrk", "-t1", "-c32", f"-d{secs}s", "-s", str(script), url],
                        capture_output=True, text=True, check=True).stdout
    base = url.rstrip("/")
    h2 = subprocess.run(["taskset", "-c", eb.LOAD_CORE, "h2load", "-c16", "-m10", "-D", str(secs),
                         "-H", "traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                         f"{base}/", f"{base}/api/orders/1", f"{base}/limited/x"],
                        capture_output=True, text=True, check=True).stdout
    requests = sum(int(n) for n in [*re.findall(r"(\d+) requests in", h1),
                                     *re.findall(r"requests: \d+ total, \d+ started, (\d+) done", h2)])
    return f"{requests} requests"


def main() -> int:
    if len(sys.argv) < 2:
        print(__doc__)
        return 2
    bins = Path(sys.argv[1])
    secs = int(sys.argv[2]) if len(sys.argv) > 2 else 6
    work = Path(tempfile.mkdtemp(prefix="pgo-train-"))
    cert, key = eb.make_cert(work)
    ports = {k: eb.free_port() for k in ["upstream", "bare", "edge", "admin"]}
    procs: list[eb.Proc] = []
    failed = False
    try:
        procs.append(eb.start_upstream(work, ports["upstream"]))
        bare = eb.start_bare(bins, work, ports["bare"], ports["upstream"], cert, key)
        procs.append(bare)
        policies = work / "policies"
        policies.mkdir()
        (policies / "train.toml").write_text(POLICY)
        env = {**eb.edge_environment(ports["edge"], ports["admin"], ports["upstream"], cert, key, policies, work),
               # The drain is immediate: the profile is written when the process exits.
               "EDGE_SHUTDOWN__GRACE_PERIOD_SECS": "0", "EDGE_SHUTDOWN__TIMEOUT_SECS": "1"}
        edge = eb.Proc("edge", [str(bins / "edge")], work / "edge.log", env=env, core=eb.PROXY_CORE)
        procs.append(edge)
        eb.wait_port(ports["bare"])
        eb.wait_port(ports["edge"])
        if not eb.wait_ready(ports["admin"]):
            # Training on 503s would optimise the wrong paths.
            sys.exit("pgo-train: the edge did not become ready (see its log in " + str(work) + ")")
        for proc, port in [(bare, ports["bare"]), (edge, ports["edge"])]:
            url = f"https://127.0.0.1:{port}/"
            for load in ["h1", "h2", "conn"]:
                r = eb.run_load(load, url, secs)
                print(f"pgo-train: {proc.name} {load}: {r['requests']} requests, {r['errors']} errors", flush=True)
                # These loads never fail against a healthy proxy: errors mean the profile is of error paths.
                failed |= r["requests"] == 0 or r["errors"] > r["requests"] // 100
            print(f"pgo-train: {proc.name} mix: {mixed(url, secs, work)}", flush=True)
        # Pingora's fast shutdown (SIGINT) for the bare proxy; the edge drains (immediately, see above).
        for proc, sig in [(bare, signal.SIGINT), (edge, signal.SIGTERM)]:
            proc.p.send_signal(sig)
            try:
                code = proc.p.wait(30)
            except subprocess.TimeoutExpired:
                code = None
            print(f"pgo-train: {proc.name} stopped: exit {code}", flush=True)
            failed |= code != 0
    finally:
        for p in procs:
            p.stop()
    if not failed:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
