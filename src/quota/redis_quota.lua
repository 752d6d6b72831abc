-- keygate quota windows: every decision atomic, several decisions per call (the design is in
-- src/quota/redis.rs). The semantics are src/quota/memory.rs and src/quota/window.rs;
-- tests/redis_store.rs checks that both stores give the same answers.
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
-- decide, usage: ARGV[2] = the number of decisions in this call, then per decision:
--   offset (milliseconds added to the server's TIME: always 0 in production, see
--   Clock::offset_from_wall_ms; tests move the windows with it), day id, day start ms, day
--   end ms (the calendar day in quotas.day_tz that the caller believes is current), times
--   (how many identical decisions this one stands for, made in a row), optional (how many
--   of those, the last, are a replica's local slice: see SLICE_SHARE), the number of
--   subjects, then per subject: its index in KEYS, rpm, rpd.
-- refund: KEYS the hashes charged, ARGV[2] unused (offset), ARGV[3] second, ARGV[4] day id,
--   ARGV[5] how many admissions to take back (1 when absent; a replica's unused slice is
--   many at once).
--
-- decide/usage answer one string: the decisions in order, separated by ';', each the
--   comma-separated integers status, now_ms, retry_ms, denied_index, denied_window, then
--   per subject: minute_used, minute_reset_ms, day_used. One string rather than nested
--   arrays: parsing a reply value costs the client far more than a byte of it. (Values are
--   integers written with '%d', exact for 64 bits.)
--   A decision made `times` > 1 times answers with at most two entries, each starting
--   `*count,` for that many decisions in a row: the admitted ones (the entry is the first
--   of them; each next one counts one more in every window's used), then the refused ones.
--   status 1 = admitted and charged, 0 = refused (nothing charged), 2 = usage only,
--   -1 = the day sent is not the day at the server's time: {-1, now_ms}, ask again.
--   denied_window 1 = minute, 2 = day.
-- Decisions of one call run in order, each seeing the charges of those before it: the same
-- answers as that many calls in a row, for one round trip.

local BUCKETS = 61
-- A replica's slice gets at most this share of the room left after the decisions before
-- it (ROOM_SHARE in src/quota/slices.rs).
local SLICE_SHARE = 64

local op = ARGV[1]
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

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
  local back = tonumber(ARGV[5] or '1')
  for i = 1, #KEYS do
    local key = KEYS[i]
    local f = redis.call('HMGET', key, field, 'e', 'n', 'o', 'd', 'dn')
    -- A bucket that has been evicted is gone: the refund only undoes its own charge.
    local count = tonumber(f[1])
    if count and count > 0 then
      local taken = math.min(back, count)
      local n = math.max((tonumber(f[3]) or count) - taken, 0)
      local o = tonumber(f[4])
      if taken == count then
        redis.call('HDEL', key, field)
        if n > 0 and o == second then
          local e = tonumber(f[2]) or (second - BUCKETS)
          o = oldest_in(key, second + 1, e + BUCKETS)
        end
      else
        redis.call('HINCRBY', key, field, -taken)
      end
      redis.call('HSET', key, 'n', tostring(n), 'o', tostring(o or second))
    end
    local dn = tonumber(f[6] or 0)
    if f[5] == day and dn > 0 then
      redis.call('HINCRBY', key, 'dn', -math.min(back, dn))
    end
  end
  return 1
end

-- decide/usage: every decision of the batch in turn, exactly as if each were its own call
-- made at the same instant; the state of a hash is read once and written back once, and
-- its bucket increments are added up and written once (each redis.call costs more than the
-- Lua of a whole decision).
local decisions = tonumber(ARGV[2])
local base_ms = now_ms
local cache = {}

local function load(key)
  local s = cache[key]
  if not s then
    local f = redis.call('HMGET', key, 'e', 'n', 'o', 'd', 'dn')
    s = { e = tonumber(f[1]), n = tonumber(f[2]) or 0, o = tonumber(f[3]), d = f[4], dn = tonumber(f[5]) or 0,
      dirty = false, ttl = nil, pending = nil }
    cache[key] = s
  end
  return s
end

-- Writes the bucket increments held back for `key`: before anything reads its buckets,
-- and at the end.
local function flush(key, s)
  if s.pending then
    for second, count in pairs(s.pending) do
      redis.call('HINCRBY', key, second, count)
    end
    s.pending = nil
  end
end

-- Bucket `second` stops counting at the start of second + 61.
local function expiry_ms(second, now_ms)
  return (second + BUCKETS) * 1000 - now_ms
end

-- How long until fewer than `rpm` requests are in the window.
local function room_ms(key, s, rpm, now_s, now_ms)
  flush(key, s)
  local oldest = tonumber(redis.call('HGET', key, tostring(s.o))) or 0
  if s.n - oldest < rpm then
    return expiry_ms(s.o, now_ms)
  end
  local used = s.n
  local values = redis.call('HMGET', key, unpack(range(s.o, now_s)))
  for j = 1, #values do
    local c = tonumber(values[j]) or 0
    used = used - c
    if c > 0 and used < rpm then
      return expiry_ms(s.o + j - 1, now_ms)
    end
  end
  return BUCKETS * 1000
end

-- The first subject and window without room for one more request (index 0: all have
-- room), and how long until every window that has none has room again.
local function refusal(keys, state, dn, limits, now_s, now_ms, day_end)
  local denied_index, denied_window, retry_ms = 0, 0, 0
  for i = 1, #keys do
    local s = state[i]
    local rpm = limits[2 * i - 1]
    local rpd = limits[2 * i]
    if s.n >= rpm then
      if denied_index == 0 then
        denied_index, denied_window = i, 1
      end
      retry_ms = math.max(retry_ms, room_ms(keys[i], s, rpm, now_s, now_ms))
    end
    if dn[i] >= rpd then
      if denied_index == 0 then
        denied_index, denied_window = i, 2
      end
      retry_ms = math.max(retry_ms, day_end - now_ms)
    end
  end
  return denied_index, denied_window, retry_ms
end

-- What an answer for `times` identical decisions in a row starts with (see the header).
local function repeated(times)
  if times > 1 then
    return string.format('*%d,', times)
  end
  return ''
end

-- One decision's answer, or `times` identical ones in a row; `less` is taken off every
-- used count (the first of `times` admissions is reported).
local function answer(times, status, now_ms, retry_ms, denied_index, denied_window, state, dn, less)
  -- '%d', not tostring: Lua's default number format (%.14g) costs several times more.
  local parts = { repeated(times) ..
    string.format('%d,%d,%d,%d,%d', status, now_ms, retry_ms, denied_index, denied_window) }
  for i = 1, #state do
    local s = state[i]
    local reset = 60000
    if s.n > 0 then
      reset = expiry_ms(s.o, now_ms)
    end
    parts[i + 1] = string.format('%d,%d,%d', s.n - less, reset, dn[i] - less)
  end
  return table.concat(parts, ',')
end

-- One decision made `times` times in a row: `keys` its hashes, `limits` rpm/rpd pairs per
-- key. Returns its answer.
local function decide_one(keys, limits, offset, day_id, day_start, day_end, times, optional)
  local count = #keys
  local now_ms = base_ms + offset
  -- Time never goes back for counters that have seen a later second (a server clock
  -- stepped back must not reopen a window).
  local now_s = math.floor(now_ms / 1000)
  local state = {}
  for i = 1, count do
    local s = load(keys[i])
    state[i] = s
    if s.e and s.e + BUCKETS > now_s then
      now_s = s.e + BUCKETS
      now_ms = now_s * 1000
    end
  end

  if now_ms < day_start or now_ms >= day_end then
    return repeated(times) .. string.format('%d,%d', -1, now_ms)
  end

  -- The window is the current second and the 60 before it: buckets up to `target` left it.
  local target = now_s - BUCKETS
  for i = 1, count do
    local s = state[i]
    if s.e and s.e < target then
      flush(keys[i], s)
      if s.n > 0 then
        local o = s.o or (s.e + 1)
        if o <= target then
          local dead = range(o, math.min(target, s.e + BUCKETS))
          local values = redis.call('HMGET', keys[i], unpack(dead))
          local gone = 0
          for j = 1, #values do
            gone = gone + (tonumber(values[j]) or 0)
          end
          redis.call('HDEL', keys[i], unpack(dead))
          s.n = math.max(s.n - gone, 0)
          if s.n > 0 then
            s.o = oldest_in(keys[i], target + 1, s.e + BUCKETS)
            if not s.o then
              s.n = 0
            end
          end
        end
      end
      -- Evictions made by a refusal or a usage read are kept, so the next call starts there.
      s.e = target
      s.dirty = true
    end
  end

  local dn = {}
  for i = 1, count do
    local s = state[i]
    dn[i] = s.dn
    if s.d ~= day_id then
      dn[i] = 0
    end
  end
  local denied_index, denied_window, retry_ms = refusal(keys, state, dn, limits, now_s, now_ms, day_end)
  if op ~= 'decide' then
    return answer(times, 2, now_ms, retry_ms, denied_index, denied_window, state, dn, 0)
  end
  if denied_index ~= 0 then
    return answer(times, 0, now_ms, retry_ms, denied_index, denied_window, state, dn, 0)
  end

  -- As many of the identical decisions as every window has room for are admitted (at
  -- least one: none refused), the rest refused by the state those admissions leave. The
  -- optional ones (a slice) only get room the others left, and a share of it.
  local room = math.huge
  for i = 1, count do
    room = math.min(room, limits[2 * i - 1] - state[i].n, limits[2 * i] - dn[i])
  end
  local required = times - optional
  local admitted = math.min(required, room)
  if room > required then
    admitted = admitted + math.min(optional, math.floor((room - required) / SLICE_SHARE))
  end
  local second = tostring(now_s)
  -- The hash must outlive the day counter (until the day ends) and the newest bucket.
  local ttl = math.max(day_end - now_ms, BUCKETS * 1000) + 60000
  for i = 1, count do
    local s = state[i]
    s.pending = s.pending or {}
    s.pending[second] = (s.pending[second] or 0) + admitted
    if s.n == 0 then
      s.o = now_s
    end
    s.n = s.n + admitted
    dn[i] = dn[i] + admitted
    s.dn = dn[i]
    s.d = day_id
    s.e = target
    s.dirty = true
    s.ttl = ttl
  end
  local yes = answer(admitted, 1, now_ms, 0, 0, 0, state, dn, admitted - 1)
  if admitted == times then
    return yes
  end
  denied_index, denied_window, retry_ms = refusal(keys, state, dn, limits, now_s, now_ms, day_end)
  return yes .. ';' .. answer(times - admitted, 0, now_ms, retry_ms, denied_index, denied_window, state, dn, 0)
end

local answers = {}
local at = 3
for _ = 1, decisions do
  local offset = tonumber(ARGV[at])
  local day_id = ARGV[at + 1]
  local day_start = tonumber(ARGV[at + 2])
  local day_end = tonumber(ARGV[at + 3])
  local times = tonumber(ARGV[at + 4])
  local optional = tonumber(ARGV[at + 5])
  local count = tonumber(ARGV[at + 6])
  at = at + 7
  local keys, limits = {}, {}
  for i = 1, count do
    keys[i] = KEYS[tonumber(ARGV[at])]
    limits[2 * i - 1] = tonumber(ARGV[at + 1])
    limits[2 * i] = tonumber(ARGV[at + 2])
    at = at + 3
  end
  answers[#answers + 1] = decide_one(keys, limits, offset, day_id, day_start, day_end, times, optional)
end

for key, s in pairs(cache) do
  flush(key, s)
  if s.dirty then
    if s.ttl then
      redis.call('HSET', key, 'e', tostring(s.e), 'n', tostring(s.n), 'o', tostring(s.o),
        'd', s.d, 'dn', tostring(s.dn))
      redis.call('PEXPIRE', key, s.ttl)
    else
      redis.call('HSET', key, 'e', tostring(s.e), 'n', tostring(s.n), 'o', tostring(s.o or s.e))
    end
  end
end
return table.concat(answers, ';')
