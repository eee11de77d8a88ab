-- wrk script for the order API: async and sync order creation with a bearer token and varied bodies, reads of
-- orders created earlier, or a mix; many clients (one X-Forwarded-For address per request) or a single client.
-- Besides wrk's own figures it reports the count of each status and the order ids it was given, so that a run
-- can be reconciled with what the database holds.
--
--   TOKEN=$(cat .stack/token) MODE=mix CLIENTS=many RATE=200 CONNECTIONS=16 IDS_OUT=/tmp/ids.txt \
--     wrk -t2 -c16 -d60s --timeout 30s -s loadtest/wrk/orders.lua https://127.0.0.1:8443
--
-- Environment:
--   TOKEN          bearer token (required: the API answers 401 without one)
--   MODE           async (POST /v1/orders/async, 202) | sync (POST /v1/orders, 201/422/504) |
--                  get (GET /v1/orders/{id} of the ids in GET_IDS) | mix (60% async, 20% sync, 20% reads of
--                  orders this thread created at least 50 requests earlier)          [async]
--   CLIENTS        many: a distinct X-Forwarded-For address per request (10.t.x.y, 65,536 per thread), so that
--                  per-client limits do not cap the run | one: every request from CLIENT_IP | peer: no header
--                  (the TCP peer is the client). The edge believes X-Forwarded-For only from peers in its
--                  policy's `trusted_proxies`: run it with the load generator's address there, as it would be
--                  behind a load balancer.                                           [many]
--   CLIENT_IP      the single client's address                                      [203.0.113.7]
--   RATE           requests per second over all connections, paced per connection (0: as fast as possible);
--                  the pause follows each response, so the rate reached is a little lower [0]
--   CONNECTIONS    the -c given to wrk (needed to pace: Lua does not see it)       [1]
--   INVALID_RATIO  share of orders in a currency the rules refuse (rejected, not lost) [0]
--   GET_IDS        file of order ids to read in MODE=get (one per line)
--   IDS_OUT        file that receives "status id" for every order the API created (201, 202, 422, 504)
--
-- At the end it prints one line `LOADTEST {json}`: requests, duration, statuses, socket errors, latency
-- percentiles (µs).

local mode = os.getenv("MODE") or "async"
local token = os.getenv("TOKEN") or ""
local clients = os.getenv("CLIENTS") or "many"
local client_ip = os.getenv("CLIENT_IP") or "203.0.113.7"
local rate = tonumber(os.getenv("RATE") or "0") or 0
local connections = tonumber(os.getenv("CONNECTIONS") or "1") or 1
local invalid_ratio = tonumber(os.getenv("INVALID_RATIO") or "0") or 0
local get_ids_file = os.getenv("GET_IDS")
local ids_out = os.getenv("IDS_OUT")

local currencies = { "EUR", "USD", "GBP", "CHF", "SEK", "NOK", "DKK", "PLN" }

-- Main state: the threads, to collect their counts at the end.
local threads = {}

function setup(thread)
  table.insert(threads, thread)
  thread:set("tid", #threads)
end

-- Thread state: globals, because done() reads them from each thread with thread:get.
statuses, created, recent, n, get_ids = {}, {}, {}, 0, {}
local RECENT = 50

function init(args)
  math.randomseed(os.time() * 1000 + (tid or 0))
  if token == "" then
    io.stderr:write("orders.lua: TOKEN is not set\n")
    os.exit(2)
  end
  if mode == "get" then
    local f = get_ids_file and io.open(get_ids_file, "r")
    if not f then
      io.stderr:write("orders.lua: MODE=get needs GET_IDS, a readable file of order ids\n")
      os.exit(2)
    end
    for line in f:lines() do
      local id = line:match("([0-9a-fA-F%-]+)%s*$")
      if id then get_ids[#get_ids + 1] = id end
    end
    f:close()
    if #get_ids == 0 then
      io.stderr:write("orders.lua: GET_IDS holds no ids\n")
      os.exit(2)
    end
  end
end

function delay()
  if rate <= 0 then return 0 end
  -- Exponential pauses around the mean keep the connections from marching in step.
  local mean = 1000 * connections / rate
  return math.floor(-mean * math.log(1 - math.random()))
end

local function order_body()
  local currency = currencies[math.random(#currencies)]
  if math.random() < invalid_ratio then currency = "XTS" end
  local lines = {}
  for i = 1, math.random(5) do
    lines[i] = string.format('{"sku":"SKU-%d","qty":%d,"unit_price_cents":%d}',
      math.random(5000), math.random(5), math.random(100, 20000))
  end
  return string.format('{"customer_id":"cust-%d","currency":"%s","items":[%s]}',
    math.random(20000), currency, table.concat(lines, ","))
end

function request()
  n = n + 1
  local headers = { ["Authorization"] = "Bearer " .. token }
  if clients == "many" then
    headers["X-Forwarded-For"] = string.format("10.%d.%d.%d", (tid or 0) % 256, math.floor(n / 256) % 256, n % 256)
  elseif clients == "one" then
    headers["X-Forwarded-For"] = client_ip
  end
  local kind = mode
  if mode == "mix" then
    local r = math.random()
    if r < 0.6 then kind = "async" elseif r < 0.8 then kind = "sync" else kind = "read" end
    if kind == "read" and #recent < RECENT then kind = "async" end
  end
  if kind == "get" then
    return wrk.format("GET", "/v1/orders/" .. get_ids[math.random(#get_ids)], headers)
  elseif kind == "read" then
    -- The oldest of the last RECENT orders this thread created: acknowledged a while ago.
    return wrk.format("GET", "/v1/orders/" .. recent[1], headers)
  end
  headers["Content-Type"] = "application/json"
  local path = kind == "sync" and "/v1/orders" or "/v1/orders/async"
  return wrk.format("POST", path, headers, order_body())
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
  -- 202 async accepted, 201 sync accepted, 422 sync rejected by the rules, 504 sync still going on: each
  -- carries the id of an order that was published. (A read answers 200 or 404.)
  if status == 201 or status == 202 or status == 422 or status == 504 then
    local id = body and body:match('"id"%s*:%s*"([0-9a-fA-F%-]+)"')
    if id then
      created[#created + 1] = status .. " " .. id
      recent[#recent + 1] = id
      if #recent > RECENT then table.remove(recent, 1) end
    end
  end
end

function done(summary, latency, requests)
  local total = {}
  local out
  if ids_out then
    out = io.open(ids_out, "w")
    if not out then io.stderr:write("orders.lua: cannot write IDS_OUT " .. ids_out .. "\n") end
  end
  for _, thread in ipairs(threads) do
    for status, count in pairs(thread:get("statuses") or {}) do
      total[status] = (total[status] or 0) + count
    end
    if out then
      for _, line in ipairs(thread:get("created") or {}) do out:write(line, "\n") end
    end
  end
  if out then out:close() end
  local parts = {}
  for status, count in pairs(total) do parts[#parts + 1] = string.format('"%d":%d', status, count) end
  local e = summary.errors
  io.write(string.format(
    'LOADTEST {"requests":%d,"duration_us":%d,"statuses":{%s},' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"timeout":%d},' ..
    '"latency_us":{"p50":%d,"p90":%d,"p99":%d,"max":%d}}\n',
    summary.requests, summary.duration, table.concat(parts, ","),
    e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
