//! Dramatiq's JSON wire format: any bytes decode to a message or an error, and a decoded
//! message encodes and decodes to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use troupe_core::{Encoder, JsonEncoder};

fuzz_target!(|data: &[u8]| {
    let _ = JsonEncoder.decode_value(data);
    if let Ok(message) = JsonEncoder.decode(data) {
        let bytes = JsonEncoder.encode(&message).expect("a decoded message encodes");
        let again = JsonEncoder.decode(&bytes).expect("an encoded message decodes");
        assert_eq!(again, message);
    }
});
