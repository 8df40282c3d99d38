-- Troupe's Redis dispatch script. Our own code; its effects match Python Dramatiq's
-- dispatch.lua so both can share queues:
--   ns:<q>            LIST of redis message ids (rids), FIFO (RPUSH tail, LPOP head)
--   ns:<q>.msgs       HASH rid -> message body (queued and in flight)
--   ns:<q>.XQ         ZSET rid -> dead-letter time (ms); ns:<q>.XQ.msgs its HASH
--   ns:__acks__.<worker>.<q>  SET of rids fetched by <worker> and not yet acked
--   ns:__heartbeats__ ZSET worker -> last heartbeat (ms)
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

if command == "enqueue" then
  -- ARGV[5..]: rid, body pairs
  for i = 5, #ARGV, 2 do
    redis.call("HSET", msgs_key, ARGV[i], ARGV[i + 1])
    redis.call("RPUSH", queue_key, ARGV[i])
  end
  redis.call("PUBLISH", ns .. ":__troupe_wake__:" .. queue, "1")
  return (#ARGV - 4) / 2

elseif command == "fetch" then
  -- ARGV[5]: how many. Returns rid, body pairs (body false when missing).
  heartbeat()
  local n = tonumber(ARGV[5])
  local out = {}
  -- LPOP with a count (Redis >= 6.2) takes the batch in one command; older servers refuse it
  -- and get one LPOP per message.
  local rids = redis.pcall("LPOP", queue_key, n)
  if type(rids) == "table" and rids.err then
    rids = {}
    for _ = 1, n do
      local rid = redis.call("LPOP", queue_key)
      if not rid then
        break
      end
      rids[#rids + 1] = rid
    end
  elseif not rids then
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
  -- the head of the queue, in their order.
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
      redis.call("LPUSH", queue_key, rid)
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
  -- Returns the messages of dead workers put back on this queue.
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
        redis.call("RPUSH", queue_key, rid)
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
  -- Ready and delayed messages and dead letters of the canonical queue.
  redis.call("DEL", ns .. ":" .. canonical, ns .. ":" .. canonical .. ".msgs",
    ns .. ":" .. canonical .. ".DQ", ns .. ":" .. canonical .. ".DQ.msgs", xq_key, xq_msgs_key)
  return 1
end

return redis.error_reply("troupe dispatch: unknown command " .. tostring(command))
