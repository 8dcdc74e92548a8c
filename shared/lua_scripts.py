"""Lua scripts for every job-state transition: each runs atomically inside Redis.

Times come from the server's clock (`TIME`) so that leases compare correctly across hosts.
Events for each transition are appended in the same script, so history never disagrees with state;
every terminal transition also leaves an entry in the webhook outbox in that same step (a
transactional outbox: a job can never end without its webhook being due, nor the reverse).

Slots: ACTIVE holds one member per slot (queued-and-published or running jobs). WAITING holds, in
arrival order, the jobs that asked to wait for a slot; PROMOTE moves them into ACTIVE as slots free.
"""

from shared import keys

_PRELUDE = (
    """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function event(stream, now, etype, message, data)
  return redis.call('XADD', stream, 'MAXLEN', '~', 100000, '*',
    'type', etype, 'ts', string.format('%.3f', now / 1000), 'message', message, 'data', data)
end
local function stamp(now) return string.format('%.3f', now / 1000) end
-- A job that is not running has no time left to show: its progress keeps every figure but the ETA
-- (the JSON is edited as text, so the other figures keep their exact digits).
local function no_eta(key)
  local p = redis.call('HGET', key, 'progress')
  if p and p ~= '' then
    local cleared = string.gsub(p, '"eta_seconds":[^,}]*', '"eta_seconds":null')
    redis.call('HSET', key, 'progress', cleared)
  end
end
-- A job ended: its status, end time and the other fields given (name, value, ...), its status event, and
-- its webhook due in the outbox (api.webhooks.events reads it).
local function ended(key, stream, now, job_id, status, message, ...)
  redis.call('HSET', key, 'status', status, 'finished_at', stamp(now), ...)
  no_eta(key)
  local id = event(stream, now, 'status', message, '{"status":"' .. status .. '"}')
  redis.call('RPUSH', '"""
    + keys.WEBHOOK_OUTBOX
    + """', cjson.encode({event_id = id, job_id = job_id, status = status, created_at = now / 1000}))
  redis.call('LTRIM', '"""
    + keys.WEBHOOK_OUTBOX
    + """', -10000, -1)
end
"""
)

# KEYS: active, jobs, job, events, waiting. ARGV: id, max_slots, queue_timeout_ms, max_waiting, field, value, ...
# A slot when one is free and nobody waits for it: {1, {}}. Otherwise, with max_waiting > 0, a place
# in the waiting line while it has room: {2, {position}}; {3, {}} when the line is full. With
# max_waiting = 0 (the seed's rule): {0, ids holding the slots}.
ADMIT = (
    _PRELUDE
    + """
local running = redis.call('ZRANGE', KEYS[1], 0, -1)
local waiting = redis.call('ZCARD', KEYS[5])
local max_waiting = tonumber(ARGV[4])
local now = now_ms()
if #running < tonumber(ARGV[2]) and waiting == 0 then
  redis.call('HSET', KEYS[3], 'created_at', stamp(now), unpack(ARGV, 5))
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
  redis.call('ZADD', KEYS[2], now, ARGV[1])
  event(KEYS[4], now, 'status', 'Job queued', '{"status":"queued"}')
  return {1, {}}
end
if max_waiting <= 0 then return {0, running} end
if waiting >= max_waiting then return {3, {}} end
redis.call('HSET', KEYS[3], 'created_at', stamp(now), unpack(ARGV, 5))
redis.call('HSET', KEYS[3], 'message', 'Queued, waiting for a free slot')
redis.call('ZADD', KEYS[5], now, ARGV[1])
redis.call('ZADD', KEYS[2], now, ARGV[1])
event(KEYS[4], now, 'status', 'Job queued, waiting for a free slot (position ' .. (waiting + 1) .. ')',
  '{"status":"queued"}')
return {2, {waiting + 1}}
"""
)

# KEYS: active, waiting. ARGV: max_slots, queue_timeout_ms, job key prefix, events suffix.
# Moves the longest-waiting jobs into free slots; returns their ids (the caller publishes their tasks).
PROMOTE = (
    _PRELUDE
    + """
local free = tonumber(ARGV[1]) - redis.call('ZCARD', KEYS[1])
local promoted = {}
local now = now_ms()
while free > 0 do
  local head = redis.call('ZRANGE', KEYS[2], 0, 0)
  if #head == 0 then break end
  local id = head[1]
  redis.call('ZREM', KEYS[2], id)
  local key = ARGV[3] .. id
  if redis.call('HGET', key, 'status') == 'queued' then
    redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), id)
    redis.call('HSET', key, 'message', 'Queued, waiting for a worker')
    event(key .. ARGV[4], now, 'info', 'A slot is free: waiting for a worker', '{}')
    table.insert(promoted, id)
    free = free - 1
  end
end
return promoted
"""
)

# KEYS: job, active, events. ARGV: id, token, lease_ms, worker. Returns 'ok' or the status found.
CLAIM = (
    _PRELUDE
    + """
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return 'missing' end
if st ~= 'queued' then return st end
if not redis.call('ZSCORE', KEYS[2], ARGV[1]) then return 'waiting' end
local now = now_ms()
redis.call('HSET', KEYS[1], 'status', 'running', 'run_token', ARGV[2], 'worker', ARGV[4],
  'started_at', stamp(now), 'message', 'Training...')
local attempt = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[1])
event(KEYS[3], now, 'status', 'Job running on ' .. ARGV[4] .. ' (attempt ' .. attempt .. ')',
  '{"status":"running"}')
return 'ok'
"""
)

# KEYS: job, active. ARGV: id, token, lease_ms, progress_json ('' keeps it).
# Returns -1 when this runner no longer owns the job (fenced), 1 when cancel was requested, 2 when a
# pause was requested, else 0.
RENEW = (
    _PRELUDE
    + """
local st = redis.call('HGET', KEYS[1], 'status')
if st ~= 'running' and st ~= 'pausing' then return -1 end
if redis.call('HGET', KEYS[1], 'run_token') ~= ARGV[2] then return -1 end
redis.call('ZADD', KEYS[2], 'XX', now_ms() + tonumber(ARGV[3]), ARGV[1])
if ARGV[4] ~= '' then redis.call('HSET', KEYS[1], 'progress', ARGV[4]) end
if redis.call('HGET', KEYS[1], 'cancel_requested') == '1' then return 1 end
if st == 'pausing' then return 2 end
-- what the run is doing now (loading its model, training): never over a cancel's or a pause's message
if ARGV[5] and ARGV[5] ~= '' then redis.call('HSET', KEYS[1], 'message', ARGV[5]) end
return 0
"""
)

# KEYS: job, active, events. ARGV: id, token, status, event_message, event_data, field, value, ...
# `paused` keeps the job (it may resume), unless a cancel arrived while it was pausing: then it is
# cancelled. Every other status ends it. Returns 0 (not this runner's to record), else the status
# recorded.
FINISH = (
    _PRELUDE
    + """
local st = redis.call('HGET', KEYS[1], 'status')
if st ~= 'running' and st ~= 'pausing' then return 0 end
if redis.call('HGET', KEYS[1], 'run_token') ~= ARGV[2] then return 0 end
local now = now_ms()
redis.call('ZREM', KEYS[2], ARGV[1])
if ARGV[3] == 'paused' then
  if redis.call('HGET', KEYS[1], 'cancel_requested') == '1' then
    ended(KEYS[1], KEYS[3], now, ARGV[1], 'cancelled', 'Job cancelled while pausing',
      'error', 'cancelled by request', 'message', 'Cancelled while pausing')
    return 'cancelled'
  end
  redis.call('HSET', KEYS[1], 'status', 'paused', 'run_token', '', 'paused_at', stamp(now), unpack(ARGV, 6))
  no_eta(KEYS[1])
  event(KEYS[3], now, 'status', ARGV[4], ARGV[5])
  return 'paused'
end
ended(KEYS[1], KEYS[3], now, ARGV[1], ARGV[3], ARGV[4], unpack(ARGV, 6))
return ARGV[3]
"""
)

# KEYS: job, active, events, waiting. ARGV: id, token, event_message, count_attempt ('1' or '0'), field, value, ...
# A runner that stopped for a reason that is not the job's (its worker was asked to stop, or lost Redis)
# hands the job back: queued again at the head of the waiting line, its slot freed (PROMOTE gives the
# next free slot to it first), and it continues from the state it saved. A stop on request is not a
# failed attempt ('0': the attempt is given back). A cancel or pause asked meanwhile wins. Returns 0 (not
# this runner's to settle), else the status recorded.
HAND_BACK = (
    _PRELUDE
    + """
local st = redis.call('HGET', KEYS[1], 'status')
if st ~= 'running' and st ~= 'pausing' then return 0 end
if redis.call('HGET', KEYS[1], 'run_token') ~= ARGV[2] then return 0 end
local now = now_ms()
redis.call('ZREM', KEYS[2], ARGV[1])
if redis.call('HGET', KEYS[1], 'cancel_requested') == '1' then
  ended(KEYS[1], KEYS[3], now, ARGV[1], 'cancelled', 'Job cancelled while its worker stopped',
    'error', 'cancelled by request', 'message', 'Cancelled while its worker stopped')
  return 'cancelled'
end
if st == 'pausing' then
  redis.call('HSET', KEYS[1], 'status', 'paused', 'run_token', '', 'paused_at', stamp(now), unpack(ARGV, 5))
  no_eta(KEYS[1])
  redis.call('HSET', KEYS[1], 'message', 'Paused; resume continues from its saved state')
  event(KEYS[3], now, 'status', 'Job paused (its worker stopped while pausing)', '{"status":"paused"}')
  return 'paused'
end
local score = now
local head = redis.call('ZRANGE', KEYS[4], 0, 0, 'WITHSCORES')
if #head > 0 and tonumber(head[2]) <= score then score = tonumber(head[2]) - 1 end
redis.call('HSET', KEYS[1], 'status', 'queued', 'run_token', '', 'worker', '', unpack(ARGV, 5))
no_eta(KEYS[1])
if ARGV[4] == '0' then redis.call('HINCRBY', KEYS[1], 'attempts', -1) end
redis.call('ZADD', KEYS[4], score, ARGV[1])
event(KEYS[3], now, 'status', ARGV[3], '{"status":"queued"}')
return 'queued'
"""
)

# KEYS: job, active, events. ARGV: id, event_message, field, value, ... A job whose lease lapsed but whose
# complete adapter is on disk (written by one of its runs, which could not record it): it succeeded.
# Returns 1 when recorded, 0 when the job is no longer running with a lapsed lease.
SETTLE_COMPLETE = (
    _PRELUDE
    + """
local st = redis.call('HGET', KEYS[1], 'status')
if st ~= 'running' and st ~= 'pausing' then return 0 end
local deadline = redis.call('ZSCORE', KEYS[2], ARGV[1])
local now = now_ms()
if deadline and tonumber(deadline) > now then return 0 end
redis.call('ZREM', KEYS[2], ARGV[1])
ended(KEYS[1], KEYS[3], now, ARGV[1], 'succeeded', ARGV[2], 'run_token', '', unpack(ARGV, 3))
return 1
"""
)

# KEYS: job, active, events, waiting. ARGV: id. Returns 'removed' (was queued or paused), 'requested'
# (running; the worker stops soon), 'missing' or the terminal status found.
CANCEL = (
    _PRELUDE
    + """
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return 'missing' end
local now = now_ms()
if st == 'queued' or st == 'paused' then
  local what = 'before it started'
  if st == 'paused' then what = 'while paused' end
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('ZREM', KEYS[4], ARGV[1])
  ended(KEYS[1], KEYS[3], now, ARGV[1], 'cancelled', 'Job cancelled ' .. what,
    'message', 'Cancelled ' .. what, 'error', 'cancelled by request')
  return 'removed'
end
if st == 'running' or st == 'pausing' then
  if redis.call('HGET', KEYS[1], 'cancel_requested') ~= '1' then
    redis.call('HSET', KEYS[1], 'cancel_requested', '1', 'message', 'Cancelling...')
    event(KEYS[3], now, 'cancel_requested', 'Cancellation requested', '{}')
  end
  return 'requested'
end
return st
"""
)

# KEYS: job, active, events, waiting. ARGV: id. Returns 'paused' (it had not started: paused at once),
# 'pausing' (its worker saves its state and stops at the next step), 'missing' or the status found.
PAUSE = (
    _PRELUDE
    + """
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return 'missing' end
local now = now_ms()
if st == 'queued' then
  redis.call('HSET', KEYS[1], 'status', 'paused', 'paused_at', stamp(now), 'message', 'Paused before it started')
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('ZREM', KEYS[4], ARGV[1])
  event(KEYS[3], now, 'status', 'Job paused before it started', '{"status":"paused"}')
  return 'paused'
end
if st == 'running' then
  redis.call('HSET', KEYS[1], 'status', 'pausing', 'message', 'Pausing: saving its state at the next step')
  event(KEYS[3], now, 'status', 'Pause requested', '{"status":"pausing"}')
  return 'pausing'
end
return st
"""
)

# KEYS: job, events, waiting. ARGV: id. A paused job goes to the back of the waiting line (PROMOTE
# starts it when a slot is free); its runs start counting again. Returns 'resumed' or the status found.
RESUME = (
    _PRELUDE
    + """
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return 'missing' end
if st ~= 'paused' then return st end
local now = now_ms()
redis.call('HSET', KEYS[1], 'status', 'queued', 'attempts', '0', 'worker', '', 'cancel_requested', '0',
  'message', 'Resumed: queued, waiting for a free slot')
redis.call('ZADD', KEYS[3], now, ARGV[1])
event(KEYS[2], now, 'status', 'Job resumed; queued for a free slot', '{"status":"queued"}')
return 'resumed'
"""
)

# KEYS: active. ARGV: job key prefix, events suffix, queue_timeout_ms.
# Lapsed running jobs are requeued while attempts remain (they continue from their saved state), else
# failed; a job lost while pausing is paused (at its last saved state); lapsed queued jobs fail.
# Returns the ids requeued (the caller publishes their tasks again).
REAP = (
    _PRELUDE
    + """
local now = now_ms()
local lapsed = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
local requeued = {}
for _, id in ipairs(lapsed) do
  local key = ARGV[1] .. id
  local stream = key .. ARGV[2]
  local st = redis.call('HGET', key, 'status')
  if st == 'running' or st == 'pausing' then
    local attempts = tonumber(redis.call('HGET', key, 'attempts') or '0')
    local max = tonumber(redis.call('HGET', key, 'max_attempts') or '1')
    local who = redis.call('HGET', key, 'worker') or 'unknown'
    if redis.call('HGET', key, 'cancel_requested') == '1' then
      -- It was being cancelled anyway: no point loading the model again just to stop.
      redis.call('ZREM', KEYS[1], id)
      ended(key, stream, now, id, 'cancelled', 'Job cancelled (worker lost while stopping)',
        'error', 'cancelled by request', 'message', 'Cancelled (its worker was lost while stopping)')
    elseif st == 'pausing' then
      redis.call('HSET', key, 'status', 'paused', 'run_token', '', 'paused_at', stamp(now),
        'message', 'Paused (its worker was lost while pausing; it resumes from its last saved state)')
      no_eta(key)
      redis.call('ZREM', KEYS[1], id)
      event(stream, now, 'status', 'Worker ' .. who .. ' lost while pausing; job paused', '{"status":"paused"}')
    elseif attempts < max then
      redis.call('HSET', key, 'status', 'queued', 'run_token', '', 'worker', '',
        'message', 'Worker lost; queued for another attempt')
      no_eta(key)
      redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), id)
      event(stream, now, 'status', 'Worker ' .. who .. ' lost; job queued for attempt ' .. (attempts + 1),
        '{"status":"queued"}')
      table.insert(requeued, id)
    else
      local err = 'worker lost: ' .. who .. ' stopped renewing its lease'
      redis.call('ZREM', KEYS[1], id)
      ended(key, stream, now, id, 'failed', err, 'error', err, 'message', 'Training failed')
    end
  elseif st == 'queued' then
    local err = 'no worker picked up the job in time'
    redis.call('ZREM', KEYS[1], id)
    ended(key, stream, now, id, 'failed', err, 'error', err, 'message', 'Training failed')
  else
    redis.call('ZREM', KEYS[1], id)
  end
end
return requeued
"""
)

# KEYS: job, active, events, waiting. ARGV: id, error. A queued job whose task could not be published.
ABORT = (
    _PRELUDE
    + """
if redis.call('HGET', KEYS[1], 'status') ~= 'queued' then return 0 end
local now = now_ms()
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
ended(KEYS[1], KEYS[3], now, ARGV[1], 'failed', ARGV[2], 'error', ARGV[2], 'message', 'Training failed')
return 1
"""
)
