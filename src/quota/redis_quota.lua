-- keygate quota windows, one atomic call per decision (the design is in src/quota/redis.rs).
-- The semantics are src/quota/memory.rs and src/quota/window.rs; tests/redis_store.rs checks
-- that both stores give the same answers.
--
-- KEYS: one hash per subject. Fields:
--   "<unix second>"  requests charged in that second (present only while > 0)
--   e   every bucket at or before this second has been deleted; e + 61 is the latest second
--       a decision ran at, so the counters never see time go back
--   n   the sum of all present buckets
--   o   the oldest present bucket (meaningful while n > 0)
--   d, dn  the day id (yyyymmdd) and its count
-- Every present bucket lies in (e, e + 61], so a decision touches a few fields, not 61:
-- O(1) per decision, plus the buckets that left the window since the last one.
--
-- ARGV[1] = "decide" | "usage" | "refund"
-- ARGV[2] = milliseconds added to the server's TIME: always 0 in production (see
--           Clock::offset_from_wall_ms); tests move the windows with it.
-- decide, usage: ARGV[3] day id, ARGV[4] day start ms, ARGV[5] day end ms (the calendar day
--           in quotas.day_tz that the caller believes is current), then rpm, rpd per key.
-- refund:   ARGV[3] second, ARGV[4] day id of the admission.
--
-- decide/usage answer {status, now_ms, retry_ms, denied_index, denied_window,
--   then per key: minute_used, minute_reset_ms, day_used}
--   status 1 = admitted and charged, 0 = refused (nothing charged), 2 = usage only,
--   -1 = the day sent is not the day at the server's time: {-1, now_ms}, ask again.
--   denied_window 1 = minute, 2 = day.

local BUCKETS = 61

local op = ARGV[1]
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[2])

local function range(first, last)
  local fields = {}
  for s = first, last do
    fields[#fields + 1] = tostring(s)
  end
  return fields
end

-- The oldest bucket present in [first, last]; nil when none.
local function oldest_in(key, first, last)
  if first > last then
    return nil
  end
  -- Busy subjects have a bucket every second: one probe usually finds it.
  if redis.call('HEXISTS', key, tostring(first)) == 1 then
    return first
  end
  if first == last then
    return nil
  end
  local values = redis.call('HMGET', key, unpack(range(first + 1, last)))
  for j = 1, #values do
    if values[j] then
      return first + j
    end
  end
  return nil
end

if op == 'refund' then
  local field = ARGV[3]
  local second = tonumber(field)
  local day = ARGV[4]
  for i = 1, #KEYS do
    local key = KEYS[i]
    local f = redis.call('HMGET', key, field, 'e', 'n', 'o', 'd', 'dn')
    -- A bucket that has been evicted is gone: the refund only undoes its own charge.
    local count = tonumber(f[1])
    if count and count > 0 then
      local n = math.max((tonumber(f[3]) or count) - 1, 0)
      local o = tonumber(f[4])
      if count == 1 then
        redis.call('HDEL', key, field)
        if n > 0 and o == second then
          local e = tonumber(f[2]) or (second - BUCKETS)
          o = oldest_in(key, second + 1, e + BUCKETS)
        end
      else
        redis.call('HINCRBY', key, field, -1)
      end
      redis.call('HSET', key, 'n', tostring(n), 'o', tostring(o or second))
    end
    if f[5] == day and tonumber(f[6] or 0) > 0 then
      redis.call('HINCRBY', key, 'dn', -1)
    end
  end
  return 1
end

local day_id = ARGV[3]
local day_start = tonumber(ARGV[4])
local day_end = tonumber(ARGV[5])
local count = #KEYS

-- Read every subject first: time never goes back for counters that have seen a later
-- second (a server clock stepped back must not reopen a window).
local now_s = math.floor(now_ms / 1000)
local state = {}
for i = 1, count do
  local f = redis.call('HMGET', KEYS[i], 'e', 'n', 'o', 'd', 'dn')
  local e = tonumber(f[1])
  state[i] = { e = e, n = tonumber(f[2]) or 0, o = tonumber(f[3]), d = f[4], dn = tonumber(f[5]) or 0 }
  if e and e + BUCKETS > now_s then
    now_s = e + BUCKETS
    now_ms = now_s * 1000
  end
end

if now_ms < day_start or now_ms >= day_end then
  return { -1, now_ms }
end

-- The window is the current second and the 60 before it: buckets up to `target` left it.
local target = now_s - BUCKETS
for i = 1, count do
  local s = state[i]
  if s.e and s.e < target then
    if s.n > 0 then
      local o = s.o or (s.e + 1)
      if o <= target then
        local dead = range(o, math.min(target, s.e + BUCKETS))
        local values = redis.call('HMGET', KEYS[i], unpack(dead))
        local gone = 0
        for j = 1, #values do
          gone = gone + (tonumber(values[j]) or 0)
        end
        redis.call('HDEL', KEYS[i], unpack(dead))
        s.n = math.max(s.n - gone, 0)
        if s.n > 0 then
          s.o = oldest_in(KEYS[i], target + 1, s.e + BUCKETS)
          if not s.o then
            s.n = 0
          end
        end
      end
    end
    s.e = target
    s.moved = true
  end
end

-- Bucket `second` stops counting at the start of second + 61.
local function expiry_ms(second)
  return (second + BUCKETS) * 1000 - now_ms
end

-- How long until fewer than `rpm` requests are in the window.
local function room_ms(key, s, rpm)
  local oldest = tonumber(redis.call('HGET', key, tostring(s.o))) or 0
  if s.n - oldest < rpm then
    return expiry_ms(s.o)
  end
  local used = s.n
  local values = redis.call('HMGET', key, unpack(range(s.o, now_s)))
  for j = 1, #values do
    local c = tonumber(values[j]) or 0
    used = used - c
    if c > 0 and used < rpm then
      return expiry_ms(s.o + j - 1)
    end
  end
  return BUCKETS * 1000
end

local denied_index, denied_window, retry_ms = 0, 0, 0
for i = 1, count do
  local s = state[i]
  local rpm = tonumber(ARGV[4 + 2 * i])
  local rpd = tonumber(ARGV[5 + 2 * i])
  if s.d ~= day_id then
    s.dn = 0
  end
  if s.n >= rpm then
    if denied_index == 0 then
      denied_index, denied_window = i, 1
    end
    retry_ms = math.max(retry_ms, room_ms(KEYS[i], s, rpm))
  end
  if s.dn >= rpd then
    if denied_index == 0 then
      denied_index, denied_window = i, 2
    end
    retry_ms = math.max(retry_ms, day_end - now_ms)
  end
end

local status = 2
if op == 'decide' then
  status = 0
  if denied_index == 0 then
    status = 1
    local second = tostring(now_s)
    -- The hash must outlive the day counter (until the day ends) and the newest bucket.
    local ttl = math.max(day_end - now_ms, BUCKETS * 1000) + 60000
    for i = 1, count do
      local s = state[i]
      redis.call('HINCRBY', KEYS[i], second, 1)
      if s.n == 0 then
        s.o = now_s
      end
      s.n = s.n + 1
      s.dn = s.dn + 1
      redis.call('HSET', KEYS[i], 'e', tostring(target), 'n', tostring(s.n), 'o', tostring(s.o),
        'd', day_id, 'dn', tostring(s.dn))
      redis.call('PEXPIRE', KEYS[i], ttl)
      s.moved = false
    end
  end
end
-- Evictions made by a refusal or a usage read are kept, so the next call starts there.
for i = 1, count do
  local s = state[i]
  if s.moved then
    redis.call('HSET', KEYS[i], 'e', tostring(s.e), 'n', tostring(s.n), 'o', tostring(s.o or s.e))
  end
end

local answer = { status, now_ms, retry_ms, denied_index, denied_window }
for i = 1, count do
  local s = state[i]
  local reset = 60000
  if s.n > 0 then
    reset = expiry_ms(s.o)
  end
  answer[#answer + 1] = s.n
  answer[#answer + 1] = reset
  answer[#answer + 1] = s.dn
end
return answer
