//! Property tests of the wire formats: any message encodes and decodes to itself (JSON and
//! MessagePack), decoding arbitrary bytes returns an error rather than panicking, and reading
//! any option value of any type never panics. The fuzz targets in `fuzz/` drive the same
//! functions with coverage guidance; these run in the normal suite.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use proptest::prelude::*;
use serde_json::{Map, Number, Value};
use troupe_core::{Encoder, JsonEncoder, Message, MsgPackEncoder};

/// Any JSON value: nested up to 4 levels, numbers of every kind (finite floats only: JSON has
/// no NaN; Python's bare `NaN` decodes to null, tested in the golden tests).
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| Number::from_f64(f).map_or(Value::Null, Value::Number)),
        ".{0,40}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            prop::collection::vec((".{0,12}", inner), 0..8).prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

fn object() -> impl Strategy<Value = Map<String, Value>> {
    prop::collection::vec(("[a-z_]{1,12}", json_value()), 0..6).prop_map(|kv| kv.into_iter().collect())
}

fn message() -> impl Strategy<Value = Message> {
    (
        "[a-zA-Z_][a-zA-Z0-9._-]{0,30}",
        ".{1,30}",
        prop::collection::vec(json_value(), 0..6),
        object(),
        object(),
        ".{0,40}",
        any::<u64>(),
    )
        .prop_map(|(queue, actor, args, kwargs, options, id, timestamp)| {
            let mut m = Message::new(&queue, &actor, args, kwargs);
            m.options = options;
            m.message_id = id;
            m.message_timestamp = timestamp;
            m
        })
}

/// Every option accessor, so a value of any type under any Dramatiq key is read.
fn read_every_option(m: &Message) {
    let _ = (
        m.eta(),
        m.priority(),
        m.has_priority(),
        m.retries(),
        m.max_retries(),
        m.min_backoff(),
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
        m.traceback(),
        m.requeue_timestamp(),
        m.pipe_target(),
        m.pipe_ignore(),
        m.delay(),
        m.redis_message_id(),
        m.broker_priority(),
        m.canonical_queue(),
    );
}

const OPTION_KEYS: &[&str] = &[
    "eta",
    "priority",
    "broker_priority",
    "retries",
    "max_retries",
    "min_backoff",
    "max_backoff",
    "time_limit",
    "max_age",
    "store_results",
    "result_ttl",
    "on_success",
    "on_failure",
    "on_retry_exhausted",
    "notify_shutdown",
    "traceback",
    "requeue_timestamp",
    "pipe_target",
    "pipe_ignore",
    "delay",
    "redis_message_id",
];

proptest! {
    // No regression files: a failure prints its minimal input, which becomes a unit test.
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn json_encode_then_decode_gives_the_same_message(m in message()) {
        let bytes = JsonEncoder.encode(&m).unwrap();
        prop_assert_eq!(JsonEncoder.decode(&bytes).unwrap(), m);
    }

    #[test]
    fn msgpack_encode_then_decode_gives_the_same_message(m in message()) {
        let bytes = MsgPackEncoder.encode(&m).unwrap();
        prop_assert_eq!(MsgPackEncoder.decode(&bytes).unwrap(), m);
    }

    #[test]
    fn values_encode_then_decode_to_themselves(v in json_value()) {
        let json = JsonEncoder.decode_value(&JsonEncoder.encode_value(&v).unwrap()).unwrap();
        let msgpack = MsgPackEncoder.decode_value(&MsgPackEncoder.encode_value(&v).unwrap()).unwrap();
        prop_assert_eq!(&json, &v);
        prop_assert_eq!(&msgpack, &v);
    }

    #[test]
    fn decoding_arbitrary_bytes_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = JsonEncoder.decode(&bytes);
        let _ = MsgPackEncoder.decode(&bytes);
        let _ = JsonEncoder.decode_value(&bytes);
        let _ = MsgPackEncoder.decode_value(&bytes);
    }

    #[test]
    fn reading_any_option_value_never_panics(
        values in prop::collection::vec(json_value(), OPTION_KEYS.len())
    ) {
        let mut m = Message::new("q", "a", vec![], Map::new());
        for (key, value) in OPTION_KEYS.iter().zip(values) {
            m.options.insert((*key).to_owned(), value);
        }
        read_every_option(&m);
    }
}
