//! The task store of [`RedisState`] (design §4b): task records, their indexes and counts,
//! cancellation requests compatible with Python's dramatiq-abort, and unique keys.
//!
//! # Keys (`ns` is the namespace, `P` is `ns:troupe:tasks`)
//!
//! - `ns:troupe:task:{id}`: a hash holding every field of the record (absent fields are
//!   `None`; `progress` and `args` as JSON text), its `version` and `expires_at` (ms). It also
//!   gets a `PEXPIRE` of the retention plus an hour, a safety net when `expire_tasks` does not run.
//! - Sorted sets of message ids scored by `enqueued_at`: `P` (all), `P:s:{status}`,
//!   `P:a:{actor}`, `P:q:{queue}`, `P:sa:{status}:{actor}`, `P:sq:{status}:{queue}`.
//! - Counts: hashes `P:counts` (fields `s:{status}`, `a:{actor}`, `q:{queue}`),
//!   `P:counts:a:{actor}` (`s:…`, `q:…`) and `P:counts:q:{queue}` (`s:…`, `a:…`).
//! - `P:expiry`: a sorted set of ids scored by `expires_at`, what `expire_tasks` walks.
//! - `ns:troupe:unique:{key}`: the id of the message holding a unique key, with a TTL.
//! - `ns:troupe:cancel:{id}`: Troupe's cancellation marker (`pending` or `abort`), read without
//!   being consumed, so a redelivered or retried message is skipped too.
//! - dramatiq-abort's lists `{abort_namespace}cancel:{id}` (element `{}`) and, in mode abort,
//!   `{abort_namespace}abort:{id}` (element `{"abort_timeout": 0}`), pushed with every request
//!   so Python workers with `Abortable` skip or abort the message; Troupe reads them to see the
//!   requests Python makes (`cancel_requested` pops the cancel list as Python's `poll` does,
//!   `wait_cancels` blocks on the abort lists as its watcher does) and keeps what it saw as a
//!   marker.
//!
//! Every change of a record is one Lua script, so a record, its indexes and its counts always
//! agree; a request is one MULTI/EXEC. Times are the client's clock (`now_ms`), passed to the
//! scripts: record times come from the update, and a record expires `retention` after the
//! client's now. `task` and `tasks` treat a record past its `expires_at` as absent; counts
//! include it until `expire_tasks` removes it. When the safety-net TTL removes a hash first,
//! `expire_tasks` can no longer tell its actor and queue: it cleans the global and status
//! indexes, pages drop the other index entries they meet, and the counts keep the record.
//!
//! Needs Redis 6 or later (`BLPOP` with a fractional timeout, `SET … KEEPTTL`). Scripts derive
//! some index and count keys from stored fields: right on one node, not on Redis Cluster.

use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::Duration;

use async_trait::async_trait;
use redis::ScriptInvocation;
use serde_json::Value;
use troupe_core::{
    CancelMode, Error, ErrorKind, Result, TaskCounts, TaskCursor, TaskFilter, TaskPage, TaskQuery, TaskRecord,
    TaskStatus, TaskStore, TaskUpdate,
};

use crate::conn::{BACKEND, ms, now, redis_error};
use crate::state::RedisState;

/// What dramatiq-abort pushes to a message's cancel list (`json.dumps({})`).
const ABORT_CANCEL_EVENT: &str = "{}";
/// What dramatiq-abort pushes to a message's abort list (`json.dumps({"abort_timeout": 0})`).
const ABORT_ABORT_EVENT: &str = "{\"abort_timeout\": 0}";
/// dramatiq-abort's default `abort_ttl`: how long a marker made from a Python request lives
/// when its list has no TTL left to copy.
const DEFAULT_ABORT_TTL_MS: u64 = 90_000;
/// How much longer than its retention a record's hash lives (the safety net).
const SAFETY_NET_MS: u64 = 3_600_000;
/// The longest retention kept (100 years), so expiry times stay exact and valid for Redis.
const MAX_RETENTION_MS: u64 = 100 * 365 * 24 * 3_600_000;
/// Index members a page script reads at most; a page that is not full by then ends early,
/// with a `next` cursor, so a very selective filter never blocks Redis for long.
const SCAN_BUDGET: usize = 10_000;

/// Helpers shared by the scripts that change indexes and counts. `ARGV[1]` is always `P`.
///
/// Index and count keys named after a stored record's status, actor and queue are derived
/// here from `P`: fine on one Redis node. Redis Cluster would need every key of a script in
/// one hash slot (hash tags), a later issue.
const PRELUDE: &str = r"
local P = ARGV[1]
local function keyset(st, ac, qu)
  return {P, P .. ':s:' .. st, P .. ':a:' .. ac, P .. ':q:' .. qu, P .. ':sa:' .. st .. ':' .. ac,
    P .. ':sq:' .. st .. ':' .. qu, P .. ':counts', P .. ':counts:a:' .. ac, P .. ':counts:q:' .. qu}
end
-- Counts per actor and per queue (status counts are the sizes of the status-keyed sets).
local function count(k, st, ac, qu, by)
  local fields = {{7, 'a:' .. ac}, {7, 'q:' .. qu}, {8, 'q:' .. qu}, {9, 'a:' .. ac}}
  for _, f in ipairs(fields) do
    if redis.call('HINCRBY', k[f[1]], f[2], by) <= 0 then redis.call('HDEL', k[f[1]], f[2]) end
  end
end
local function index(k, id, score, st, ac, qu)
  for i = 1, 6 do redis.call('ZADD', k[i], score, id) end
  count(k, st, ac, qu, 1)
end
local function restatus(id, score, from, to, ac, qu)
  for _, k in ipairs({{P .. ':s:', ''}, {P .. ':sa:', ':' .. ac}, {P .. ':sq:', ':' .. qu}}) do
    redis.call('ZREM', k[1] .. from .. k[2], id)
    redis.call('ZADD', k[1] .. to .. k[2], score, id)
  end
end
local function unindex(id, st, ac, qu)
  local k = keyset(st, ac or '', qu or '')
  for i = 1, 6 do redis.call('ZREM', k[i], id) end
  count(k, st, ac or '', qu or '', -1)
end
";

/// Applies an update (see [`RedisState::record_invocation`] for the arguments). Returns 1 when
/// applied, 0 when refused.
const RECORD: &str = r"
local h = KEYS[1]
local now = tonumber(ARGV[2])
local id, ac, qu, st, at = ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[8]
local old = redis.call('HMGET', h, 'version', 'status', 'expires_at', 'actor', 'queue', 'enqueued_at')
local live = old[2] and tonumber(old[3] or '0') > now
local score = at
if live then
  if old[2] == ARGV[19] or tonumber(ARGV[7]) < tonumber(old[1] or '0') then return 0 end
  ac, qu, score = old[4] or ac, old[5] or qu, old[6] or at
  -- Only the status-keyed index sets and counts change with the status.
  if old[2] ~= st then restatus(id, score, old[2], st, ac, qu) end
else
  if old[2] then unindex(id, old[2], old[4], old[5]) end
  redis.call('DEL', h)
  local k
  if ac == ARGV[4] and qu == ARGV[5] then k = {unpack(KEYS, 3, 11)} else k = keyset(st, ac, qu) end
  index(k, id, score, st, ac, qu)
end
local fields = {'status', st, 'updated_at', at, 'attempts', ARGV[10], 'version', ARGV[7], 'expires_at', ARGV[15]}
if not live then
  for _, f in ipairs({'message_id', id, 'actor', ac, 'queue', qu, 'enqueued_at', at}) do fields[#fields + 1] = f end
end
if ARGV[9] ~= '' then fields[#fields + 1] = 'eta'; fields[#fields + 1] = ARGV[9] end
if ARGV[17] ~= '' then fields[#fields + 1] = 'started_at'; fields[#fields + 1] = ARGV[17] end
if ARGV[18] == '1' then fields[#fields + 1] = 'finished_at'; fields[#fields + 1] = at end
if ARGV[12] ~= '' then
  fields[#fields + 1] = 'error'; fields[#fields + 1] = string.sub(ARGV[12], 2)
  if ARGV[11] ~= '' then
    fields[#fields + 1] = 'error_type'; fields[#fields + 1] = string.sub(ARGV[11], 2)
  else
    redis.call('HDEL', h, 'error_type')
  end
end
if ARGV[13] ~= '' then fields[#fields + 1] = 'worker'; fields[#fields + 1] = string.sub(ARGV[13], 2) end
if ARGV[14] ~= '' then fields[#fields + 1] = 'args'; fields[#fields + 1] = string.sub(ARGV[14], 2) end
redis.call('HSET', h, unpack(fields))
if ARGV[9] == '' and live then redis.call('HDEL', h, 'eta') end
-- A live record keeps its place in the expiry set: the expiry pass finds it later than its
-- score and moves it on (one write fewer per update).
if not live then redis.call('ZADD', KEYS[2], ARGV[15], id) end
redis.call('PEXPIRE', h, ARGV[16])
return 1
";

/// KEYS: record, expiry. ARGV: P, now, id, expires_at, pexpire, cancelled, pending statuses….
/// Returns the previous status of a live record (cancelling it when pending), or nil.
const MARK_CANCELLED: &str = r"
local h = KEYS[1]
local now = ARGV[2]
local f = redis.call('HMGET', h, 'status', 'actor', 'queue', 'expires_at', 'enqueued_at')
if not f[1] or tonumber(f[4] or '0') <= tonumber(now) then return false end
local pending = false
for i = 7, #ARGV do if ARGV[i] == f[1] then pending = true end end
if pending then
  local ac, qu = f[2] or '', f[3] or ''
  unindex(ARGV[3], f[1], ac, qu)
  index(keyset(ARGV[6], ac, qu), ARGV[3], f[5] or now, ARGV[6], ac, qu)
  redis.call('HSET', h, 'status', ARGV[6], 'finished_at', now, 'updated_at', now, 'expires_at', ARGV[4])
  redis.call('HDEL', h, 'eta')
  redis.call('ZADD', KEYS[2], ARGV[4], ARGV[3])
  redis.call('PEXPIRE', h, ARGV[5])
end
return f[1]
";

/// KEYS: record, expiry. ARGV: P, now, id. Returns 1 when a live record was deleted.
const DELETE: &str = r"
local f = redis.call('HMGET', KEYS[1], 'status', 'actor', 'queue', 'expires_at')
redis.call('ZREM', KEYS[2], ARGV[3])
if not f[1] then return 0 end
unindex(ARGV[3], f[1], f[2], f[3])
redis.call('DEL', KEYS[1])
if tonumber(f[4] or '0') > tonumber(ARGV[2]) then return 1 end
return 0
";

/// KEYS: expiry. ARGV: P, now, limit, record prefix, every status…. Returns how many records
/// past their retention it deleted.
const EXPIRE: &str = r"
local now = tonumber(ARGV[2])
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[2], 'LIMIT', 0, ARGV[3])
local n = 0
for _, id in ipairs(ids) do
  local h = ARGV[4] .. id
  local f = redis.call('HMGET', h, 'status', 'actor', 'queue', 'expires_at')
  if f[1] and tonumber(f[4] or '0') > now then
    redis.call('ZADD', KEYS[1], f[4], id)
  else
    if f[1] then
      unindex(id, f[1], f[2], f[3])
      redis.call('DEL', h)
    else
      -- The safety-net TTL removed the hash first: its actor and queue are unknown, so only
      -- the global and status indexes are cleaned here (pages drop the other ids they meet).
      redis.call('ZREM', P, id)
      for i = 5, #ARGV do redis.call('ZREM', P .. ':s:' .. ARGV[i], id) end
    end
    redis.call('ZREM', KEYS[1], id)
    n = n + 1
  end
end
return n
";

/// KEYS: record, expiry. ARGV: now, progress JSON, expires_at, pexpire, id.
const SET_PROGRESS: &str = r"
local e = redis.call('HGET', KEYS[1], 'expires_at')
if not e or tonumber(e) <= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'progress', ARGV[2], 'updated_at', ARGV[1], 'expires_at', ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[5])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
";

/// A page, newest first. KEYS: the index sets that may serve the filter (the smallest is
/// walked). ARGV: record prefix, now, limit, max score, min score, cursor score (or ''),
/// cursor id, status (or ''), '=' .. actor (or ''), '=' .. queue (or ''), scan budget, chunk.
/// Returns {records as HGETALL arrays, {score, id} of the last member read when the budget ran
/// out before the page was full, else {}}.
const PAGE: &str = r"
local key, best = KEYS[1], redis.call('ZCARD', KEYS[1])
for i = 2, #KEYS do
  local n = redis.call('ZCARD', KEYS[i])
  if n < best then key, best = KEYS[i], n end
end
local prefix, now, limit = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local cscore, cid = nil, ARGV[7]
if ARGV[6] ~= '' then cscore = tonumber(ARGV[6]) end
local st, ac, qu = ARGV[8], ARGV[9], ARGV[10]
local budget, chunk = tonumber(ARGV[11]), tonumber(ARGV[12])
-- a < b byte by byte, as Redis orders equal scores (Lua's < follows the locale).
local function before(a, b)
  for i = 1, math.min(#a, #b) do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x < y end
  end
  return #a < #b
end
local page, gone, last = {}, {}, {}
local offset, scanned = 0, 0
while #page < limit and scanned < budget do
  local batch = redis.call('ZREVRANGEBYSCORE', key, ARGV[4], ARGV[5], 'WITHSCORES', 'LIMIT', offset, chunk)
  if #batch == 0 then break end
  for i = 1, #batch, 2 do
    local id, score = batch[i], batch[i + 1]
    offset = offset + 1
    scanned = scanned + 1
    last = {score, id}
    if not (cscore and tonumber(score) == cscore and not before(id, cid)) then
      local h = prefix .. id
      local f = redis.call('HMGET', h, 'status', 'actor', 'queue', 'expires_at')
      if not f[1] then
        gone[#gone + 1] = id
      elseif tonumber(f[4] or '0') > now and (st == '' or f[1] == st)
          and (ac == '' or ac == '=' .. (f[2] or '')) and (qu == '' or qu == '=' .. (f[3] or '')) then
        page[#page + 1] = redis.call('HGETALL', h)
      end
    end
    if #page >= limit or scanned >= budget then break end
  end
  if #batch < 2 * chunk then break end
end
-- Ids whose hash is gone (the safety-net TTL fired before expire_tasks ran) leave this index.
for _, id in ipairs(gone) do redis.call('ZREM', key, id) end
if #page >= limit or scanned < budget then last = {} end
return {page, last}
";

/// Counts of one actor's tasks in one queue, by walking the actor's index. KEYS: `P:a:{actor}`.
/// ARGV: record prefix, now, queue. Returns {status, count, ...}.
const COUNT_ACTOR_QUEUE: &str = r"
local now = tonumber(ARGV[2])
local counts, out, start = {}, {}, 0
while true do
  local ids = redis.call('ZRANGE', KEYS[1], start, start + 999)
  if #ids == 0 then break end
  start = start + #ids
  for _, id in ipairs(ids) do
    local f = redis.call('HMGET', ARGV[1] .. id, 'status', 'queue', 'expires_at')
    if f[1] and f[2] == ARGV[3] and tonumber(f[3] or '0') > now then
      counts[f[1]] = (counts[f[1]] or 0) + 1
    end
  end
end
for s, n in pairs(counts) do
  out[#out + 1] = s
  out[#out + 1] = tostring(n)
end
return out
";

/// KEYS: the unique key. ARGV: message id, ttl ms. Returns the other holder, or nil when taken.
const CLAIM_UNIQUE: &str = r"
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return holder end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return false
";

/// KEYS: the unique key. ARGV: message id. Deletes the key when the id holds it.
const RELEASE_UNIQUE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
";

/// KEYS: Troupe's marker, dramatiq-abort's cancel list, its abort list. ARGV: default TTL ms,
/// `pending`, `abort`. Returns the marker's mode; else takes a request Python made (as its
/// `poll` does: `LPOP`, a JSON object counts) and keeps it as a marker for later deliveries.
const CANCEL_REQUESTED: &str = r"
local mode = redis.call('GET', KEYS[1])
if mode then return mode end
local ttl = redis.call('PTTL', KEYS[2])
local event = redis.call('LPOP', KEYS[2])
if not event then return false end
if not string.find(event, '^%s*{') or not pcall(cjson.decode, event) then return false end
mode = ARGV[2]
if redis.call('LLEN', KEYS[3]) > 0 then mode = ARGV[3] end
if ttl <= 0 then ttl = tonumber(ARGV[1]) end
redis.call('SET', KEYS[1], mode, 'PX', ttl)
return mode
";

/// KEYS: Troupe's marker, dramatiq-abort's cancel list. ARGV: `abort`, default TTL ms. Keeps
/// an abort popped from dramatiq-abort's abort list as a marker.
const ABORT_SEEN: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('SET', KEYS[1], ARGV[1], 'KEEPTTL')
else
  local ttl = redis.call('PTTL', KEYS[2])
  if ttl <= 0 then ttl = tonumber(ARGV[2]) end
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ttl)
end
return 1
";

macro_rules! script {
    ($name:ident, $($part:expr),+) => {
        fn $name() -> &'static redis::Script {
            static SCRIPT: OnceLock<redis::Script> = OnceLock::new();
            SCRIPT.get_or_init(|| redis::Script::new(&[$($part),+].concat()))
        }
    };
}

script!(record_script, PRELUDE, RECORD);
script!(mark_script, PRELUDE, MARK_CANCELLED);
script!(delete_script, PRELUDE, DELETE);
script!(expire_script, PRELUDE, EXPIRE);
script!(progress_script, SET_PROGRESS);
script!(page_script, PAGE);
script!(count_script, COUNT_ACTOR_QUEUE);
script!(claim_script, CLAIM_UNIQUE);
script!(release_script, RELEASE_UNIQUE);
script!(cancel_requested_script, CANCEL_REQUESTED);
script!(abort_seen_script, ABORT_SEEN);

/// The names of the task store's keys.
struct Names<'a> {
    ns: &'a str,
    abort: &'a str,
}

impl Names<'_> {
    /// `P`, the prefix of the indexes and counts.
    fn tasks(&self) -> String {
        format!("{}:troupe:tasks", self.ns)
    }

    fn record_prefix(&self) -> String {
        format!("{}:troupe:task:", self.ns)
    }

    fn record(&self, id: &str) -> String {
        format!("{}:troupe:task:{id}", self.ns)
    }

    fn expiry(&self) -> String {
        format!("{}:troupe:tasks:expiry", self.ns)
    }

    /// The index sets and count hashes of a record in `status` of `actor` in `queue`, in the
    /// order of the scripts' `keyset`: all, s, a, q, sa, sq, counts, counts:a, counts:q.
    fn keyset(&self, status: TaskStatus, actor: &str, queue: &str) -> [String; 9] {
        let p = self.tasks();
        [
            p.clone(),
            format!("{p}:s:{status}"),
            format!("{p}:a:{actor}"),
            format!("{p}:q:{queue}"),
            format!("{p}:sa:{status}:{actor}"),
            format!("{p}:sq:{status}:{queue}"),
            format!("{p}:counts"),
            format!("{p}:counts:a:{actor}"),
            format!("{p}:counts:q:{queue}"),
        ]
    }

    fn unique(&self, key: &str) -> String {
        format!("{}:troupe:unique:{key}", self.ns)
    }

    fn marker(&self, id: &str) -> String {
        format!("{}:troupe:cancel:{id}", self.ns)
    }

    /// dramatiq-abort's cancel list (`Abortable.id_to_key(id, AbortMode.CANCEL)`).
    fn abort_cancel(&self, id: &str) -> String {
        format!("{}cancel:{id}", self.abort)
    }

    fn abort_abort_prefix(&self) -> String {
        format!("{}abort:", self.abort)
    }

    /// dramatiq-abort's abort list (`Abortable.id_to_key(id, AbortMode.ABORT)`).
    fn abort_abort(&self, id: &str) -> String {
        format!("{}abort:{id}", self.abort)
    }
}

/// An optional text as a script argument: `""` for none, `"=" + text` otherwise.
fn opt(value: Option<&str>) -> String {
    value.map_or_else(String::new, |v| format!("={v}"))
}

fn json_text(value: &Value) -> Result<String> {
    serde_json::to_string(value).map_err(|e| Error::Encode(format!("task field: {e}")))
}

/// Retention in ms, bounded, and the record's expiry and safety-net TTL from `now`.
fn expiry_of(now: u64, retention: Duration) -> (u64, u64) {
    let keep = ms(retention).min(MAX_RETENTION_MS);
    (now.saturating_add(keep), keep.saturating_add(SAFETY_NET_MS).max(1))
}

fn ttl_ms(ttl: Duration) -> u64 {
    ms(ttl).clamp(1, MAX_RETENTION_MS)
}

fn mode_of(name: &str) -> CancelMode {
    if name == CancelMode::Pending.as_str() {
        CancelMode::Pending
    } else {
        // `abort`, or a marker this version does not know: stopping is the safe reading.
        CancelMode::Abort
    }
}

fn bad(id: &str, field: &str, value: &str) -> Error {
    Error::backend(
        BACKEND,
        ErrorKind::Protocol,
        format!("the task record of {id} in Redis has a bad `{field}`: {value:?}"),
    )
}

/// A record from its hash's fields (an `HGETALL` answer).
pub(crate) fn parse_record(fields: &HashMap<String, String>) -> Result<TaskRecord> {
    let text = |name: &str| fields.get(name).map(String::as_str);
    let id = text("message_id").unwrap_or_default();
    let number = |name: &str| -> Result<Option<u64>> {
        text(name)
            .map(|v| v.parse::<u64>().map_err(|_| bad(id, name, v)))
            .transpose()
    };
    let json = |name: &str| -> Result<Option<Value>> {
        text(name)
            .map(|v| serde_json::from_str(v).map_err(|_| bad(id, name, v)))
            .transpose()
    };
    let status = text("status").unwrap_or_default();
    let status: TaskStatus = status.parse().map_err(|_| bad(id, "status", status))?;
    let actor = text("actor").unwrap_or_default();
    let queue = text("queue").unwrap_or_default();
    let mut record = TaskUpdate::new(id, actor, queue, status, 0).to_record();
    record.enqueued_at = number("enqueued_at")?.unwrap_or_default();
    record.started_at = number("started_at")?;
    record.finished_at = number("finished_at")?;
    record.updated_at = number("updated_at")?.unwrap_or(record.enqueued_at);
    record.eta = number("eta")?;
    record.attempts = number("attempts")?.unwrap_or_default();
    record.error_type = text("error_type").map(str::to_owned);
    record.error = text("error").map(str::to_owned);
    record.worker = text("worker").map(str::to_owned);
    record.progress = json("progress")?;
    record.args = json("args")?;
    Ok(record)
}

/// A flat `HGETALL` array as a map.
fn pairs(flat: Vec<String>) -> HashMap<String, String> {
    let mut map = HashMap::with_capacity(flat.len() / 2);
    let mut items = flat.into_iter();
    while let (Some(k), Some(v)) = (items.next(), items.next()) {
        map.insert(k, v);
    }
    map
}

/// Whether a record's hash says it is past its retention at `now`.
fn expired(fields: &HashMap<String, String>, now: u64) -> bool {
    fields
        .get("expires_at")
        .and_then(|v| v.parse::<u64>().ok())
        .is_none_or(|at| at <= now)
}

fn score_of(text: &str) -> Option<u64> {
    text.parse::<u64>()
        .ok()
        .or_else(|| text.parse::<f64>().ok().filter(|f| *f >= 0.0).map(|f| f as u64))
}

fn is_json_object(bytes: &[u8]) -> bool {
    serde_json::from_slice::<Value>(bytes).is_ok_and(|v| v.is_object())
}

impl RedisState {
    fn names(&self) -> Names<'_> {
        Names {
            ns: &self.options.namespace,
            abort: &self.options.abort_namespace,
        }
    }

    async fn run<T: redis::FromRedisValue>(&self, invocation: &ScriptInvocation<'_>, what: &str) -> Result<T> {
        let mut conn = self.conn.clone();
        invocation
            .invoke_async(&mut conn)
            .await
            .map_err(|e| redis_error(what, e))
    }

    /// The record script's call for `update`. KEYS: record, expiry, then the 9 keys of the
    /// update's status, actor and queue. ARGV: P, now, id, actor, queue, status, version, at,
    /// eta (or ''), attempts, error_type, error, worker, args (each '' or '=' .. value),
    /// expires_at, pexpire, running ('1'/'0'), final ('1'/'0'), `cancelled`.
    /// The call of the cancellation-read script for `message_id`: Troupe's marker, else a
    /// cancel Python's dramatiq-abort pushed (popped, and kept as a marker).
    fn cancel_invocation(&self, message_id: &str) -> redis::ScriptInvocation<'static> {
        let names = self.names();
        let mut invocation = cancel_requested_script().prepare_invoke();
        invocation
            .key(names.marker(message_id))
            .key(names.abort_cancel(message_id))
            .key(names.abort_abort(message_id))
            .arg(DEFAULT_ABORT_TTL_MS)
            .arg(CancelMode::Pending.as_str())
            .arg(CancelMode::Abort.as_str());
        invocation
    }

    fn record_invocation(
        &self,
        update: &TaskUpdate,
        retention: Duration,
        now: u64,
    ) -> Result<ScriptInvocation<'static>> {
        let names = self.names();
        let (expires_at, pexpire) = expiry_of(now, retention);
        let args = update.args.as_ref().map(json_text).transpose()?;
        let mut invocation = record_script().prepare_invoke();
        invocation.key(names.record(&update.message_id)).key(names.expiry());
        for key in names.keyset(update.status, &update.actor, &update.queue) {
            invocation.key(key);
        }
        invocation
            .arg(names.tasks())
            .arg(now)
            .arg(update.message_id.as_str())
            .arg(update.actor.as_str())
            .arg(update.queue.as_str())
            .arg(update.status.as_str())
            .arg(update.version)
            .arg(update.at)
            .arg(update.eta.map(|e| e.to_string()).unwrap_or_default())
            .arg(update.attempts)
            .arg(opt(update.error_type.as_deref()))
            .arg(opt(update.error.as_deref()))
            .arg(opt(update.worker.as_deref()))
            .arg(opt(args.as_deref()))
            .arg(expires_at)
            .arg(pexpire)
            .arg(update.started().map(|t| t.to_string()).unwrap_or_default())
            .arg(if update.status.is_final() { "1" } else { "0" })
            .arg(TaskStatus::Cancelled.as_str());
        Ok(invocation)
    }

    /// The cancellation markers kept for `ids`.
    async fn markers(&self, ids: &[String]) -> Result<Vec<(String, CancelMode)>> {
        let names = self.names();
        let keys: Vec<String> = ids.iter().map(|id| names.marker(id)).collect();
        let mut conn = self.conn.clone();
        let modes: Vec<Option<String>> = redis::cmd("MGET")
            .arg(&keys)
            .query_async(&mut conn)
            .await
            .map_err(|e| redis_error("read cancellation requests", e))?;
        Ok(ids
            .iter()
            .zip(modes)
            .filter_map(|(id, mode)| mode.map(|m| (id.clone(), mode_of(&m))))
            .collect())
    }
}

#[async_trait]
impl TaskStore for RedisState {
    async fn record(&self, update: &TaskUpdate, retention: Duration) -> Result<bool> {
        let invocation = self.record_invocation(update, retention, now())?;
        let applied: i64 = self.run(&invocation, "record a task state").await?;
        Ok(applied == 1)
    }

    async fn record_many(&self, updates: &[TaskUpdate], retention: Duration) -> Result<Vec<bool>> {
        if updates.len() < 2 {
            let mut applied = Vec::with_capacity(updates.len());
            for update in updates {
                applied.push(self.record(update, retention).await?);
            }
            return Ok(applied);
        }
        let now = now();
        let invocations = updates
            .iter()
            .map(|u| self.record_invocation(u, retention, now))
            .collect::<Result<Vec<_>>>()?;
        let mut pipe = redis::pipe();
        for invocation in &invocations {
            pipe.invoke_script(invocation);
        }
        let mut conn = self.conn.clone();
        let mut result: redis::RedisResult<Vec<i64>> = pipe.query_async(&mut conn).await;
        if let Err(e) = &result
            && e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript)
        {
            // Every call failed alike (the script was not loaded): none applied, run them again.
            record_script()
                .load_async(&mut conn)
                .await
                .map_err(|e| redis_error("load the task script", e))?;
            result = pipe.query_async(&mut conn).await;
        }
        let applied = result.map_err(|e| redis_error("record task states", e))?;
        Ok(applied.into_iter().map(|a| a == 1).collect())
    }

    async fn set_progress(&self, message_id: &str, progress: &Value, retention: Duration) -> Result<bool> {
        let names = self.names();
        let now = now();
        let (expires_at, pexpire) = expiry_of(now, retention);
        let mut invocation = progress_script().prepare_invoke();
        invocation
            .key(names.record(message_id))
            .key(names.expiry())
            .arg(now)
            .arg(json_text(progress)?)
            .arg(expires_at)
            .arg(pexpire)
            .arg(message_id);
        let stored: i64 = self.run(&invocation, "store a task's progress").await?;
        Ok(stored == 1)
    }

    async fn task(&self, message_id: &str) -> Result<Option<TaskRecord>> {
        let mut conn = self.conn.clone();
        let fields: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(self.names().record(message_id))
            .query_async(&mut conn)
            .await
            .map_err(|e| redis_error("read a task state", e))?;
        if fields.is_empty() || expired(&fields, now()) {
            return Ok(None);
        }
        parse_record(&fields).map(Some)
    }

    async fn tasks(&self, query: &TaskQuery) -> Result<TaskPage> {
        let names = self.names();
        let filter = &query.filter;
        let limit = query.page_size();
        let p = names.tasks();
        let keys: Vec<String> = match (filter.status, filter.actor.as_deref(), filter.queue.as_deref()) {
            (Some(s), Some(a), Some(q)) => vec![format!("{p}:sa:{s}:{a}"), format!("{p}:sq:{s}:{q}")],
            (Some(s), Some(a), None) => vec![format!("{p}:sa:{s}:{a}")],
            (Some(s), None, Some(q)) => vec![format!("{p}:sq:{s}:{q}")],
            (Some(s), None, None) => vec![format!("{p}:s:{s}")],
            (None, Some(a), Some(q)) => vec![format!("{p}:a:{a}"), format!("{p}:q:{q}")],
            (None, Some(a), None) => vec![format!("{p}:a:{a}")],
            (None, None, Some(q)) => vec![format!("{p}:q:{q}")],
            (None, None, None) => vec![p],
        };
        // Newest first from the cursor (inclusive; ties are cut by id in the script) or below
        // `until` (exclusive), down to `since` (inclusive).
        let max = match (&query.after, filter.until) {
            (Some(c), Some(u)) if u <= c.enqueued_at => format!("({u}"),
            (Some(c), _) => c.enqueued_at.to_string(),
            (None, Some(u)) => format!("({u}"),
            (None, None) => "+inf".to_owned(),
        };
        let min = filter.since.map_or_else(|| "-inf".to_owned(), |s| s.to_string());
        let mut invocation = page_script().prepare_invoke();
        for key in &keys {
            invocation.key(key.as_str());
        }
        invocation
            .arg(names.record_prefix())
            .arg(now())
            .arg(limit)
            .arg(max)
            .arg(min)
            .arg(
                query
                    .after
                    .as_ref()
                    .map(|c| c.enqueued_at.to_string())
                    .unwrap_or_default(),
            )
            .arg(query.after.as_ref().map(|c| c.message_id.as_str()).unwrap_or_default())
            .arg(filter.status.map(TaskStatus::as_str).unwrap_or_default())
            .arg(opt(filter.actor.as_deref()))
            .arg(opt(filter.queue.as_deref()))
            .arg(SCAN_BUDGET)
            .arg((limit * 2).clamp(100, 1000));
        let (rows, last): (Vec<Vec<String>>, Vec<String>) = self.run(&invocation, "read a page of tasks").await?;
        let tasks = rows
            .into_iter()
            .map(|row| parse_record(&pairs(row)))
            .collect::<Result<Vec<_>>>()?;
        let mut page = TaskPage::new(tasks, limit);
        if page.next.is_none()
            && let [score, id] = last.as_slice()
            && let Some(enqueued_at) = score_of(score)
        {
            // The scan budget ran out: the next page goes on from the last member read.
            page.next = Some(TaskCursor {
                enqueued_at,
                message_id: id.clone(),
            });
        }
        Ok(page)
    }

    async fn task_counts(&self, filter: &TaskFilter) -> Result<TaskCounts> {
        let names = self.names();
        let p = names.tasks();
        let mut counts = TaskCounts::default();
        let mut conn = self.conn.clone();
        if let (Some(actor), Some(queue)) = (&filter.actor, &filter.queue) {
            let mut invocation = count_script().prepare_invoke();
            invocation
                .key(format!("{p}:a:{actor}"))
                .arg(names.record_prefix())
                .arg(now())
                .arg(queue.as_str());
            let flat: Vec<String> = self.run(&invocation, "count tasks").await?;
            let mut total = 0;
            for (status, n) in pairs(flat) {
                if let (Ok(status), Ok(n)) = (status.parse::<TaskStatus>(), n.parse::<u64>()) {
                    counts.by_status.insert(status, n);
                    total += n;
                }
            }
            if total > 0 {
                counts.by_actor.insert(actor.clone(), total);
                counts.by_queue.insert(queue.clone(), total);
            }
            return Ok(counts);
        }
        let (key, sets) = match (&filter.actor, &filter.queue) {
            (Some(actor), _) => (format!("{p}:counts:a:{actor}"), format!("{p}:sa:{{}}:{actor}")),
            (None, Some(queue)) => (format!("{p}:counts:q:{queue}"), format!("{p}:sq:{{}}:{queue}")),
            (None, None) => (format!("{p}:counts"), format!("{p}:s:{{}}")),
        };
        // Per status: the size of each status-keyed index set; per actor and queue: the count
        // hash. One round trip.
        let mut pipe = redis::pipe();
        for status in TaskStatus::ALL {
            pipe.cmd("ZCARD").arg(sets.replace("{}", status.as_str()));
        }
        pipe.cmd("HGETALL").arg(&key);
        let (sizes, fields): (Vec<u64>, HashMap<String, i64>) = {
            let mut replies: Vec<redis::Value> = pipe
                .query_async(&mut conn)
                .await
                .map_err(|e| redis_error("count tasks", e))?;
            let fields = replies.pop().map(redis::from_redis_value).transpose();
            let sizes = replies.into_iter().map(redis::from_redis_value).collect();
            match (sizes, fields) {
                (Ok(sizes), Ok(fields)) => (sizes, fields.unwrap_or_default()),
                (Err(e), _) | (_, Err(e)) => return Err(redis_error("count tasks", e.into())),
            }
        };
        for (status, n) in TaskStatus::ALL.into_iter().zip(sizes) {
            if n > 0 {
                counts.by_status.insert(status, n);
            }
        }
        for (field, n) in fields {
            let Ok(n) = u64::try_from(n) else { continue };
            if n == 0 {
                continue;
            }
            match field.split_once(':') {
                Some(("a", actor)) => {
                    counts.by_actor.insert(actor.to_owned(), n);
                }
                Some(("q", queue)) => {
                    counts.by_queue.insert(queue.to_owned(), n);
                }
                _ => {}
            }
        }
        let total = counts.total();
        if total > 0 {
            if let Some(actor) = &filter.actor {
                counts.by_actor.insert(actor.clone(), total);
            } else if let Some(queue) = &filter.queue {
                counts.by_queue.insert(queue.clone(), total);
            }
        }
        Ok(counts)
    }

    async fn delete_task(&self, message_id: &str) -> Result<bool> {
        let names = self.names();
        let mut invocation = delete_script().prepare_invoke();
        invocation
            .key(names.record(message_id))
            .key(names.expiry())
            .arg(names.tasks())
            .arg(now())
            .arg(message_id);
        let deleted: i64 = self.run(&invocation, "delete a task state").await?;
        Ok(deleted == 1)
    }

    async fn expire_tasks(&self, limit: usize) -> Result<u64> {
        if limit == 0 {
            return Ok(0);
        }
        let names = self.names();
        let mut invocation = expire_script().prepare_invoke();
        invocation
            .key(names.expiry())
            .arg(names.tasks())
            .arg(now())
            .arg(limit)
            .arg(names.record_prefix());
        for status in TaskStatus::ALL {
            invocation.arg(status.as_str());
        }
        self.run(&invocation, "expire task states").await
    }

    async fn mark_cancelled(&self, message_id: &str, retention: Duration) -> Result<Option<TaskStatus>> {
        let names = self.names();
        let now = now();
        let (expires_at, pexpire) = expiry_of(now, retention);
        let mut invocation = mark_script().prepare_invoke();
        invocation
            .key(names.record(message_id))
            .key(names.expiry())
            .arg(names.tasks())
            .arg(now)
            .arg(message_id)
            .arg(expires_at)
            .arg(pexpire)
            .arg(TaskStatus::Cancelled.as_str());
        for status in TaskStatus::ALL.into_iter().filter(|s| s.is_pending()) {
            invocation.arg(status.as_str());
        }
        let before: Option<String> = self.run(&invocation, "cancel a task").await?;
        before
            .map(|s| s.parse::<TaskStatus>().map_err(|_| bad(message_id, "status", &s)))
            .transpose()
    }

    async fn request_cancel(&self, message_id: &str, mode: CancelMode, ttl: Duration) -> Result<()> {
        let names = self.names();
        let ttl = ttl_ms(ttl);
        let pexpire = i64::try_from(ttl).unwrap_or(i64::MAX);
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("SET")
            .arg(names.marker(message_id))
            .arg(mode.as_str())
            .arg("PX")
            .arg(ttl)
            .ignore()
            .rpush(names.abort_cancel(message_id), ABORT_CANCEL_EVENT)
            .ignore()
            .pexpire(names.abort_cancel(message_id), pexpire)
            .ignore();
        if mode == CancelMode::Abort {
            pipe.rpush(names.abort_abort(message_id), ABORT_ABORT_EVENT)
                .ignore()
                .pexpire(names.abort_abort(message_id), pexpire)
                .ignore();
        }
        let mut conn = self.conn.clone();
        pipe.query_async::<()>(&mut conn)
            .await
            .map_err(|e| redis_error("request a cancellation", e))
    }

    async fn cancel_requested(&self, message_id: &str) -> Result<Option<CancelMode>> {
        let invocation = self.cancel_invocation(message_id);
        let mode: Option<String> = self.run(&invocation, "read a cancellation request").await?;
        Ok(mode.as_deref().map(mode_of))
    }

    async fn cancel_requests(&self, message_ids: &[String]) -> Result<Vec<Option<CancelMode>>> {
        if message_ids.len() < 2 {
            let mut found = Vec::with_capacity(message_ids.len());
            for id in message_ids {
                found.push(self.cancel_requested(id).await?);
            }
            return Ok(found);
        }
        let invocations: Vec<_> = message_ids.iter().map(|id| self.cancel_invocation(id)).collect();
        let mut pipe = redis::pipe();
        for invocation in &invocations {
            pipe.invoke_script(invocation);
        }
        let mut conn = self.conn.clone();
        let mut result: redis::RedisResult<Vec<Option<String>>> = pipe.query_async(&mut conn).await;
        if let Err(e) = &result
            && e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript)
        {
            // The script was not loaded: no call ran (LPOP included); load it and run them again.
            cancel_requested_script()
                .load_async(&mut conn)
                .await
                .map_err(|e| redis_error("load the cancellation script", e))?;
            result = pipe.query_async(&mut conn).await;
        }
        let modes = result.map_err(|e| redis_error("read cancellation requests", e))?;
        Ok(modes.iter().map(|m| m.as_deref().map(mode_of)).collect())
    }

    async fn wait_cancels(&self, message_ids: &[String], timeout: Duration) -> Result<Vec<(String, CancelMode)>> {
        if message_ids.is_empty() {
            return Ok(Vec::new());
        }
        let found = self.markers(message_ids).await?;
        if !found.is_empty() || timeout.is_zero() {
            return Ok(found);
        }
        let names = self.names();
        let keys: Vec<String> = message_ids.iter().map(|id| names.abort_abort(id)).collect();
        let popped = self
            .blocking
            .pop_first(&self.options, &keys, timeout, "wait for cancellation requests")
            .await?;
        let mut aborted = None;
        if let Some((key, event)) = popped
            && let Some(id) = key.strip_prefix(&names.abort_abort_prefix())
            && is_json_object(&event)
        {
            // An abort popped from dramatiq-abort's list (Troupe's own or Python's): kept as a
            // marker, which later checks and deliveries see.
            let mut invocation = abort_seen_script().prepare_invoke();
            invocation
                .key(names.marker(id))
                .key(names.abort_cancel(id))
                .arg(CancelMode::Abort.as_str())
                .arg(DEFAULT_ABORT_TTL_MS);
            let _: i64 = self.run(&invocation, "keep a cancellation request").await?;
            aborted = Some(id.to_owned());
        }
        // Requests that push no abort element (mode pending) are seen here, after the wait.
        let mut found = self.markers(message_ids).await?;
        if let Some(id) = aborted {
            match found.iter_mut().find(|(m, _)| *m == id) {
                Some(entry) => entry.1 = CancelMode::Abort,
                None => found.push((id, CancelMode::Abort)),
            }
        }
        Ok(found)
    }

    async fn claim_unique(&self, key: &str, message_id: &str, ttl: Duration) -> Result<Option<String>> {
        let mut invocation = claim_script().prepare_invoke();
        invocation
            .key(self.names().unique(key))
            .arg(message_id)
            .arg(ttl_ms(ttl));
        self.run(&invocation, "claim a unique key").await
    }

    async fn release_unique(&self, key: &str, message_id: &str) -> Result<()> {
        let mut invocation = release_script().prepare_invoke();
        invocation.key(self.names().unique(key)).arg(message_id);
        let _: i64 = self.run(&invocation, "release a unique key").await?;
        Ok(())
    }
}
