-- keygate quota windows, one atomic call per decision (the design is in src/quota/redis.rs).
-- The semantics are src/quota/memory.rs and src/quota/window.rs, line for line.
--
-- KEYS: one hash per subject. Fields: "<unix second>" = requests charged in that second,
-- "e" = every second up to and including this one is evicted (and "e" + 61 is the latest
-- second a charge was made at: the counters never see time go back), "d" = the day id
-- (yyyymmdd) that "dn" counts.
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

if op == 'refund' then
  local second = ARGV[3]
  local day = ARGV[4]
  for i = 1, #KEYS do
    local key = KEYS[i]
    local f = redis.call('HMGET', key, second, 'd', 'dn')
    -- A bucket that has been evicted is gone: the refund only touches the charge it undoes.
    if f[1] and tonumber(f[1]) > 0 then
      if redis.call('HINCRBY', key, second, -1) <= 0 then
        redis.call('HDEL', key, second)
      end
    end
    if f[2] == day and f[3] and tonumber(f[3]) > 0 then
      redis.call('HINCRBY', key, 'dn', -1)
    end
  end
  return 1
end

local day_id = ARGV[3]
local day_start = tonumber(ARGV[4])
local day_end = tonumber(ARGV[5])
local n = #KEYS

-- Read every subject's marks first: time never goes back for counters that have seen a
-- later second (a server clock stepped back must not reopen a window).
local now_s = math.floor(now_ms / 1000)
local marks = {}
for i = 1, n do
  local f = redis.call('HMGET', KEYS[i], 'e', 'd', 'dn')
  marks[i] = f
  local e = tonumber(f[1])
  if e and e + BUCKETS > now_s then
    now_s = e + BUCKETS
    now_ms = now_s * 1000
  end
end

if now_ms < day_start or now_ms >= day_end then
  return {-1, now_ms}
end

-- The live window: the current second and the 60 before it.
local fields = {}
for j = 1, BUCKETS do
  fields[j] = tostring(now_s - BUCKETS + j)
end

local minute_used, first_live, day_used, counts = {}, {}, {}, {}
for i = 1, n do
  local values = redis.call('HMGET', KEYS[i], unpack(fields))
  local sum = 0
  local c = {}
  for j = 1, BUCKETS do
    local v = tonumber(values[j]) or 0
    c[j] = v
    if v > 0 then
      sum = sum + v
      if not first_live[i] then
        first_live[i] = j
      end
    end
  end
  counts[i] = c
  minute_used[i] = sum
  if marks[i][2] == day_id then
    day_used[i] = tonumber(marks[i][3]) or 0
  else
    day_used[i] = 0
  end
end

-- Bucket j (1 = oldest) stops counting at the start of second now_s + j.
local function expiry_ms(j)
  return (now_s + j) * 1000 - now_ms
end

local denied_index, denied_window, retry_ms = 0, 0, 0
for i = 1, n do
  local rpm = tonumber(ARGV[4 + 2 * i])
  local rpd = tonumber(ARGV[5 + 2 * i])
  if minute_used[i] >= rpm then
    if denied_index == 0 then
      denied_index, denied_window = i, 1
    end
    local used = minute_used[i]
    local wait = BUCKETS * 1000
    for j = 1, BUCKETS do
      used = used - counts[i][j]
      if counts[i][j] > 0 and used < rpm then
        wait = expiry_ms(j)
        break
      end
    end
    retry_ms = math.max(retry_ms, wait)
  end
  if day_used[i] >= rpd then
    if denied_index == 0 then
      denied_index, denied_window = i, 2
    end
    retry_ms = math.max(retry_ms, day_end - now_ms)
  end
end

local status = 2
if op == 'decide' then
  if denied_index == 0 then
    status = 1
    local target = now_s - BUCKETS
    local second = tostring(now_s)
    -- The hash must outlive the day counter (until the day ends) and the newest bucket.
    local ttl = math.max(day_end - now_ms, BUCKETS * 1000) + 60000
    for i = 1, n do
      local key = KEYS[i]
      local e = tonumber(marks[i][1])
      if e and e < target then
        -- Every bucket lies in (e, e + 61]: drop the ones that left the window.
        local dead = {}
        for s = e + 1, math.min(target, e + BUCKETS) do
          dead[#dead + 1] = tostring(s)
        end
        redis.call('HDEL', key, unpack(dead))
      end
      redis.call('HINCRBY', key, second, 1)
      redis.call('HSET', key, 'e', tostring(target), 'd', day_id, 'dn', tostring(day_used[i] + 1))
      redis.call('PEXPIRE', key, ttl)
      minute_used[i] = minute_used[i] + 1
      day_used[i] = day_used[i] + 1
      if not first_live[i] then
        first_live[i] = BUCKETS
      end
    end
  else
    status = 0
  end
end

local answer = {status, now_ms, retry_ms, denied_index, denied_window}
for i = 1, n do
  local reset = 60000
  if first_live[i] then
    reset = expiry_ms(first_live[i])
  end
  answer[#answer + 1] = minute_used[i]
  answer[#answer + 1] = reset
  answer[#answer + 1] = day_used[i]
end
return answer
