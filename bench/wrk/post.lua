-- wrk script for bench/inference.py: POST one fixed body, then print the figures as one JSON line.
--
-- The body is read from the file named by WRK_BODY_FILE (a file, not an inline Lua string: binary
-- tensor bodies hold arbitrary bytes). With WRK_INFERENCE_HEADER_LENGTH set, the body is a binary
-- tensor data request whose JSON header is that many bytes long.

local file = assert(io.open(assert(os.getenv("WRK_BODY_FILE")), "rb"))
wrk.method = "POST"
wrk.body = file:read("*a")
file:close()

local header_length = os.getenv("WRK_INFERENCE_HEADER_LENGTH")
if header_length then
  wrk.headers["Content-Type"] = "application/octet-stream"
  wrk.headers["Inference-Header-Content-Length"] = header_length
else
  wrk.headers["Content-Type"] = "application/json"
end

function done(summary, latency, requests)
  local errors = summary.errors
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, ' ..
    '"connect_errors": %d, "read_errors": %d, "write_errors": %d, ' ..
    '"status_errors": %d, "timeouts": %d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    errors.connect, errors.read, errors.write, errors.status, errors.timeout))
end
