"""Lua scripts for every job-state transition: each runs atomically inside Redis.

Times come from the server's clock (`TIME`) so that leases compare correctly across hosts.
Events for each transition are appended in the same script, so history never disagrees with state.
"""

_PRELUDE = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function event(stream, now, etype, message, data)
  redis.call('XADD', stream, 'MAXLEN', '~', 100000, '*',
    'type', etype, 'ts', string.format('%.3f', now / 1000), 'message', message, 'data', data)
end
"""

# KEYS: active, jobs, job, events. ARGV: id, max_slots, queue_timeout_ms, field, value, ...
ADMIT = (
    _PRELUDE
    + """
local running = redis.call('ZRANGE', KEYS[1], 0, -1)
if #running >= tonumber(ARGV[2]) then
  return {0, running}
end
local now = now_ms()
redis.call('HSET', KEYS[3], 'created_at', string.format('%.3f', now / 1000), unpack(ARGV, 4))
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('ZADD', KEYS[2], now, ARGV[1])
event(KEYS[4], now, 'status', 'Job queued', '{"status":"queued"}')
return {1, {}}
"""
)

# KEYS: job, active, events. ARGV: id, token, lease_ms, worker. Returns 'ok' or the status found.
CLAIM = (
    _PRELUDE
    + """
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return 'missing' end
if st ~= 'queued' then return st end
local now = now_ms()
redis.call('HSET', KEYS[1], 'status', 'running', 'run_token', ARGV[2], 'worker', ARGV[4],
  'started_at', string.format('%.3f', now / 1000), 'message', 'Training...')
local attempt = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[1])
event(KEYS[3], now, 'status', 'Job running on ' .. ARGV[4] .. ' (attempt ' .. attempt .. ')',
  '{"status":"running"}')
return 'ok'
"""
)

# KEYS: job, active. ARGV: id, token, lease_ms, progress_json ('' keeps it).
# Returns -1 when this runner no longer owns the job (fenced), 1 when cancel was requested, else 0.
RENEW = (
    _PRELUDE
    + """
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return -1 end
if redis.call('HGET', KEYS[1], 'run_token') ~= ARGV[2] then return -1 end
redis.call('ZADD', KEYS[2], 'XX', now_ms() + tonumber(ARGV[3]), ARGV[1])
if ARGV[4] ~= '' then redis.call('HSET', KEYS[1], 'progress', ARGV[4]) end
if redis.call('HGET', KEYS[1], 'cancel_requested') == '1' then return 1 end
return 0
"""
)

# KEYS: job, active, events. ARGV: id, token, status, event_message, event_data, field, value, ...
FINISH = (
    _PRELUDE
    + """
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 0 end
if redis.call('HGET', KEYS[1], 'run_token') ~= ARGV[2] then return 0 end
local now = now_ms()
redis.call('HSET', KEYS[1], 'status', ARGV[3], 'finished_at', string.format('%.3f', now / 1000),
  unpack(ARGV, 6))
redis.call('ZREM', KEYS[2], ARGV[1])
event(KEYS[3], now, 'status', ARGV[4], ARGV[5])
return 1
"""
)

# KEYS: job, active, events. ARGV: id. Returns 'removed' (was queued), 'requested' (running), 'missing'
# or the terminal status found.
CANCEL = (
    _PRELUDE
    + """
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return 'missing' end
local now = now_ms()
if st == 'queued' then
  redis.call('HSET', KEYS[1], 'status', 'cancelled', 'finished_at', string.format('%.3f', now / 1000),
    'message', 'Cancelled before it started', 'error', 'cancelled by request')
  redis.call('ZREM', KEYS[2], ARGV[1])
  event(KEYS[3], now, 'status', 'Job cancelled before it started', '{"status":"cancelled"}')
  return 'removed'
end
if st == 'running' then
  if redis.call('HGET', KEYS[1], 'cancel_requested') ~= '1' then
    redis.call('HSET', KEYS[1], 'cancel_requested', '1', 'message', 'Cancelling...')
    event(KEYS[3], now, 'cancel_requested', 'Cancellation requested', '{}')
  end
  return 'requested'
end
return st
"""
)

# KEYS: active. ARGV: job key prefix, events suffix, queue_timeout_ms.
# Lapsed running jobs are requeued while attempts remain, else failed; lapsed queued jobs fail.
# Returns the ids requeued (the caller publishes their tasks again).
REAP = (
    _PRELUDE
    + """
local now = now_ms()
local lapsed = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
local requeued = {}
local stamp = string.format('%.3f', now / 1000)
for _, id in ipairs(lapsed) do
  local key = ARGV[1] .. id
  local stream = key .. ARGV[2]
  local st = redis.call('HGET', key, 'status')
  if st == 'running' then
    local attempts = tonumber(redis.call('HGET', key, 'attempts') or '0')
    local max = tonumber(redis.call('HGET', key, 'max_attempts') or '1')
    local who = redis.call('HGET', key, 'worker') or 'unknown'
    if redis.call('HGET', key, 'cancel_requested') == '1' then
      -- It was being cancelled anyway: no point loading the model again just to stop.
      redis.call('HSET', key, 'status', 'cancelled', 'finished_at', stamp, 'error', 'cancelled by request',
        'message', 'Cancelled (its worker was lost while stopping)')
      redis.call('ZREM', KEYS[1], id)
      event(stream, now, 'status', 'Job cancelled (worker lost while stopping)', '{"status":"cancelled"}')
    elseif attempts < max then
      redis.call('HSET', key, 'status', 'queued', 'run_token', '', 'worker', '',
        'message', 'Worker lost; queued for another attempt')
      redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), id)
      event(stream, now, 'status', 'Worker ' .. who .. ' lost; job queued for attempt ' .. (attempts + 1),
        '{"status":"queued"}')
      table.insert(requeued, id)
    else
      local err = 'worker lost: ' .. who .. ' stopped renewing its lease'
      redis.call('HSET', key, 'status', 'failed', 'finished_at', stamp, 'error', err, 'message', 'Training failed')
      redis.call('ZREM', KEYS[1], id)
      event(stream, now, 'status', err, '{"status":"failed"}')
    end
  elseif st == 'queued' then
    local err = 'no worker picked up the job in time'
    redis.call('HSET', key, 'status', 'failed', 'finished_at', stamp, 'error', err, 'message', 'Training failed')
    redis.call('ZREM', KEYS[1], id)
    event(stream, now, 'status', err, '{"status":"failed"}')
  else
    redis.call('ZREM', KEYS[1], id)
  end
end
return requeued
"""
)

# KEYS: job, active, events. ARGV: id, error. A queued job whose task could not be published.
ABORT = (
    _PRELUDE
    + """
if redis.call('HGET', KEYS[1], 'status') ~= 'queued' then return 0 end
local now = now_ms()
redis.call('HSET', KEYS[1], 'status', 'failed', 'finished_at', string.format('%.3f', now / 1000),
  'error', ARGV[2], 'message', 'Training failed')
redis.call('ZREM', KEYS[2], ARGV[1])
event(KEYS[3], now, 'status', ARGV[2], '{"status":"failed"}')
return 1
"""
)
