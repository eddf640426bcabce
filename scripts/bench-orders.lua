-- The request mix of scripts/bench: POST /orders with a small JSON body.
--
-- BENCH_WORKLOAD picks the workload:
--   fresh   a new Idempotency-Key on every request (the first run of each key)
--   replay  one key for every request (the first runs, every later one replays)
--   nokey   no Idempotency-Key (the middleware passes the request through)
-- BENCH_RUN names the run, so that keys never repeat across runs against one server.
--
-- done() prints one machine-readable line: BENCH requests=.. rps=.. p50_us=.. p99_us=.. errors=..

local workload = os.getenv("BENCH_WORKLOAD") or "nokey"
local run = os.getenv("BENCH_RUN") or tostring(os.time())
local body = '{"sku":"tea","qty":1}'

wrk.method = "POST"
wrk.path = "/orders"
wrk.body = body
wrk.headers["Content-Type"] = "application/json"
if workload == "replay" then
  wrk.headers["Idempotency-Key"] = "replay-" .. run
end

local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("thread_id", threads)
end

local prefix
local counter = 0
local fixed

function init(args)
  math.randomseed(os.time() * 1000 + (thread_id or 0))
  prefix = string.format("%s-%d-%d-", run, thread_id or 0, math.random(1, 1000000000))
  fixed = wrk.format()
end

function request()
  if workload ~= "fresh" then
    return fixed
  end
  counter = counter + 1
  return wrk.format(nil, nil, {
    ["Host"] = wrk.headers["Host"],
    ["Content-Type"] = "application/json",
    ["Idempotency-Key"] = prefix .. counter,
  }, body)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH requests=%d rps=%.1f p50_us=%d p99_us=%d errors=%d\n",
    summary.requests,
    summary.requests / (summary.duration / 1e6),
    latency:percentile(50),
    latency:percentile(99),
    e.connect + e.read + e.write + e.status + e.timeout))
end
