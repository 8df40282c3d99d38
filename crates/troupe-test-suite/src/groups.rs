//! Conformance cases for groups and their completion callbacks, through a worker on the broker
//! under test, with its results and state backends ([`TestBroker`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};
use troupe_core::middleware::Retries;
use troupe_core::{ActorError, App, Message, group, pipeline};

use crate::TestBroker;
use crate::lifecycle::start;
use crate::support::{TestActor, unique_queue};

const WAIT: Duration = Duration::from_secs(15);

fn app(tb: &TestBroker, actors: &[&TestActor]) -> App {
    let mut builder = App::builder(Arc::clone(&tb.broker))
        .state(Arc::clone(&tb.state))
        .results(Arc::clone(&tb.results))
        .retries(Retries::default().min_backoff(Duration::from_millis(50)));
    for actor in actors {
        builder = builder.actor((*actor).clone());
    }
    builder.build().expect("app")
}

fn message(actor: &TestActor, queue: &str, args: Vec<Value>) -> Message {
    Message::new(queue, actor_name(actor), args, Map::new())
}

fn actor_name(actor: &TestActor) -> String {
    troupe_core::Actor::name(actor).to_owned()
}

/// Waits until `actor` was called `n` times; panics after [`WAIT`].
async fn called(actor: &TestActor, n: usize) {
    let deadline = Instant::now() + WAIT;
    while actor.count() < n {
        assert!(
            Instant::now() < deadline,
            "{} was called {} times, not {n}",
            actor_name(actor),
            actor.count()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A group of a message, a pipeline and a group gives its results in order, counts what is
/// done and waits for the rest.
pub async fn group_results_come_in_order(tb: &TestBroker) {
    let q = unique_queue("group");
    let echo = TestActor::new("g_echo", &q).options(|o| o.store_results(true));
    let app = app(tb, &[&echo]);
    let g = group([
        troupe_core::GroupChild::from(message(&echo, &q, vec![json!(1)])),
        pipeline(vec![
            message(&echo, &q, vec![json!(2)]),
            // The second stage gets the first's result appended: [9, 2]; it returns 9.
            message(&echo, &q, vec![json!(9)]),
        ])
        .expect("pipeline")
        .into(),
        group([message(&echo, &q, vec![json!(3)]), message(&echo, &q, vec![json!(4)])]).into(),
    ]);
    assert_eq!(g.len(), 3);
    assert_eq!(g.completed_count(&app).await.expect("count"), 0);
    assert!(g.results(&app, None).await.is_err(), "no result before the run");
    assert_eq!(
        g.run(&app, None).await.expect("run"),
        None,
        "no barrier without callbacks"
    );
    let worker = start(&app).await;
    g.wait(&app, WAIT).await.expect("the group finishes");
    assert_eq!(
        g.results(&app, Some(WAIT)).await.expect("results"),
        vec![json!(1), json!(9), json!([3, 4])]
    );
    assert_eq!(g.completed_count(&app).await.expect("count"), 3);
    worker.stop().await;
}

/// Dramatiq's completion callback is sent once, after every child succeeded, a retried child
/// counting once, when it finally succeeds.
pub async fn group_completion_callback_fires_once_after_every_child(tb: &TestBroker) {
    let q = unique_queue("group");
    let ok = TestActor::new("g_ok", &q);
    let flaky = TestActor::new("g_flaky", &q).behaviour(|call, _| async move {
        if call < 2 {
            Err(ActorError::new("Flaky", "not yet"))
        } else {
            Ok(json!("at last"))
        }
    });
    let done = TestActor::new("g_done", &q);
    let app = app(tb, &[&ok, &flaky, &done]);
    let g = group([
        message(&ok, &q, vec![json!(1)]),
        message(&flaky, &q, vec![]),
        message(&ok, &q, vec![json!(2)]),
    ])
    .add_completion_callback(message(&done, &q, vec![json!("all done")]));
    let id = g.run(&app, None).await.expect("run").expect("a barrier id");
    assert_eq!(
        tb.state.get(&id).await.expect("barrier"),
        Some(3),
        "a barrier of 3 parties"
    );
    let worker = start(&app).await;
    called(&done, 1).await;
    assert_eq!(flaky.count(), 3, "the callback came after the retried child's success");
    let last_child = ok
        .calls()
        .iter()
        .chain(flaky.calls().iter())
        .map(|c| c.at)
        .max()
        .expect("calls");
    assert!(done.calls()[0].at >= last_child, "the callback ran after every child");
    assert_eq!(done.calls()[0].args, vec![json!("all done")]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(done.count(), 1, "sent once");
    worker.stop().await;
}

/// A finished callback is sent once every child finished, a child that failed for good
/// included, with each child's outcome in the group's order; Dramatiq's completion callback of
/// the same group is never sent (one child failed), as in Dramatiq.
pub async fn group_finished_callback_gets_every_outcome(tb: &TestBroker) {
    let q = unique_queue("group");
    let ok = TestActor::new("g_ok", &q);
    let failing = TestActor::new("g_fail", &q)
        .options(|o| o.max_retries(1))
        .behaviour(|_, _| async { Err(ActorError::new("Boom", "it broke")) });
    let skipping = TestActor::new("g_skip", &q).behaviour(|_, _| async { Err(ActorError::skip()) });
    let finished = TestActor::new("g_finished", &q);
    let completed = TestActor::new("g_completed", &q);
    let app = app(tb, &[&ok, &failing, &skipping, &finished, &completed]);
    let children = [
        message(&ok, &q, vec![json!("one")]),
        message(&failing, &q, vec![]),
        message(&skipping, &q, vec![]),
        message(&ok, &q, vec![json!("four")]),
    ];
    let ids: Vec<String> = children.iter().map(|m| m.message_id.clone()).collect();
    let g = group(children)
        .add_completion_callback(message(&completed, &q, vec![]))
        .add_finished_callback(message(&finished, &q, vec![json!("batch-7")]));
    g.run(&app, None).await.expect("run");
    let worker = start(&app).await;
    called(&finished, 1).await;
    assert_eq!(failing.count(), 2, "the failing child was retried once, then counted");
    let args = finished.calls()[0].args.clone();
    assert_eq!(args.len(), 2, "its own argument, then the outcomes: {args:?}");
    assert_eq!(args[0], json!("batch-7"));
    assert_eq!(
        args[1],
        json!([
            {"message_id": ids[0], "ok": true, "result": "one"},
            {"message_id": ids[1], "ok": false, "error": {"type": "Boom", "message": "it broke"}},
            {"message_id": ids[2], "ok": false, "skipped": true},
            {"message_id": ids[3], "ok": true, "result": "four"},
        ])
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(finished.count(), 1, "sent once");
    assert_eq!(
        completed.count(),
        0,
        "Dramatiq's callback waits for every child to succeed"
    );
    worker.stop().await;
}

/// Callbacks need the app's state backend; a group holding a group cannot have them.
pub async fn group_callbacks_are_refused_without_their_needs(tb: &TestBroker) {
    let q = unique_queue("group");
    let ok = TestActor::new("g_ok", &q);
    let without_state = App::builder(Arc::clone(&tb.broker))
        .actor(ok.clone())
        .build()
        .expect("app");
    let g = group([message(&ok, &q, vec![])]).add_completion_callback(message(&ok, &q, vec![]));
    let e = g.run(&without_state, None).await.expect_err("no state backend");
    assert!(e.to_string().contains("state backend"), "{e}");
    let app = app(tb, &[&ok]);
    let nested = group([troupe_core::GroupChild::from(group([message(&ok, &q, vec![])]))])
        .add_finished_callback(message(&ok, &q, vec![]));
    let e = nested.run(&app, None).await.expect_err("a group in a group");
    assert!(e.to_string().contains("cannot hold a group"), "{e}");
    let pending = tb.broker.stats(&q).await.map(|s| s.pending()).unwrap_or(0);
    assert_eq!(pending, 0, "nothing was sent");
}

/// A group is a pipeline stage: each of its messages gets the previous stage's result, and the
/// next stage gets the list of their results once all succeeded; a pipeline ending in a group
/// gives that list as its result; a child that fails for good stops the pipeline.
pub async fn group_inside_a_pipeline_feeds_the_next_stage(tb: &TestBroker) {
    let q = unique_queue("group");
    let first = TestActor::new("gp_first", &q).behaviour(|_, _| async { Ok(json!(5)) });
    // [k, previous] -> k * previous
    let multiply = TestActor::new("gp_mul", &q)
        .options(|o| o.store_results(true))
        .behaviour(|_, args| async move {
            let (k, by) = (args[0].as_i64().unwrap_or(0), args[1].as_i64().unwrap_or(0));
            if k < 0 {
                return Err(ActorError::fail_permanently(ActorError::new("Negative", "no")));
            }
            Ok(json!(k * by))
        });
    // [label, [results]] -> label and the sum
    let total = TestActor::new("gp_sum", &q)
        .options(|o| o.store_results(true))
        .behaviour(|_, args| async move {
            let sum: i64 = args[1]
                .as_array()
                .map_or(0, |r| r.iter().filter_map(Value::as_i64).sum());
            Ok(json!({"label": args[0], "sum": sum}))
        });
    let app = app(tb, &[&first, &multiply, &total]);
    let mul = |k: i64| message(&multiply, &q, vec![json!(k)]);
    let whole = pipeline(vec![
        troupe_core::Stage::from(message(&first, &q, vec![])),
        group([mul(1), mul(2), mul(3)]).into(),
        message(&total, &q, vec![json!("total")]).into(),
    ])
    .expect("pipeline");
    let ending = pipeline(vec![
        troupe_core::Stage::from(message(&first, &q, vec![])),
        group([mul(4), mul(5)]).into(),
    ])
    .expect("pipeline");
    let stopped = pipeline(vec![
        troupe_core::Stage::from(message(&first, &q, vec![])),
        group([mul(6), mul(-1)]).into(),
        message(&total, &q, vec![json!("never")]).into(),
    ])
    .expect("pipeline");
    for p in [&whole, &ending, &stopped] {
        p.run(&app, None).await.expect("run");
    }
    let worker = start(&app).await;
    assert_eq!(
        whole
            .get_result(&app, Some(WAIT))
            .await
            .expect("the last stage's result"),
        json!({"label": "total", "sum": 30})
    );
    assert_eq!(
        ending.get_result(&app, Some(WAIT)).await.expect("the group's results"),
        json!([20, 25])
    );
    // The failing child's group never sends the last stage.
    called(&multiply, 7).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let never = total.calls().iter().filter(|c| c.args[0] == "never").count();
    assert_eq!(never, 0, "a failed child stops the pipeline");
    assert_eq!(total.count(), 1);
    worker.stop().await;
    let e = pipeline(vec![troupe_core::Stage::from(group([mul(1)])), group([mul(2)]).into()])
        .expect_err("two groups in a row");
    assert!(e.to_string().contains("both groups"), "{e}");
}
