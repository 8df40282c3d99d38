//! Redis replies: any bytes, parsed as RESP, are read as the fetch script's answer and as a task
//! record without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = troupe_redis::fuzzing::redis_reply(data);
});
