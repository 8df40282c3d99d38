//! Encoders: turning messages into bytes and back.
//!
//! [`JsonEncoder`] is byte-compatible with Python Dramatiq's `JSONEncoder`
//! (`json.dumps(d, separators=(",", ":"))`): compact, every non-ASCII character (and DEL) escaped as
//! `\uXXXX` with surrogate pairs above the BMP, floats spelled as Python's `repr`. On decode it also
//! accepts the bare `NaN`, `Infinity` and `-Infinity` tokens Python writes; since `serde_json::Value`
//! has no non-finite numbers they decode as `null` (what `serde_json` itself writes for them).
//! [`MsgPackEncoder`] is smaller and faster, for Rust-to-Rust traffic.

use std::fmt;
use std::io;

use serde::Serialize;
use serde_json::Value;
use serde_json::ser::Formatter;

use crate::error::{Error, Result};
use crate::message::Message;

/// Encodes messages (and stored results) to bytes and back.
pub trait Encoder: Send + Sync + fmt::Debug + 'static {
    /// A short name for logs ("json", "msgpack").
    fn name(&self) -> &'static str;
    /// Encodes a message.
    ///
    /// # Errors
    /// [`Error::Encode`] when the message cannot be represented.
    fn encode(&self, message: &Message) -> Result<Vec<u8>>;
    /// Decodes a message; any key beyond the seven wire fields is an error.
    ///
    /// # Errors
    /// [`Error::Decode`] with the reason.
    fn decode(&self, bytes: &[u8]) -> Result<Message>;
    /// Encodes an arbitrary value (results backends use this).
    ///
    /// # Errors
    /// [`Error::Encode`] when the value cannot be represented.
    fn encode_value(&self, value: &Value) -> Result<Vec<u8>>;
    /// Decodes an arbitrary value.
    ///
    /// # Errors
    /// [`Error::Decode`] with the reason.
    fn decode_value(&self, bytes: &[u8]) -> Result<Value>;
}

/// Dramatiq's JSON wire format.
#[derive(Clone, Copy, Debug, Default)]
pub struct JsonEncoder;

impl JsonEncoder {
    /// Serialises any value the way Python's `json.dumps(v, separators=(",", ":"))` does.
    ///
    /// # Errors
    /// [`Error::Encode`] when serialisation fails.
    pub fn to_vec<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(256);
        let mut ser = serde_json::Serializer::with_formatter(&mut out, PyFormatter);
        value.serialize(&mut ser).map_err(|e| Error::Encode(e.to_string()))?;
        Ok(out)
    }

    fn parse<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T> {
        match serde_json::from_slice(bytes) {
            Ok(v) => Ok(v),
            Err(first) => {
                // Python writes NaN / Infinity / -Infinity as bare tokens; accept them as null.
                if let Some(patched) = replace_non_finite_tokens(bytes) {
                    serde_json::from_slice(&patched).map_err(|e| Error::Decode(e.to_string()))
                } else {
                    Err(Error::Decode(first.to_string()))
                }
            }
        }
    }
}

impl Encoder for JsonEncoder {
    fn name(&self) -> &'static str {
        "json"
    }

    fn encode(&self, message: &Message) -> Result<Vec<u8>> {
        Self::to_vec(message)
    }

    fn decode(&self, bytes: &[u8]) -> Result<Message> {
        Self::parse(bytes)
    }

    fn encode_value(&self, value: &Value) -> Result<Vec<u8>> {
        Self::to_vec(value)
    }

    fn decode_value(&self, bytes: &[u8]) -> Result<Value> {
        Self::parse(bytes)
    }
}

/// MessagePack (rmp-serde, maps with field names): for Rust-to-Rust deployments.
#[derive(Clone, Copy, Debug, Default)]
pub struct MsgPackEncoder;

impl Encoder for MsgPackEncoder {
    fn name(&self) -> &'static str {
        "msgpack"
    }

    fn encode(&self, message: &Message) -> Result<Vec<u8>> {
        rmp_serde::to_vec_named(message).map_err(|e| Error::Encode(e.to_string()))
    }

    fn decode(&self, bytes: &[u8]) -> Result<Message> {
        rmp_serde::from_slice(bytes).map_err(|e| Error::Decode(e.to_string()))
    }

    fn encode_value(&self, value: &Value) -> Result<Vec<u8>> {
        rmp_serde::to_vec_named(value).map_err(|e| Error::Encode(e.to_string()))
    }

    fn decode_value(&self, bytes: &[u8]) -> Result<Value> {
        rmp_serde::from_slice(bytes).map_err(|e| Error::Decode(e.to_string()))
    }
}

/// Returns a copy of `bytes` with the bare tokens `NaN`, `Infinity` and `-Infinity` (outside
/// strings) replaced by `null`, or `None` when there are none.
fn replace_non_finite_tokens(bytes: &[u8]) -> Option<Vec<u8>> {
    const TOKENS: [&[u8]; 3] = [b"-Infinity", b"Infinity", b"NaN"];
    let mut out = Vec::with_capacity(bytes.len());
    let mut in_string = false;
    let mut escaped = false;
    let mut found = false;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
        } else if b == b'"' {
            in_string = true;
        } else if let Some(t) = TOKENS.iter().find(|t| bytes[i..].starts_with(t)) {
            out.extend_from_slice(b"null");
            i += t.len();
            found = true;
            continue;
        }
        out.push(b);
        i += 1;
    }
    found.then_some(out)
}

/// A `serde_json` formatter that writes what Python's `json.dumps` writes with
/// `ensure_ascii=True` and compact separators.
#[derive(Clone, Copy, Debug, Default)]
struct PyFormatter;

impl Formatter for PyFormatter {
    fn write_f64<W: ?Sized + io::Write>(&mut self, writer: &mut W, value: f64) -> io::Result<()> {
        writer.write_all(python_float_repr(value).as_bytes())
    }

    fn write_f32<W: ?Sized + io::Write>(&mut self, writer: &mut W, value: f32) -> io::Result<()> {
        self.write_f64(writer, f64::from(value))
    }

    fn write_string_fragment<W: ?Sized + io::Write>(&mut self, writer: &mut W, fragment: &str) -> io::Result<()> {
        let bytes = fragment.as_bytes();
        let mut start = 0;
        for (i, c) in fragment.char_indices() {
            if c.is_ascii() && c != '\u{7f}' {
                continue;
            }
            writer.write_all(&bytes[start..i])?;
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                write!(writer, "\\u{unit:04x}")?;
            }
            start = i + c.len_utf8();
        }
        writer.write_all(&bytes[start..])
    }
}

/// Formats a finite float exactly as Python's `repr(float)` does (shortest round-trip digits;
/// exponent form below 1e-4 and from 1e16, with a signed two-digit exponent; `.0` on integers).
#[must_use]
pub fn python_float_repr(value: f64) -> String {
    if !value.is_finite() {
        return if value.is_nan() {
            "NaN".into()
        } else if value > 0.0 {
            "Infinity".into()
        } else {
            "-Infinity".into()
        };
    }
    let mut buf = ryu::Buffer::new();
    let shortest = buf.format_finite(value);
    let (negative, body) = match shortest.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, shortest),
    };
    let (mantissa, exp) = match body.split_once(['e', 'E']) {
        Some((m, e)) => (m, e.parse::<i32>().unwrap_or(0)),
        None => (body, 0),
    };
    let (int_part, frac_part) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let mut digits: String = format!("{int_part}{frac_part}");
    // value = 0.DIGITS * 10^decpt
    let mut decpt = i32::try_from(int_part.len()).unwrap_or(0) + exp;
    let leading = digits.len() - digits.trim_start_matches('0').len();
    digits.drain(..leading);
    decpt -= i32::try_from(leading).unwrap_or(0);
    let trimmed = digits.trim_end_matches('0').len();
    digits.truncate(trimmed);
    let mut out = String::with_capacity(24);
    if negative {
        out.push('-');
    }
    if digits.is_empty() {
        out.push_str("0.0");
        return out;
    }
    let n = i32::try_from(digits.len()).unwrap_or(i32::MAX);
    if decpt <= -4 || decpt > 16 {
        out.push_str(&digits[..1]);
        if digits.len() > 1 {
            out.push('.');
            out.push_str(&digits[1..]);
        }
        let e = decpt - 1;
        out.push('e');
        out.push(if e < 0 { '-' } else { '+' });
        out.push_str(&format!("{:02}", e.abs()));
    } else if decpt <= 0 {
        out.push_str("0.");
        for _ in 0..-decpt {
            out.push('0');
        }
        out.push_str(&digits);
    } else if decpt >= n {
        out.push_str(&digits);
        for _ in 0..decpt - n {
            out.push('0');
        }
        out.push_str(".0");
    } else {
        let split = usize::try_from(decpt).unwrap_or(0);
        out.push_str(&digits[..split]);
        out.push('.');
        out.push_str(&digits[split..]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn float_repr_matches_python() {
        let cases: &[(f64, &str)] = &[
            (0.0, "0.0"),
            (-0.0, "-0.0"),
            (1.5, "1.5"),
            (0.1, "0.1"),
            (1e16, "1e+16"),
            (1.5e16, "1.5e+16"),
            (1e-5, "1e-05"),
            (0.0001, "0.0001"),
            (123_456_789.123, "123456789.123"),
            (1e300, "1e+300"),
            (5e-324, "5e-324"),
            (100.0, "100.0"),
            (1e15, "1000000000000000.0"),
            (-2.5e-7, "-2.5e-07"),
            (1.7976931348623157e308, "1.7976931348623157e+308"),
            (12.0, "12.0"),
            (0.5, "0.5"),
        ];
        for (v, want) in cases {
            assert_eq!(python_float_repr(*v), *want, "{v:e}");
        }
    }

    #[test]
    fn non_finite_tokens_become_null_outside_strings() {
        let raw = br#"{"a":[NaN,Infinity,-Infinity,"NaN Infinity"]}"#;
        let patched = replace_non_finite_tokens(raw).unwrap_or_default();
        assert_eq!(
            String::from_utf8_lossy(&patched),
            r#"{"a":[null,null,null,"NaN Infinity"]}"#
        );
        assert!(replace_non_finite_tokens(br#"{"a":"NaN"}"#).is_none());
    }
}
