//! The MessagePack encoding: any bytes decode to a message or an error, and a decoded message
//! encodes and decodes to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use troupe_core::{Encoder, MsgPackEncoder};

fuzz_target!(|data: &[u8]| {
    let _ = MsgPackEncoder.decode_value(data);
    if let Ok(message) = MsgPackEncoder.decode(data) {
        let bytes = MsgPackEncoder.encode(&message).expect("a decoded message encodes");
        let again = MsgPackEncoder.decode(&bytes).expect("an encoded message decodes");
        assert_eq!(again, message);
    }
});
