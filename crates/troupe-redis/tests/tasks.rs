//! The Redis task store beyond the conformance cases, on the machine's Redis
//! (`TROUPE_REDIS_URL`, default `redis://127.0.0.1:6379/0`; a missing server fails the tests):
//! cancellation requests byte for byte as Python's dramatiq-abort 1.2.1 writes and reads them,
//! batched writes, and the key layout.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::time::Duration;

use redis::aio::MultiplexedConnection;
use troupe_core::{CancelMode, TaskFilter, TaskQuery, TaskStatus, TaskStore, TaskUpdate, new_message_id, now_ms};
use troupe_redis::{RedisOptions, RedisState};

const KEEP: Duration = Duration::from_secs(3600);

fn url() -> String {
    std::env::var("TROUPE_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into())
}

/// A store in a namespace of its own, and a plain connection to look at its keys.
async fn store() -> (RedisState, String, MultiplexedConnection) {
    let ns = format!("troupe-tasks-{}", uuid::Uuid::new_v4().simple());
    let options = RedisOptions::from_url(&url()).unwrap().namespace(&ns);
    let state = RedisState::open(options)
        .await
        .expect("Redis must be running for these tests (scripts/test starts it)");
    let conn = redis::Client::open(url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .expect("Redis");
    (state, ns, conn)
}

async fn list(conn: &mut MultiplexedConnection, key: &str) -> Vec<String> {
    redis::cmd("LRANGE")
        .arg(key)
        .arg(0)
        .arg(-1)
        .query_async(conn)
        .await
        .unwrap()
}

async fn pttl(conn: &mut MultiplexedConnection, key: &str) -> i64 {
    redis::cmd("PTTL").arg(key).query_async(conn).await.unwrap()
}

/// As dramatiq-abort's `RedisBackend.notify` does, in MULTI/EXEC: RPUSH then PEXPIRE per key.
async fn python_abort(conn: &mut MultiplexedConnection, id: &str, abort: bool) {
    let mut pipe = redis::pipe();
    pipe.atomic()
        .rpush(format!("dramatiq:aborts:cancel:{id}"), "{}")
        .ignore()
        .pexpire(format!("dramatiq:aborts:cancel:{id}"), 90_000)
        .ignore();
    if abort {
        pipe.rpush(format!("dramatiq:aborts:abort:{id}"), "{\"abort_timeout\": 0}")
            .ignore()
            .pexpire(format!("dramatiq:aborts:abort:{id}"), 90_000)
            .ignore();
    }
    pipe.query_async::<()>(conn).await.unwrap();
}

#[tokio::test]
async fn requests_write_dramatiq_aborts_lists_byte_for_byte() {
    let (store, ns, mut conn) = store().await;
    let id = new_message_id();
    store
        .request_cancel(&id, CancelMode::Abort, Duration::from_secs(90))
        .await
        .unwrap();
    let cancel = format!("dramatiq:aborts:cancel:{id}");
    let abort = format!("dramatiq:aborts:abort:{id}");
    assert_eq!(list(&mut conn, &cancel).await, ["{}"]);
    assert_eq!(list(&mut conn, &abort).await, ["{\"abort_timeout\": 0}"]);
    for key in [&cancel, &abort] {
        let ttl = pttl(&mut conn, key).await;
        assert!(ttl > 80_000 && ttl <= 90_000, "{key}: PTTL {ttl}");
    }
    let marker: String = redis::cmd("GET")
        .arg(format!("{ns}:troupe:cancel:{id}"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(marker, "abort");
    for _ in 0..2 {
        assert_eq!(store.cancel_requested(&id).await.unwrap(), Some(CancelMode::Abort));
    }
    assert_eq!(
        list(&mut conn, &cancel).await,
        ["{}"],
        "Troupe reads its marker and leaves Python's event for Python workers"
    );

    let pending = new_message_id();
    store
        .request_cancel(&pending, CancelMode::Pending, Duration::from_secs(90))
        .await
        .unwrap();
    assert_eq!(
        list(&mut conn, &format!("dramatiq:aborts:cancel:{pending}")).await,
        ["{}"]
    );
    let exists: i64 = redis::cmd("EXISTS")
        .arg(format!("dramatiq:aborts:abort:{pending}"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        exists, 0,
        "mode pending (dramatiq-abort's cancel) leaves running work alone"
    );
    assert_eq!(
        store.cancel_requested(&pending).await.unwrap(),
        Some(CancelMode::Pending)
    );
}

#[tokio::test]
async fn requests_made_by_python_are_seen_and_kept() {
    let (store, ns, mut conn) = store().await;
    let id = new_message_id();
    assert_eq!(store.cancel_requested(&id).await.unwrap(), None);
    python_abort(&mut conn, &id, false).await;
    for _ in 0..2 {
        assert_eq!(
            store.cancel_requested(&id).await.unwrap(),
            Some(CancelMode::Pending),
            "seen, and still seen on a later delivery"
        );
    }
    assert!(
        list(&mut conn, &format!("dramatiq:aborts:cancel:{id}"))
            .await
            .is_empty(),
        "taken as Python's poll takes it"
    );
    let ttl = pttl(&mut conn, &format!("{ns}:troupe:cancel:{id}")).await;
    assert!(
        ttl > 80_000 && ttl <= 90_000,
        "the marker keeps the request's TTL: {ttl}"
    );

    let aborted = new_message_id();
    python_abort(&mut conn, &aborted, true).await;
    assert_eq!(store.cancel_requested(&aborted).await.unwrap(), Some(CancelMode::Abort));

    let junk = new_message_id();
    let _: i64 = redis::cmd("RPUSH")
        .arg(format!("dramatiq:aborts:cancel:{junk}"))
        .arg("x")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        store.cancel_requested(&junk).await.unwrap(),
        None,
        "only a JSON object is a request, as in dramatiq-abort"
    );
}

#[tokio::test]
async fn a_python_abort_wakes_a_watcher() {
    let (store, _ns, mut conn) = store().await;
    let (idle, running) = (new_message_id(), new_message_id());
    let watched = vec![idle.clone(), running.clone()];
    let waiter = {
        let store = store.clone();
        let watched = watched.clone();
        tokio::spawn(async move { store.wait_cancels(&watched, Duration::from_secs(10)).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = std::time::Instant::now();
    python_abort(&mut conn, &running, true).await;
    let found = waiter.await.unwrap().unwrap();
    assert_eq!(found, vec![(running.clone(), CancelMode::Abort)]);
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(
        store.wait_cancels(&watched, Duration::from_millis(50)).await.unwrap(),
        vec![(running.clone(), CancelMode::Abort)],
        "the abort is kept as a marker once popped"
    );
    assert_eq!(store.cancel_requested(&running).await.unwrap(), Some(CancelMode::Abort));

    let pending = new_message_id();
    store.request_cancel(&pending, CancelMode::Pending, KEEP).await.unwrap();
    assert_eq!(
        store
            .wait_cancels(std::slice::from_ref(&pending), Duration::from_millis(50))
            .await
            .unwrap(),
        vec![(pending.clone(), CancelMode::Pending)],
        "a request of mode pending is returned with its mode"
    );
}

fn update(id: &str, actor: &str, status: TaskStatus, version: u64, at: u64) -> TaskUpdate {
    let mut u = TaskUpdate::new(id, actor, "default", status, version);
    u.at = at;
    u
}

#[tokio::test]
async fn batched_writes_keep_the_key_layout() {
    let (store, ns, mut conn) = store().await;
    let t0 = now_ms();
    let (a, b) = (new_message_id(), new_message_id());
    let applied = store
        .record_many(
            &[
                update(&a, "act", TaskStatus::Enqueued, 0, t0),
                update(&b, "act", TaskStatus::Running, 1, t0 + 1),
                update(&a, "act", TaskStatus::Running, 1, t0 + 2),
                update(&b, "act", TaskStatus::Enqueued, 0, t0 + 3),
            ],
            KEEP,
        )
        .await
        .unwrap();
    assert_eq!(applied, [true, true, true, false]);

    let p = format!("{ns}:troupe:tasks");
    let members = |key: String| {
        let mut conn = conn.clone();
        async move {
            let m: Vec<String> = redis::cmd("ZRANGE")
                .arg(key)
                .arg(0)
                .arg(-1)
                .query_async(&mut conn)
                .await
                .unwrap();
            m
        }
    };
    let mut both = vec![a.clone(), b.clone()];
    both.sort();
    for key in [
        p.clone(),
        format!("{p}:s:running"),
        format!("{p}:a:act"),
        format!("{p}:q:default"),
        format!("{p}:sa:running:act"),
        format!("{p}:sq:running:default"),
        format!("{p}:expiry"),
    ] {
        let mut got = members(key.clone()).await;
        got.sort();
        assert_eq!(got, both, "{key}");
    }
    assert!(
        members(format!("{p}:s:enqueued")).await.is_empty(),
        "moved out of enqueued"
    );
    let counts: Vec<(String, i64)> = redis::cmd("HGETALL")
        .arg(format!("{p}:counts"))
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut counts: Vec<(String, i64)> = counts;
    counts.sort();
    // Per actor and queue in the hash; per status, the status sets' sizes (above).
    assert_eq!(counts, [("a:act".to_owned(), 2), ("q:default".to_owned(), 2)]);
    let by_status = store.task_counts(&TaskFilter::new()).await.unwrap().by_status;
    assert_eq!(by_status, [(TaskStatus::Running, 2)].into_iter().collect());
    let version: String = redis::cmd("HGET")
        .arg(format!("{ns}:troupe:task:{a}"))
        .arg("version")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(version, "1");
    let ttl = pttl(&mut conn, &format!("{ns}:troupe:task:{a}")).await;
    assert!(ttl > 3_600_000, "the safety net outlives the retention: {ttl}");
}

#[tokio::test]
async fn ids_whose_hash_vanished_are_dropped_from_the_indexes() {
    let (store, ns, mut conn) = store().await;
    let (gone, kept) = (new_message_id(), new_message_id());
    let short = Duration::from_millis(100);
    store
        .record(&update(&gone, "act", TaskStatus::Enqueued, 0, now_ms()), short)
        .await
        .unwrap();
    store
        .record(&update(&kept, "act", TaskStatus::Enqueued, 0, now_ms()), KEEP)
        .await
        .unwrap();
    // As if the safety-net TTL fired before expire_tasks ran.
    let _: i64 = redis::cmd("DEL")
        .arg(format!("{ns}:troupe:task:{gone}"))
        .query_async(&mut conn)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(store.expire_tasks(100).await.unwrap(), 1);
    let page = store
        .tasks(&TaskQuery::new(TaskFilter::new().actor("act")))
        .await
        .unwrap();
    assert_eq!(page.tasks.len(), 1);
    assert_eq!(page.tasks[0].message_id, kept);
    let p = format!("{ns}:troupe:tasks");
    for key in [
        p.clone(),
        format!("{p}:s:enqueued"),
        format!("{p}:a:act"),
        format!("{p}:expiry"),
    ] {
        let members: Vec<String> = redis::cmd("ZRANGE")
            .arg(&key)
            .arg(0)
            .arg(-1)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(members, std::slice::from_ref(&kept), "{key}");
    }
}
