-- Troupe's Redis dispatch script. Our own code; its effects match Python Dramatiq's
-- dispatch.lua so both can share queues:
--   ns:<q>            LIST of redis message ids (rids), FIFO (RPUSH tail, LPOP head)
--   ns:<q>.msgs       HASH rid -> message body (queued and in flight)
--   ns:<q>.XQ         ZSET rid -> dead-letter time (ms); ns:<q>.XQ.msgs its HASH
--   ns:__acks__.<worker>.<q>  SET of rids fetched by <worker> and not yet acked
--   ns:__heartbeats__ ZSET worker -> last heartbeat (ms)
-- Troupe's priority lanes (Python Dramatiq neither reads nor writes them):
--   ns:<q>.P<p>       LIST of the rids of messages with priority p (p in -10..10, not 0), FIFO
--   ns:<q>.lanes      ZSET of the priorities whose lane may be non-empty (member = score = p)
-- A message at priority p != 0 has a rid "P<p>:<uuid>" (the lane travels with the rid, so a
-- requeued or recovered message goes back to its own lane); its body is in ns:<q>.msgs as
-- usual. Fetch drains the negative lanes (most negative first), then ns:<q>, then the
-- positive lanes. Priority 0 is Dramatiq's exact layout.
-- KEYS[1] = namespace. ARGV: command, now (ms), queue, worker id, then the command's arguments.
local ns = KEYS[1]
local command = ARGV[1]
local now = tonumber(ARGV[2])
local queue = ARGV[3]
local worker = ARGV[4]

local canonical = queue
if string.sub(queue, -3) == ".DQ" then
  canonical = string.sub(queue, 1, -4)
end
local queue_key = ns .. ":" .. queue
local msgs_key = queue_key .. ".msgs"
local xq_key = ns .. ":" .. canonical .. ".XQ"
local xq_msgs_key = xq_key .. ".msgs"
local acks_key = ns .. ":__acks__." .. worker .. "." .. queue
local heartbeats_key = ns .. ":__heartbeats__"

local function heartbeat()
  redis.call("ZADD", heartbeats_key, now, worker)
end

-- Lane helpers, made only for the commands that use them: the script body runs on every call,
-- and ack, nack and heartbeat should not pay for closures they never call.
local lanes_key, push, pop, lists_of
if command == "enqueue" or command == "requeue" or command == "maintenance" then
  lanes_key = queue_key .. ".lanes"
  -- Puts a rid on its list, at the head (requeue) or the tail (enqueue, recovery): the lane
  -- its "P<p>:" prefix names, else the plain list.
  push = function(rid, head)
    local p = string.byte(rid) == 80 and tonumber(string.match(rid, "^P(%-?%d+):"))
    if p and p ~= 0 then
      p = tostring(p)
      redis.call(head and "LPUSH" or "RPUSH", queue_key .. ".P" .. p, rid)
      redis.call("ZADD", lanes_key, p, p)
    else
      redis.call(head and "LPUSH" or "RPUSH", queue_key, rid)
    end
  end
elseif command == "fetch" then
  lanes_key = queue_key .. ".lanes"
  -- Pops up to n rids from the head of a list. LPOP with a count (Redis >= 6.2) takes them in
  -- one command; older servers refuse it and get one LPOP per rid.
  pop = function(key, n)
    local rids = redis.pcall("LPOP", key, n)
    if type(rids) == "table" and rids.err then
      rids = {}
      for _ = 1, n do
        local rid = redis.call("LPOP", key)
        if not rid then
          break
        end
        rids[#rids + 1] = rid
      end
    elseif not rids then
      rids = {}
    end
    return rids
  end
elseif command == "purge" or command == "stats" then
  -- The lists of a queue key: its plain list, then its lanes.
  lists_of = function(key)
    local keys = {key}
    for _, p in ipairs(redis.call("ZRANGE", key .. ".lanes", 0, -1)) do
      keys[#keys + 1] = key .. ".P" .. p
    end
    return keys
  end
end

if command == "enqueue" then
  -- ARGV[5..]: rid, body pairs
  for i = 5, #ARGV, 2 do
    local rid = ARGV[i]
    redis.call("HSET", msgs_key, rid, ARGV[i + 1])
    if string.byte(rid) == 80 then
      push(rid, false)
    else
      redis.call("RPUSH", queue_key, rid)
    end
  end
  redis.call("PUBLISH", ns .. ":__troupe_wake__:" .. queue, "1")
  return (#ARGV - 4) / 2

elseif command == "fetch" then
  -- ARGV[5]: how many. Returns rid, body pairs (body false when missing).
  heartbeat()
  local n = tonumber(ARGV[5])
  local out = {}
  local lanes = redis.call("ZRANGE", lanes_key, 0, -1)
  local rids
  if #lanes == 0 then
    -- No prioritized message: Dramatiq's plain list alone.
    rids = pop(queue_key, n)
  else
    rids = {}
    -- Takes what it can from one list; a lane found empty leaves the lanes set.
    local function take(key, p)
      local want = n - #rids
      local got = pop(key, want)
      for _, rid in ipairs(got) do
        rids[#rids + 1] = rid
      end
      if p and #got < want then
        redis.call("ZREM", lanes_key, p)
      end
    end
    local plain_done = false
    for _, p in ipairs(lanes) do
      if #rids >= n then
        break
      end
      if not plain_done and tonumber(p) > 0 then
        take(queue_key, nil)
        plain_done = true
        if #rids >= n then
          break
        end
      end
      take(queue_key .. ".P" .. p, p)
    end
    if not plain_done and #rids < n then
      take(queue_key, nil)
    end
  end
  if #rids == 0 then
    return out
  end
  -- Variadic SADD and HMGET in chunks (unpack is limited by Lua's stack).
  for first = 1, #rids, 1000 do
    local last = math.min(first + 999, #rids)
    redis.call("SADD", acks_key, unpack(rids, first, last))
    local bodies = redis.call("HMGET", msgs_key, unpack(rids, first, last))
    for i = first, last do
      out[#out + 1] = rids[i]
      out[#out + 1] = bodies[i - first + 1]
    end
  end
  return out

elseif command == "ack" then
  -- ARGV[5..]: rids
  heartbeat()
  local done = 0
  for i = 5, #ARGV do
    if redis.call("SREM", acks_key, ARGV[i]) == 1 then
      redis.call("HDEL", msgs_key, ARGV[i])
      done = done + 1
    end
  end
  return done

elseif command == "nack" then
  -- ARGV[5..]: rid, body pairs; an empty body keeps the stored one
  heartbeat()
  local done = 0
  for i = 5, #ARGV, 2 do
    local rid = ARGV[i]
    if redis.call("SREM", acks_key, rid) == 1 then
      local body = ARGV[i + 1]
      if body == "" then
        body = redis.call("HGET", msgs_key, rid)
      end
      if body then
        redis.call("ZADD", xq_key, now, rid)
        redis.call("HSET", xq_msgs_key, rid, body)
      end
      redis.call("HDEL", msgs_key, rid)
      done = done + 1
    end
  end
  return done

elseif command == "requeue" then
  -- ARGV[5..]: rids, or none for every rid this worker holds on the queue. They go back to
  -- the head of their list (the plain queue or their lane), in their order.
  heartbeat()
  local rids = {}
  if #ARGV < 5 then
    rids = redis.call("SMEMBERS", acks_key)
  else
    for i = 5, #ARGV do
      rids[#rids + 1] = ARGV[i]
    end
  end
  local back = 0
  for i = #rids, 1, -1 do
    local rid = rids[i]
    if redis.call("SREM", acks_key, rid) == 1 and redis.call("HEXISTS", msgs_key, rid) == 1 then
      push(rid, true)
      back = back + 1
    end
  end
  if back > 0 then
    redis.call("PUBLISH", ns .. ":__troupe_wake__:" .. queue, "1")
  end
  return back

elseif command == "heartbeat" then
  heartbeat()
  return 1

elseif command == "forget" then
  -- A consumer closed cleanly: drop its heartbeat (its ack sets are empty).
  redis.call("ZREM", heartbeats_key, worker)
  return 1

elseif command == "maintenance" then
  -- ARGV[5] heartbeat timeout (ms), ARGV[6] dead-letter TTL (ms), ARGV[7] chunk size.
  -- Returns the messages of dead workers put back on this queue (each on its own lane).
  local timeout = tonumber(ARGV[5])
  local ttl = tonumber(ARGV[6])
  local chunk = tonumber(ARGV[7])
  local back = 0
  local dead = redis.call("ZRANGEBYSCORE", heartbeats_key, 0, now - timeout)
  for _, dead_worker in ipairs(dead) do
    local dead_acks = ns .. ":__acks__." .. dead_worker .. "." .. queue
    local rids = redis.call("SMEMBERS", dead_acks)
    for _, rid in ipairs(rids) do
      if redis.call("HEXISTS", msgs_key, rid) == 1 then
        push(rid, false)
        back = back + 1
      end
    end
    redis.call("DEL", dead_acks)
    if next(redis.call("KEYS", ns .. ":__acks__." .. dead_worker .. ".*")) == nil then
      redis.call("ZREM", heartbeats_key, dead_worker)
    end
  end
  if back > 0 then
    redis.call("PUBLISH", ns .. ":__troupe_wake__:" .. queue, "1")
  end
  while true do
    local old = redis.call("ZRANGEBYSCORE", xq_key, 0, now - ttl, "LIMIT", 0, chunk)
    if #old == 0 then
      break
    end
    redis.call("ZREM", xq_key, unpack(old))
    redis.call("HDEL", xq_msgs_key, unpack(old))
    if #old < chunk then
      break
    end
  end
  return back

elseif command == "purge" then
  -- Ready and delayed messages (lanes included) and dead letters of the canonical queue.
  local canonical_key = ns .. ":" .. canonical
  local keys = {canonical_key .. ".msgs", canonical_key .. ".DQ.msgs", xq_key, xq_msgs_key}
  for _, base in ipairs({canonical_key, canonical_key .. ".DQ"}) do
    for _, key in ipairs(lists_of(base)) do
      keys[#keys + 1] = key
    end
    keys[#keys + 1] = base .. ".lanes"
  end
  redis.call("DEL", unpack(keys))
  return 1

elseif command == "stats" then
  -- The canonical queue's counts: ready (its list and lanes), queued (ready and in flight),
  -- delayed (ready and in flight on its delay queue) and dead.
  local ready = 0
  for _, key in ipairs(lists_of(queue_key)) do
    ready = ready + redis.call("LLEN", key)
  end
  return {ready, redis.call("HLEN", msgs_key), redis.call("HLEN", queue_key .. ".DQ.msgs"),
    redis.call("ZCARD", xq_key)}
end

return redis.error_reply("troupe dispatch: unknown command " .. tostring(command))
