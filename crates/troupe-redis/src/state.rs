//! Redis state backend, compatible with Dramatiq's Redis rate-limiter backend (raw keys,
//! integer values, `key@events` lists for barriers). Its task store is in `tasks.rs`.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::ConnectionManager;
use troupe_core::{Result, StateBackend, TaskStore};

use crate::conn::{BlockingPool, RedisOptions, ms, redis_error};

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

/// Atomic counters and events in Redis, and a task store (task states, cancellation requests
/// compatible with Python's dramatiq-abort, unique keys).
#[derive(Clone)]
pub struct RedisState {
    pub(crate) options: RedisOptions,
    pub(crate) conn: ConnectionManager,
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
    pub async fn open(options: RedisOptions) -> Result<Self> {
        let conn = options.manager().await?;
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
        self.bounded(key, amount, i64::MIN, maximum, ttl).await
    }

    async fn decr(&self, key: &str, amount: i64, minimum: i64, ttl: Duration) -> Result<bool> {
        self.bounded(key, -amount, minimum, i64::MAX, ttl).await
    }

    async fn incr_and_sum(&self, key: &str, keys: &[String], amount: i64, maximum: i64, ttl: Duration) -> Result<bool> {
        let mut conn = self.conn.clone();
        let mut invocation = sum_script().prepare_invoke();
        invocation.key(key);
        for k in keys.iter().filter(|k| *k != key) {
            invocation.key(k.as_str());
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
        let mut conn = self.conn.clone();
        redis::cmd("GET")
            .arg(key)
            .query_async(&mut conn)
            .await
            .map_err(|e| redis_error("read a counter", e))
    }

    async fn wait(&self, key: &str, timeout: Duration) -> Result<bool> {
        let got = self
            .blocking
            .wait_on_list(&self.options, key, timeout, "wait for an event")
            .await?;
        Ok(got.as_deref() == Some(b"x".as_slice()))
    }

    async fn notify(&self, key: &str, ttl: Duration) -> Result<()> {
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

    fn tasks(&self) -> Option<&dyn TaskStore> {
        Some(self)
    }
}
