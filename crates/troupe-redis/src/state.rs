//! Redis state backend, compatible with Dramatiq's Redis rate-limiter backend (raw keys,
//! integer values, `key@events` lists for barriers). Its task store is in `tasks.rs`.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use troupe_core::{Arrival, Result, StateBackend, TaskStore};

use crate::conn::{BlockingPool, RedisConnection, RedisOptions, ms, redis_error};

static INCR: OnceLock<redis::Script> = OnceLock::new();
static SUM: OnceLock<redis::Script> = OnceLock::new();

/// `KEYS[1]` += `ARGV[1]` when the result stays within [`ARGV[2]`, `ARGV[3]`]; TTL `ARGV[4]` ms.
fn incr_script() -> &'static redis::Script {
    INCR.get_or_init(|| {
        redis::Script::new(
            r"local v = tonumber(redis.call('GET', KEYS[1]) or '0') + tonumber(ARGV[1])
              if v < tonumber(ARGV[2]) or v > tonumber(ARGV[3]) then return 0 end
              redis.call('SET', KEYS[1], v, 'PX', ARGV[4])
              return 1",
        )
    })
}

/// `KEYS[1]` += `ARGV[1]` when `ARGV[1]` + the sum of every key stays <= `ARGV[2]`.
fn sum_script() -> &'static redis::Script {
    SUM.get_or_init(|| {
        redis::Script::new(
            r"local sum = tonumber(ARGV[1])
              for _, k in ipairs(KEYS) do sum = sum + tonumber(redis.call('GET', k) or '0') end
              if sum > tonumber(ARGV[2]) then return 0 end
              local v = tonumber(redis.call('GET', KEYS[1]) or '0') + tonumber(ARGV[1])
              redis.call('SET', KEYS[1], v, 'PX', ARGV[3])
              return 1",
        )
    })
}

static SLOT_TAKE: OnceLock<redis::Script> = OnceLock::new();
static SLOT_RENEW: OnceLock<redis::Script> = OnceLock::new();
static SLOT_GIVE: OnceLock<redis::Script> = OnceLock::new();

/// Shared by the slot scripts: the server's clock in ms, and `KEYS[1]`'s counter set to `v`
/// keeping the longer of its TTL and `ARGV` lease `lease` (a Python holder's TTL may be the
/// longer one).
const SLOT_PRELUDE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function set_count(v, lease)
  local ttl = redis.call('PTTL', KEYS[1])
  if ttl < lease then ttl = lease end
  if ttl > 0 then redis.call('SET', KEYS[1], v, 'PX', ttl) else redis.call('SET', KEYS[1], v, 'KEEPTTL') end
end
";

/// Takes a slot of `KEYS[1]` (Dramatiq's counter) for holder `ARGV[1]`, limit `ARGV[2]`,
/// lease `ARGV[3]` ms, tracking Troupe's holders in the sorted set `KEYS[2]` (score: lease
/// end): expired holders are dropped and their counts given back first, so a killed Troupe
/// holder's slot frees itself even while others keep the key busy. Python holders only touch
/// the counter, as Dramatiq's `RedisBackend` does.
fn slot_take_script() -> &'static redis::Script {
    SLOT_TAKE.get_or_init(|| {
        redis::Script::new(&format!(
            r"{SLOT_PRELUDE}
local lease = tonumber(ARGV[3])
local dead = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)
if #dead > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  local c = redis.call('GET', KEYS[1])
  if c then
    local v = tonumber(c) - #dead
    if v < 0 then v = 0 end
    set_count(v, 0)
  end
end
if redis.call('ZSCORE', KEYS[2], ARGV[1]) then
  redis.call('ZADD', KEYS[2], now + lease, ARGV[1])
  redis.call('PEXPIRE', KEYS[2], lease)
  return 1
end
local v = tonumber(redis.call('GET', KEYS[1]) or '0') + 1
if v > tonumber(ARGV[2]) then return 0 end
set_count(v, lease)
redis.call('ZADD', KEYS[2], now + lease, ARGV[1])
local zttl = redis.call('PTTL', KEYS[2])
if zttl < lease then redis.call('PEXPIRE', KEYS[2], lease) end
return 1"
        ))
    })
}

/// Extends holder `ARGV[1]`'s lease to `ARGV[2]` ms from now, with the counter's TTL; 0 when
/// it no longer holds a slot.
fn slot_renew_script() -> &'static redis::Script {
    SLOT_RENEW.get_or_init(|| {
        redis::Script::new(&format!(
            r"{SLOT_PRELUDE}
local lease = tonumber(ARGV[2])
local expiry = redis.call('ZSCORE', KEYS[2], ARGV[1])
if not expiry or tonumber(expiry) <= now then return 0 end
redis.call('ZADD', KEYS[2], now + lease, ARGV[1])
local zttl = redis.call('PTTL', KEYS[2])
if zttl < lease then redis.call('PEXPIRE', KEYS[2], lease) end
local c = redis.call('GET', KEYS[1])
if c then set_count(tonumber(c), lease) end
return 1"
        ))
    })
}

/// Gives back holder `ARGV[1]`'s slot: the counter goes down by one (never below 0) only when
/// the holder was still tracked, so a release after the lease ran out takes nothing from others.
fn slot_give_script() -> &'static redis::Script {
    SLOT_GIVE.get_or_init(|| {
        redis::Script::new(&format!(
            r"{SLOT_PRELUDE}
if redis.call('ZREM', KEYS[2], ARGV[1]) == 0 then return 0 end
local c = redis.call('GET', KEYS[1])
if c then
  local v = tonumber(c) - 1
  if v < 0 then v = 0 end
  set_count(v, 0)
end
return 1"
        ))
    })
}

static ARRIVE: OnceLock<redis::Script> = OnceLock::new();

/// Party `ARGV[1]` arrives at barrier `KEYS[1]` with outcome `ARGV[2]`, TTL `ARGV[3]` ms: at
/// most once (the hash `KEYS[2]` of arrivals), then Dramatiq's step: the counter goes down by
/// one unless that goes below 1; else the barrier is cleared and `KEYS[3]` (its `@events`
/// list) gets an `"x"`, as Dramatiq's `wait_notify` writes it, and the hash's empty field names
/// the clearing party. Returns {counted, cleared, clearer}.
fn arrive_script() -> &'static redis::Script {
    ARRIVE.get_or_init(|| {
        redis::Script::new(
            r"local ttl = tonumber(ARGV[3])
if redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[2]) == 0 then
  local clearer = 0
  if redis.call('HGET', KEYS[2], '') == ARGV[1] then clearer = 1 end
  return {0, redis.call('EXISTS', KEYS[3]), clearer}
end
redis.call('PEXPIRE', KEYS[2], ttl)
local left = tonumber(redis.call('GET', KEYS[1]) or '0') - 1
if left >= 1 then
  redis.call('SET', KEYS[1], left, 'PX', ttl)
  return {1, 0, 0}
end
redis.call('RPUSH', KEYS[3], 'x')
redis.call('PEXPIRE', KEYS[3], ttl)
redis.call('HSET', KEYS[2], '', ARGV[1])
return {1, 1, 1}",
        )
    })
}

/// The sorted set of Troupe's holders of the slots of `key`.
fn holders_key(key: &str) -> String {
    format!("{key}@holders")
}

/// Atomic counters and events in Redis, and a task store (task states, cancellation requests
/// compatible with Python's dramatiq-abort, unique keys).
#[derive(Clone)]
pub struct RedisState {
    pub(crate) options: RedisOptions,
    pub(crate) conn: RedisConnection,
    pub(crate) blocking: BlockingPool,
}

impl std::fmt::Debug for RedisState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisState")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl RedisState {
    /// Connects to the server a `redis://` URL names.
    ///
    /// # Errors
    /// A bad URL or an unreachable server.
    pub async fn connect(url: &str) -> Result<Self> {
        Self::open(RedisOptions::from_url(url)?).await
    }

    /// Connects with these options.
    ///
    /// # Errors
    /// An unreachable server.
    pub async fn open(mut options: RedisOptions) -> Result<Self> {
        // On Redis Cluster, dramatiq-abort's keys go in the namespace's slot too.
        options.abort_namespace = options.abort_prefix().into_owned();
        let conn = options.connection().await?;
        Ok(Self {
            options,
            conn,
            blocking: BlockingPool::default(),
        })
    }

    /// This backend as a shared trait object.
    #[must_use]
    pub fn into_dyn(self) -> Arc<dyn StateBackend> {
        Arc::new(self)
    }

    async fn bounded(&self, key: &str, amount: i64, min: i64, max: i64, ttl: Duration) -> Result<bool> {
        let mut conn = self.conn.clone();
        let changed: i64 = incr_script()
            .key(key)
            .arg(amount)
            .arg(min)
            .arg(max)
            .arg(ms(ttl).max(1))
            .invoke_async(&mut conn)
            .await
            .map_err(|e| redis_error("update a counter", e))?;
        Ok(changed == 1)
    }
}

#[async_trait]
impl StateBackend for RedisState {
    async fn add(&self, key: &str, value: i64, ttl: Duration) -> Result<bool> {
        let key = self.options.shared_key(key);
        let key: &str = &key;
        let mut conn = self.conn.clone();
        let set: Option<String> = redis::cmd("SET")
            .arg(key)
            .arg(value)
            .arg("PX")
            .arg(ms(ttl).max(1))
            .arg("NX")
            .query_async(&mut conn)
            .await
            .map_err(|e| redis_error("add a counter", e))?;
        Ok(set.is_some())
    }

    async fn incr(&self, key: &str, amount: i64, maximum: i64, ttl: Duration) -> Result<bool> {
        let key = self.options.shared_key(key);
        let key: &str = &key;
        self.bounded(key, amount, i64::MIN, maximum, ttl).await
    }

    async fn decr(&self, key: &str, amount: i64, minimum: i64, ttl: Duration) -> Result<bool> {
        let key = self.options.shared_key(key);
        let key: &str = &key;
        self.bounded(key, -amount, minimum, i64::MAX, ttl).await
    }

    async fn incr_and_sum(&self, key: &str, keys: &[String], amount: i64, maximum: i64, ttl: Duration) -> Result<bool> {
        let key = self.options.shared_key(key);
        let key: &str = &key;
        let mut conn = self.conn.clone();
        let keys: Vec<std::borrow::Cow<'_, str>> = keys.iter().map(|k| self.options.shared_key(k)).collect();
        let mut invocation = sum_script().prepare_invoke();
        invocation.key(key);
        for k in keys.iter().filter(|k| *k != key) {
            invocation.key(k.as_ref());
        }
        let changed: i64 = invocation
            .arg(amount)
            .arg(maximum)
            .arg(ms(ttl).max(1))
            .invoke_async(&mut conn)
            .await
            .map_err(|e| redis_error("update a window", e))?;
        Ok(changed == 1)
    }

    async fn get(&self, key: &str) -> Result<Option<i64>> {
        let key = self.options.shared_key(key);
        let key: &str = &key;
        let mut conn = self.conn.clone();
        redis::cmd("GET")
            .arg(key)
            .query_async(&mut conn)
            .await
            .map_err(|e| redis_error("read a counter", e))
    }

    async fn wait(&self, key: &str, timeout: Duration) -> Result<bool> {
        let key = self.options.shared_key(key);
        let key: &str = &key;
        let got = self
            .blocking
            .wait_on_list(&self.options, key, timeout, "wait for an event")
            .await?;
        Ok(got.as_deref() == Some(b"x".as_slice()))
    }

    async fn notify(&self, key: &str, ttl: Duration) -> Result<()> {
        let key = self.options.shared_key(key);
        let key: &str = &key;
        let mut conn = self.conn.clone();
        redis::pipe()
            .atomic()
            .rpush(key, "x")
            .ignore()
            .pexpire(key, i64::try_from(ms(ttl).max(1)).unwrap_or(i64::MAX))
            .ignore()
            .query_async::<()>(&mut conn)
            .await
            .map_err(|e| redis_error("notify an event", e))
    }

    async fn arrive(&self, key: &str, party: &str, outcome: &str, ttl: Duration) -> Result<Arrival> {
        let key = self.options.shared_key(key);
        let key: &str = &key;
        let mut conn = self.conn.clone();
        let (counted, cleared, clearer): (i64, i64, i64) = arrive_script()
            .key(key)
            .key(format!("{key}@arrived"))
            .key(format!("{key}@events"))
            .arg(party)
            .arg(outcome)
            .arg(ms(ttl).max(1))
            .invoke_async(&mut conn)
            .await
            .map_err(|e| redis_error("arrive at a barrier", e))?;
        Ok(Arrival::new(counted == 1, cleared == 1, clearer == 1))
    }

    async fn coordination(&self, limit: usize) -> Result<troupe_core::Coordination> {
        let mut conn = self.conn.clone();
        let scan = |pattern: String| {
            let mut conn = self.conn.clone();
            async move {
                let mut keys = std::collections::BTreeSet::new();
                let mut cursor: u64 = 0;
                loop {
                    let (next, found): (u64, Vec<String>) = redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(&pattern)
                        .arg("COUNT")
                        .arg(1000)
                        .query_async(&mut conn)
                        .await
                        .map_err(|e| redis_error("scan for rate limiters and barriers", e))?;
                    keys.extend(found);
                    if next == 0 {
                        return Ok::<_, troupe_core::Error>(keys);
                    }
                    cursor = next;
                }
            }
        };
        let mut coordination = troupe_core::Coordination::default();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        for holders_key in scan(format!("{}*@holders", self.options.shared_key("")))
            .await?
            .into_iter()
            .take(limit)
        {
            let holders: Vec<String> = redis::cmd("ZRANGEBYSCORE")
                .arg(&holders_key)
                .arg(format!("({now}"))
                .arg("+inf")
                .query_async(&mut conn)
                .await
                .map_err(|e| redis_error("read slot holders", e))?;
            if !holders.is_empty() {
                let key = holders_key.strip_suffix("@holders").unwrap_or(&holders_key);
                let key = self.options.unshared_key(key);
                coordination.slots.push(troupe_core::SlotKey::new(key, holders));
            }
        }
        for arrived_key in scan(format!("{}*@arrived", self.options.shared_key("")))
            .await?
            .into_iter()
            .take(limit)
        {
            let parties: Vec<String> = redis::cmd("HKEYS")
                .arg(&arrived_key)
                .query_async(&mut conn)
                .await
                .map_err(|e| redis_error("read barrier arrivals", e))?;
            let key = arrived_key.strip_suffix("@arrived").unwrap_or(&arrived_key);
            let key = self.options.unshared_key(key);
            let cleared = parties.iter().any(String::is_empty);
            let arrived = parties.iter().filter(|p| !p.is_empty()).count() as u64;
            coordination
                .barriers
                .push(troupe_core::BarrierKey::new(key, arrived, cleared));
        }
        Ok(coordination)
    }

    async fn arrivals(&self, key: &str) -> Result<Vec<(String, String)>> {
        let key = self.options.shared_key(key);
        let key: &str = &key;
        let mut conn = self.conn.clone();
        let all: std::collections::HashMap<String, String> = redis::cmd("HGETALL")
            .arg(format!("{key}@arrived"))
            .query_async(&mut conn)
            .await
            .map_err(|e| redis_error("read barrier arrivals", e))?;
        // The empty field names the party that cleared the barrier.
        Ok(all.into_iter().filter(|(party, _)| !party.is_empty()).collect())
    }

    async fn acquire_slot(&self, key: &str, holder: &str, limit: i64, lease: Duration) -> Result<bool> {
        let key = self.options.shared_key(key);
        let key: &str = &key;
        let mut conn = self.conn.clone();
        let taken: i64 = slot_take_script()
            .key(key)
            .key(holders_key(key))
            .arg(holder)
            .arg(limit)
            .arg(ms(lease).max(1))
            .invoke_async(&mut conn)
            .await
            .map_err(|e| redis_error("take a rate-limit slot", e))?;
        Ok(taken == 1)
    }

    async fn renew_slot(&self, key: &str, holder: &str, lease: Duration) -> Result<bool> {
        let key = self.options.shared_key(key);
        let key: &str = &key;
        let mut conn = self.conn.clone();
        let renewed: i64 = slot_renew_script()
            .key(key)
            .key(holders_key(key))
            .arg(holder)
            .arg(ms(lease).max(1))
            .invoke_async(&mut conn)
            .await
            .map_err(|e| redis_error("renew a rate-limit slot", e))?;
        Ok(renewed == 1)
    }

    async fn release_slot(&self, key: &str, holder: &str, _lease: Duration) -> Result<()> {
        let key = self.options.shared_key(key);
        let key: &str = &key;
        let mut conn = self.conn.clone();
        let _: i64 = slot_give_script()
            .key(key)
            .key(holders_key(key))
            .arg(holder)
            .invoke_async(&mut conn)
            .await
            .map_err(|e| redis_error("release a rate-limit slot", e))?;
        Ok(())
    }

    fn tasks(&self) -> Option<&dyn TaskStore> {
        Some(self)
    }
}
