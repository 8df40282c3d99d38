//! Ports of Dramatiq's own behaviour tests (`tests/` of Bogdanp/dramatiq 2.2) to Troupe, on the
//! in-memory broker. Each test is named after the Dramatiq test it ports and cites it.
//!
//! Run with `cargo nextest run -p troupe --test dramatiq`.

// Helpers outside `#[test]` functions panic on purpose: a failed setup is a failed test.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod actors;
mod callbacks;
mod results;
mod retries;
mod stub_broker;
mod support;
mod time_limit;
mod worker;
