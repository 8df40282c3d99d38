//! Wire compatibility with Python Dramatiq: the fixtures under `fixtures/json` are the exact
//! bytes Dramatiq 2.2.1 put on the wire (see `fixtures/json/README.md` and
//! `scripts/gen_golden_fixtures.py`). Each must decode to the message Python built, and our
//! encoding of that message must be byte-identical.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use serde_json::{Map, Value, json};
use troupe_core::{Encoder, JsonEncoder, Message, MsgPackEncoder};

fn fixture(name: &str) -> Vec<u8> {
    let path = format!("{}/tests/fixtures/json/{name}.json", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("read {path}: {e}"))
}

fn object(v: Value) -> Map<String, Value> {
    v.as_object().cloned().expect("an object")
}

fn msg(queue: &str, args: Value, kwargs: Value, options: Value, id: &str, ts: u64) -> Message {
    Message {
        queue_name: queue.into(),
        actor_name: "add".into(),
        args: args.as_array().cloned().expect("an array"),
        kwargs: object(kwargs),
        options: object(options),
        message_id: id.into(),
        message_timestamp: ts,
    }
}

fn cases() -> Vec<(&'static str, Message)> {
    let mut pipeline_target = msg(
        "default",
        json!([10]),
        json!({}),
        json!({}),
        "b014e1cd-d2f3-4490-a7c2-e3048fa0c1d2",
        1_700_000_000_011,
    );
    pipeline_target.actor_name = "multiply".into();
    vec![
        (
            "simple",
            msg(
                "default",
                json!([1, 2]),
                json!({}),
                json!({}),
                "0b6f3c1e-2d4a-4f8b-9c1d-3e5f7a9b1c2d",
                1_700_000_000_000,
            ),
        ),
        (
            "empty_args",
            msg(
                "default",
                json!([]),
                json!({}),
                json!({}),
                "1c7a4d2f-3e5b-4a9c-8d2e-4f6a8b0c2d3e",
                1_700_000_000_001,
            ),
        ),
        (
            "kwargs",
            msg(
                "default",
                json!([]),
                json!({"x": 1, "y": "two", "z": null}),
                json!({}),
                "2d8b5e3a-4f6c-4b0d-9e3f-5a7b9c1d3e4f",
                1_700_000_000_002,
            ),
        ),
        (
            "unicode",
            msg(
                "default",
                json!([
                    "héllo",
                    "日本語",
                    "emoji 😀 and 𝄞",
                    "quote \" backslash \\ newline \n tab \t nul \u{0} del \u{7f}"
                ]),
                json!({"ключ": "значение"}),
                json!({}),
                "3e9c6f4b-5a7d-4c1e-af4a-6b8c0d2e4f5a",
                1_700_000_000_003,
            ),
        ),
        (
            "nested",
            msg(
                "default",
                json!([{"a": [1, {"b": [true, false, null]}], "c": {}}, [[[]]]]),
                json!({"deep": {"list": [1, 2.5, "s"]}}),
                json!({}),
                "4fad7a5c-6b8e-4d2f-b05b-7c9d1e3f5a6b",
                1_700_000_000_004,
            ),
        ),
        (
            "large_ints",
            msg(
                "default",
                json!([i64::MAX, i64::MIN, u64::MAX, 0, -1, 9_007_199_254_740_993_u64]),
                json!({}),
                json!({}),
                "5abe8b6d-7c9f-4e3a-816c-8dae2f4a6b7c",
                1_700_000_000_005,
            ),
        ),
        (
            "floats",
            msg(
                "default",
                json!([
                    0.0,
                    -0.0,
                    1.5,
                    0.1,
                    1e16,
                    1.5e16,
                    1e-5,
                    0.0001,
                    123_456_789.123,
                    1e300,
                    5e-324,
                    100.0,
                    1e15,
                    -2.5e-7
                ]),
                json!({}),
                json!({}),
                "6bcf9c7e-8dae-4f4b-927d-9ebf3a5b7c8d",
                1_700_000_000_006,
            ),
        ),
        (
            "options",
            msg(
                "default",
                json!([1, 2]),
                json!({}),
                json!({
                    "redis_message_id": "c125f2de-e304-45a1-88d3-f41590b1d2e3",
                    "eta": 1_700_000_005_000_u64,
                    "retries": 3,
                    "max_retries": 5,
                    "min_backoff": 1000,
                    "max_backoff": 60000,
                    "traceback": "Traceback (most recent call last):\n  File \"x.py\", line 1\nValueError: bad",
                    "on_success": "done",
                    "on_failure": "failed",
                    "pipe_ignore": true,
                    "store_results": true,
                    "result_ttl": 600_000,
                    "broker_priority": 3,
                    "custom_unknown_key": {"keep": ["me", 1]}
                }),
                "8de1be9a-afc0-416d-b49f-b0d15c7d9eaf",
                1_700_000_000_008,
            ),
        ),
        (
            "delayed",
            msg(
                "default.DQ",
                json!([1, 2]),
                json!({}),
                json!({"eta": 1_700_000_009_000_u64}),
                "9ef2cfab-b0d1-427e-85a0-c1e26d8eafb0",
                1_700_000_000_009,
            ),
        ),
        (
            "pipeline",
            msg(
                "default",
                json!([1, 2]),
                json!({}),
                json!({"pipe_target": pipeline_target.to_value()}),
                "af03d0bc-c1e2-438f-96b1-d2f37e9fb0c1",
                1_700_000_000_010,
            ),
        ),
    ]
}

#[test]
fn python_bytes_decode_to_the_expected_message() {
    for (name, expected) in cases() {
        let decoded = JsonEncoder
            .decode(&fixture(name))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(decoded, expected, "{name}");
        // Order-preserving: options keep Python's insertion order.
        let keys: Vec<&String> = decoded.options.keys().collect();
        let want: Vec<&String> = expected.options.keys().collect();
        assert_eq!(keys, want, "{name}: option order");
    }
}

#[test]
fn our_encoding_is_byte_identical_to_pythons() {
    for (name, message) in cases() {
        let ours = JsonEncoder.encode(&message).expect("encode");
        let theirs = fixture(name);
        assert_eq!(
            String::from_utf8_lossy(&ours),
            String::from_utf8_lossy(&theirs),
            "{name}"
        );
        assert_eq!(ours, theirs, "{name}");
    }
}

#[test]
fn nan_and_infinity_tokens_are_accepted_as_null() {
    let decoded = JsonEncoder.decode(&fixture("nan_inf")).expect("NaN/Infinity accepted");
    assert_eq!(decoded.args, vec![Value::Null, Value::Null, Value::Null]);
    assert_eq!(decoded.message_id, "7cd0ad8f-9ebf-405c-a38e-afc04b6c8d9e");
}

#[test]
fn an_extra_top_level_key_is_rejected_clearly() {
    let bytes = br#"{"queue_name":"q","actor_name":"a","args":[],"kwargs":{},"options":{},"message_id":"x","message_timestamp":1,"extra":true}"#;
    let err = JsonEncoder.decode(bytes).expect_err("extra key rejected").to_string();
    assert!(err.contains("unknown field `extra`"), "{err}");
}

#[test]
fn missing_id_and_timestamp_default_as_in_dramatiq() {
    let m = JsonEncoder
        .decode(br#"{"queue_name":"q","actor_name":"a","args":[],"kwargs":{},"options":{}}"#)
        .expect("decodes");
    assert_eq!(m.message_id.len(), 36);
    assert!(m.message_timestamp > 0);
    for missing in ["queue_name", "actor_name", "args", "kwargs", "options"] {
        let mut v = json!({"queue_name":"q","actor_name":"a","args":[],"kwargs":{},"options":{}});
        v.as_object_mut().expect("object").remove(missing);
        let err = JsonEncoder
            .decode(&serde_json::to_vec(&v).expect("json"))
            .expect_err(missing)
            .to_string();
        assert!(err.contains(missing), "{err}");
    }
}

#[test]
fn invalid_utf8_and_garbage_are_decode_errors() {
    assert!(JsonEncoder.decode(b"\xff\xfe").is_err());
    assert!(JsonEncoder.decode(b"").is_err());
    assert!(JsonEncoder.decode(b"[1,2]").is_err());
    let mut bad = fixture("unicode");
    let at = bad.iter().position(|b| *b == b'h').expect("an h");
    bad[at] = 0xff;
    assert!(JsonEncoder.decode(&bad).is_err());
}

#[test]
fn msgpack_round_trips_every_case() {
    for (name, message) in cases() {
        let bytes = MsgPackEncoder.encode(&message).expect("encode");
        let back = MsgPackEncoder.decode(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(back, message, "{name}");
        assert!(
            bytes.len() <= JsonEncoder.encode(&message).expect("json").len(),
            "{name}: msgpack is not larger"
        );
    }
}
