//! Group completion callbacks across Python Dramatiq and Troupe on one Redis: the barrier is
//! Dramatiq's (the group's uuid as a raw key in the rate-limit Redis, a counter of parties), the
//! children carry Dramatiq's `group_completion_uuid` and `group_completion_callbacks`, so
//! whichever side runs the last child sends the callback, once.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value, json};
use troupe::redis::redis;
use troupe::{Message, group};

use super::cancel::troupe_worker_with_state;
use super::{Env, base_url, interop, troupe_calls, wait_until};

/// Python's `group([...]).add_completion_callback(...)` of actors a Troupe worker runs: Troupe
/// arrives at Python's barrier and sends the callback once, after the last child.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_group_run_by_troupe_sends_its_callback_once() {
    let env = Env::new().await;
    let out = env
        .peer(
            &[
                "group",
                "--children",
                r#"[{"actor": "add", "args": [1, 2]}, {"actor": "add", "args": [3, 4]}, {"actor": "echo", "args": ["x"]}]"#,
                "--callback",
                r#"{"actor": "echo", "args": ["the python group is done"]}"#,
            ],
            "",
        )
        .await;
    let children: Vec<String> = out[0]["children"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["message_id"].as_str().unwrap().to_owned())
        .collect();
    let callback = out[0]["callback"]["message_id"].as_str().unwrap().to_owned();
    let worker = troupe_worker_with_state(&env).await;
    let ids: HashSet<String> = children.iter().cloned().chain([callback.clone()]).collect();
    wait_until("the callback ran", || async {
        troupe_calls(&ids).iter().any(|c| c["message_id"] == callback.as_str())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    worker.stop().await;
    let calls = troupe_calls(&ids);
    let of = |id: &str| calls.iter().filter(|c| c["message_id"] == id).count();
    assert_eq!(of(&callback), 1, "the callback ran once: {calls:?}");
    for child in &children {
        assert_eq!(of(child), 1, "child {child} ran once");
    }
    let callback_at = calls.iter().find(|c| c["message_id"] == callback.as_str()).unwrap()["at_ms"]
        .as_u64()
        .unwrap();
    let last_child = calls
        .iter()
        .filter(|c| c["message_id"] != callback.as_str())
        .map(|c| c["at_ms"].as_u64().unwrap())
        .max()
        .unwrap();
    assert!(callback_at >= last_child, "the callback ran after every child");
    assert_eq!(
        calls.iter().find(|c| c["message_id"] == callback.as_str()).unwrap()["received"],
        json!({"value": "the python group is done"})
    );
}

/// A Troupe group whose children run in a Python worker (the example's `group` command):
/// Python's `GroupCallbacks` arrives at the barrier Troupe created and sends Troupe's callback
/// message, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_troupe_group_run_by_python_sends_its_callback_once() {
    let env = Env::new().await;
    let cli = <interop::Cli as clap::Parser>::try_parse_from([
        "interop",
        "group",
        "--broker-url",
        &env.url,
        "--state-url",
        &env.url,
        "--children",
        r#"[{"actor": "add", "args": [1, 2]}, {"actor": "add", "args": [5, 6]}, {"actor": "echo", "args": ["y"]}]"#,
        "--callback",
        r#"{"actor": "echo", "args": ["the troupe group is done"]}"#,
    ])
    .unwrap();
    let interop::Command::Group(args) = cli.command else {
        panic!("parsed as another command")
    };
    let mut out = Vec::new();
    let printed = interop::run_group(args, &mut out).await.unwrap();
    assert_eq!(
        serde_json::from_slice::<Value>(&out).unwrap(),
        printed,
        "it prints what it ran"
    );
    let barrier = printed["group"].as_str().expect("a barrier").to_owned();
    let callback = printed["callback"].as_str().unwrap().to_owned();
    let ids: Vec<String> = printed["children"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect();
    let state = troupe::connect_state(&env.url).await.unwrap();
    assert_eq!(
        state.get(&barrier).await.unwrap(),
        Some(3),
        "Dramatiq's barrier: a counter of 3"
    );

    let records = env.run_python_worker().await;
    let of = |id: &str| records.iter().filter(|r| r["message_id"] == id).count();
    assert_eq!(of(&callback), 1, "Python sent and ran the callback once: {records:?}");
    for id in &ids {
        assert_eq!(of(id), 1, "child {id} ran once");
    }
    let callback_record = records.iter().find(|r| r["message_id"] == callback.as_str()).unwrap();
    assert_eq!(
        callback_record["received"],
        json!({"value": "the troupe group is done"})
    );
    let mut conn = redis::Client::open(base_url()).unwrap().get_connection().unwrap();
    let _: redis::RedisResult<()> = redis::cmd("DEL")
        .arg(&barrier)
        .arg(format!("{barrier}@events"))
        .query(&mut conn);
}

/// One group, children on two queues: a Troupe worker runs some, a Python worker the others;
/// both arrive at the one barrier and the callback is sent once, by whichever side ran the
/// last child.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_split_between_python_and_troupe_sends_its_callback_once() {
    let env = Env::new().await;
    let state = troupe::connect_state(&env.url).await.unwrap();
    let app = interop::build_app_with(
        Arc::new(env.broker.clone()),
        Arc::clone(&env.results),
        Some(Arc::clone(&state)),
        "default",
    )
    .unwrap();
    let mut children = Vec::new();
    for i in 0..6 {
        let queue = if i % 2 == 0 { "default" } else { "py" };
        children.push(Message::new(queue, "sleep_ms", vec![json!(20 + i * 10)], Map::new()));
    }
    // Run by the Troupe worker (on `default`).
    let callback = Message::new("default", "echo", vec![json!("split group done")], Map::new());
    let ids: HashSet<String> = children.iter().map(|m| m.message_id.clone()).collect();
    group(children.clone())
        .add_completion_callback(callback.clone())
        .run(&app, None)
        .await
        .unwrap();
    let python = env
        .start_python_worker_with(&["--actor-queue", "py", "--until-empty", "py"])
        .await;
    let worker = troupe_worker_with_state(&env).await;
    let python_records = python.finish().await;
    let all: HashSet<String> = ids.iter().cloned().chain([callback.message_id.clone()]).collect();
    wait_until("the callback ran", || async {
        troupe_calls(&all)
            .iter()
            .any(|c| c["message_id"] == callback.message_id.as_str())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    worker.stop().await;
    let troupe_records = troupe_calls(&all);
    let callbacks = troupe_records
        .iter()
        .filter(|c| c["message_id"] == callback.message_id.as_str())
        .count();
    assert_eq!(callbacks, 1, "the callback ran once");
    let ran: Vec<&str> = python_records
        .iter()
        .chain(troupe_records.iter())
        .filter_map(|r| r["message_id"].as_str())
        .filter(|id| ids.contains(*id))
        .collect();
    assert_eq!(ran.len(), 6, "every child ran once: {ran:?}");
    assert_eq!(ran.iter().collect::<HashSet<_>>().len(), 6);
    assert_eq!(
        python_records.iter().filter(|r| r["actor"] == "sleep_ms").count(),
        3,
        "Python ran the children on `py`"
    );
}
