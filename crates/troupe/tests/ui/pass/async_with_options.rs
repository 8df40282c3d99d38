//! An async actor with every option.

use std::time::Duration;

use serde_json::json;
use troupe::{Actor, App, SendOptions, Sent};

#[troupe::actor(
    name = "math.add",
    queue_name = "math",
    priority = -2,
    max_retries = 3,
    min_backoff = "1s",
    max_backoff = 60000,
    time_limit = "5m",
    max_age = "7days",
    result_ttl = "500ms",
    store_results = true,
    pipe_ignore = true,
    notify_shutdown = true,
    on_success = "log_ok",
    on_failure = "log_failure",
    on_retry_exhausted = "dead"
)]
async fn add(x: i64, y: i64) -> i64 {
    x + y
}

/// Only type-checked: the typed producer API.
#[allow(dead_code)]
async fn producer(app: &App) -> troupe::Result<i64> {
    let sent: Sent<i64> = Add.send(app, 1, 2).await?;
    let _delayed: Sent<i64> = Add
        .send_with_options(app, 1, 2, SendOptions::new().delay(Duration::from_secs(1)))
        .await?;
    sent.wait_result(app, Duration::from_secs(1)).await
}

fn main() {
    let _: <Add as Actor>::Args = (1_i64, 2_i64);
    let _: <Add as Actor>::Output = 3_i64;
    assert_eq!(Add.name(), "math.add");
    assert_eq!(Add.arg_names(), ["x", "y"]);

    let o = Add.options();
    assert_eq!(o.queue_name, "math");
    assert_eq!(o.priority, -2);
    assert_eq!(o.max_retries, Some(3));
    assert_eq!(o.min_backoff, Some(Duration::from_secs(1)));
    assert_eq!(o.max_backoff, Some(Duration::from_secs(60)));
    assert_eq!(o.time_limit, Some(Duration::from_secs(300)));
    assert_eq!(o.max_age, Some(Duration::from_secs(7 * 24 * 3600)));
    assert_eq!(o.result_ttl, Some(Duration::from_millis(500)));
    assert_eq!(o.store_results, Some(true));
    assert!(o.pipe_ignore);
    assert!(o.notify_shutdown);
    assert_eq!(o.on_success.as_deref(), Some("log_ok"));
    assert_eq!(o.on_failure.as_deref(), Some("log_failure"));
    assert_eq!(o.on_retry_exhausted.as_deref(), Some("dead"));

    assert_eq!(Add.decode_args(vec![json!(1), json!(2)]), Ok((1, 2)));
    let bad = Add.decode_args(vec![json!(1), json!("two")]).unwrap_err();
    assert!(bad.starts_with("argument \"y\" (position 1):"), "{bad}");
    let surplus = Add.decode_args(vec![json!(1), json!(2), json!(3)]).unwrap_err();
    assert_eq!(surplus, "takes 2 positional argument(s) but 3 were given");

    let message = Add.message(1, 2).unwrap();
    assert_eq!(message.queue_name, "math");
    assert_eq!(message.actor_name, "math.add");
    assert_eq!(message.args, vec![json!(1), json!(2)]);

    let output = futures::executor::block_on(Add.call((40, 2))).unwrap();
    assert_eq!(output, 42);

    // Copy, Clone, Default, Debug.
    let handle = Add;
    let _copy = handle;
    let _ = (handle, Add::default(), format!("{handle:?}"));
}
