//! Message options: any JSON object as a message's options is read by every accessor the
//! middleware uses without panicking (wrong types, huge and negative numbers, floats).
#![no_main]

use libfuzzer_sys::fuzz_target;
use troupe_core::Message;

fuzz_target!(|data: &[u8]| {
    let Ok(serde_json::Value::Object(options)) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    let mut m = Message::new("q", "a", vec![], serde_json::Map::new());
    m.options = options;
    let _ = (
        m.eta(),
        m.priority(),
        m.has_priority(),
        m.retries(),
        m.max_retries(),
        m.min_backoff(),
    );
    let _ = (
        m.max_backoff(),
        m.time_limit(),
        m.max_age(),
        m.store_results(),
        m.result_ttl(),
    );
    let _ = (
        m.on_success(),
        m.on_failure(),
        m.on_retry_exhausted(),
        m.notify_shutdown(),
    );
    let _ = (
        m.traceback(),
        m.requeue_timestamp(),
        m.pipe_target(),
        m.pipe_ignore(),
        m.delay(),
    );
    let _ = (
        m.redis_message_id(),
        m.broker_priority(),
        m.canonical_queue(),
        m.to_value(),
    );
});
