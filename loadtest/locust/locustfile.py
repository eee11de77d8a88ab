"""Locust user journey for the order API: create an order, then wait until a worker has stored it.

Each simulated user, in a loop with a think time between journeys:
1. creates an order with POST /v1/orders/async (1 to 5 lines, random currency, quantities and prices) and
   expects 202 with {"id": <uuid>, "status": "received"} and `Location: /v1/orders/<id>`;
2. polls GET /v1/orders/<id> every 0.5 s (grouped in Locust's stats as /v1/orders/[id]): 404 means "not
   stored yet", and 200 with "status" "accepted" or "rejected" means the workers validated and stored it;
3. reports the journey, from the POST to the answer that shows the order stored, as request type JOURNEY,
   name "order stored", in Locust's stats; a journey not stored within POLL_TIMEOUT_S fails there.

Run headless against the local stack (scripts/stack), from the repository's root:

    locust -f loadtest/locust/locustfile.py --headless -u 50 -r 10 -t 2m --host https://127.0.0.1:8443 \
        --csv results/locust

Environment:
    TOKEN           bearer token for the API; default: the content of .stack/token (relative to the current
                    directory), which scripts/stack writes
    CA_FILE         PEM file to verify the edge's TLS certificate with, e.g. .stack/tls/dev-cert.pem (the local
                    stack's self-signed development certificate); default: no verification
    SPREAD_CLIENTS  1: each simulated user sends its own `X-Forwarded-For: 10.a.b.c`, so that per-client rate
                    limits see many clients instead of one. The edge believes that header only from peers in its
                    policy's `client.trusted_proxies`: list the load generator's address there (127.0.0.1/32
                    locally), and not 10.0.0.0/8, or the edge skips those addresses as proxies too.
                    Default 0: every user is the load generator's address.
    POLL_TIMEOUT_S  how long a journey waits for its order to be stored, in seconds [30]
    WAIT_MIN_S      shortest think time between two journeys of a user, in seconds [1]
    WAIT_MAX_S      longest think time, in seconds [3]
"""

import itertools
import math
import os
import random
import sys
import time
import uuid
from pathlib import Path
from typing import NoReturn

import gevent
import urllib3
from locust import HttpUser, between, task

POLL_INTERVAL_S = 0.5
CURRENCIES = ["EUR", "USD", "GBP", "CHF", "SEK"]
STORED = {"accepted", "rejected"}  # an order's status once the workers have stored their verdict


def _fail(message: str) -> NoReturn:
    """Stops Locust at start with a clear message (this file is read when Locust starts)."""
    sys.exit(f"locustfile: {message}")


def _seconds(name: str, default: float) -> float:
    """A duration in seconds (finite, not negative) from the environment variable `name`, else the default."""
    raw = os.environ.get(name, "")
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan  # refused just below
    if not (math.isfinite(value) and value >= 0):
        _fail(f"{name} must be a number of seconds, got {raw!r}")
    return value


def _token() -> str:
    """The bearer token: TOKEN, else the content of .stack/token."""
    token = os.environ.get("TOKEN", "").strip()
    if token:
        return token
    path = Path(".stack/token")
    try:
        token = path.read_text(encoding="utf-8").strip()
    except OSError as e:
        _fail(f"no token: set TOKEN, or run from the repository's root after scripts/stack wrote {path} ({e})")
    if not token:
        _fail(f"no token: TOKEN is unset and {path.resolve()} is empty")
    return token


TOKEN = _token()
CA_FILE = os.environ.get("CA_FILE", "")
if CA_FILE and not Path(CA_FILE).is_file():
    _fail(f"CA_FILE={CA_FILE!r} is not a file")
if not CA_FILE:
    # Verification off (the local stack's certificate is self-signed): urllib3 would warn on every request.
    urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
SPREAD_CLIENTS = os.environ.get("SPREAD_CLIENTS", "0")
if SPREAD_CLIENTS not in ("0", "1"):
    _fail(f"SPREAD_CLIENTS must be 0 or 1, got {SPREAD_CLIENTS!r}")
POLL_TIMEOUT_S = _seconds("POLL_TIMEOUT_S", 30.0)
if POLL_TIMEOUT_S == 0:
    _fail("POLL_TIMEOUT_S must be more than 0")
WAIT_MIN_S = _seconds("WAIT_MIN_S", 1.0)
WAIT_MAX_S = _seconds("WAIT_MAX_S", 3.0)
if WAIT_MIN_S > WAIT_MAX_S:
    _fail(f"WAIT_MIN_S ({WAIT_MIN_S}) is more than WAIT_MAX_S ({WAIT_MAX_S})")

# Numbers the simulated users of this process, for their X-Forwarded-For addresses. Each Locust process counts
# on its own: with distributed workers, users of different workers can share an address.
_user_numbers = itertools.count(1)


def client_address(n: int) -> str:
    """The n-th simulated client's address, 10.0.0.1 onwards (distinct for the first 16.7 million users)."""
    return f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}"


def order_body() -> dict:
    """A plausible order: 1 to 5 lines of distinct SKUs, 1 to 5 of each, priced 1.00 to 200.00."""
    skus = random.sample(range(1, 5001), random.randint(1, 5))
    return {
        "customer_id": f"cust-{random.randint(1, 20000)}",
        "currency": random.choice(CURRENCIES),
        "items": [{"sku": f"SKU-{sku}", "qty": random.randint(1, 5), "unit_price_cents": random.randint(100, 20000)}
                  for sku in skus],
    }


def unexpected(response, expected: str) -> str:
    """The failure message for an answer other than the expected status, or for no answer at all."""
    if response.status_code == 0:  # no answer: connection refused, TLS verification failed, timeout...
        return f"no answer: {response.error}"
    return f"expected {expected}, got {response.status_code}: {response.text[:200]}"


class JourneyTimeout(Exception):
    """An order the API acknowledged but that was not stored within POLL_TIMEOUT_S."""


class OrderUser(HttpUser):
    wait_time = between(WAIT_MIN_S, WAIT_MAX_S)

    def on_start(self):
        self.client.verify = CA_FILE or False
        self.client.headers.update({"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
        if SPREAD_CLIENTS == "1":
            self.client.headers["X-Forwarded-For"] = client_address(next(_user_numbers))

    @task
    def order_until_stored(self):
        started = time.perf_counter()
        order_id = self.create_order()
        if order_id is None:
            return  # the failed POST is in the stats already
        deadline = started + POLL_TIMEOUT_S
        while not self.is_stored(order_id):
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                self.report_journey(started, JourneyTimeout(f"order {order_id} not stored after {POLL_TIMEOUT_S:g} s"))
                return
            gevent.sleep(min(POLL_INTERVAL_S, remaining))  # so that the last poll is at the deadline
        self.report_journey(started, None)

    def create_order(self) -> str | None:
        """POST /v1/orders/async: the new order's id, or None (reported as a failure) on any other answer."""
        with self.client.post("/v1/orders/async", json=order_body(), catch_response=True) as response:
            if response.status_code != 202:
                response.failure(unexpected(response, "202"))
                return None
            try:
                answer = response.json()
                order_id = str(uuid.UUID(answer["id"]))
            except (ValueError, TypeError, KeyError) as e:
                response.failure(f"expected a JSON body with an order id, got {response.text[:200]!r} ({e})")
                return None
            if answer.get("status") != "received":
                response.failure(f"expected status \"received\", got {answer.get('status')!r}")
                return None
            if response.headers.get("Location") != f"/v1/orders/{order_id}":
                response.failure(f"expected Location /v1/orders/{order_id}, got {response.headers.get('Location')!r}")
                return None
            return order_id

    def is_stored(self, order_id: str) -> bool:
        """One poll of GET /v1/orders/<id>: whether the order is stored with its verdict. 404 (not stored yet)
        counts as a successful poll; any other answer but 200 is a failed one."""
        with self.client.get(f"/v1/orders/{order_id}", name="/v1/orders/[id]", catch_response=True) as response:
            if response.status_code == 404:
                response.success()
                return False
            if response.status_code != 200:
                response.failure(unexpected(response, "200 or 404"))
                return False
            try:
                status = response.json()["status"]
            except (ValueError, TypeError, KeyError) as e:
                response.failure(f"expected a JSON order with a status, got {response.text[:200]!r} ({e})")
                return False
            return status in STORED

    def report_journey(self, started: float, exception: Exception | None) -> None:
        """Reports the journey so far in Locust's stats: request type JOURNEY, name "order stored"."""
        self.environment.events.request.fire(
            request_type="JOURNEY",
            name="order stored",
            response_time=(time.perf_counter() - started) * 1000,
            response_length=0,
            response=None,
            context={},
            exception=exception,
        )
