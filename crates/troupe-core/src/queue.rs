//! Queue names: validation and Dramatiq's delay (`.DQ`) and dead-letter (`.XQ`) suffixes.

use crate::error::{Error, Result};

/// The suffix of a queue's delay queue.
pub const DELAY_SUFFIX: &str = ".DQ";
/// The suffix of a queue's dead-letter queue.
pub const DEAD_LETTER_SUFFIX: &str = ".XQ";

/// The longest queue name: RabbitMQ's limit of 255 bytes, less the `.XQ` suffix of the
/// dead-letter queue (so a queue valid on one broker is valid on every broker).
pub const MAX_QUEUE_NAME_LEN: usize = 255 - DEAD_LETTER_SUFFIX.len();

/// Checks that `name` matches `[a-zA-Z_][a-zA-Z0-9._-]*`, as Dramatiq requires, and is at
/// most [`MAX_QUEUE_NAME_LEN`] bytes.
///
/// # Errors
/// [`Error::InvalidQueueName`] when it does not.
pub fn validate_queue_name(name: &str) -> Result<()> {
    let mut chars = name.chars();
    let ok = name.len() <= MAX_QUEUE_NAME_LEN
        && match chars.next() {
            Some(c) if c.is_ascii_alphabetic() || c == '_' => {
                chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
            }
            _ => false,
        };
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidQueueName(name.to_owned()))
    }
}

/// The canonical queue name: `name` without a `.DQ` or `.XQ` suffix.
#[must_use]
pub fn q_name(name: &str) -> &str {
    name.strip_suffix(DELAY_SUFFIX)
        .or_else(|| name.strip_suffix(DEAD_LETTER_SUFFIX))
        .unwrap_or(name)
}

/// The delay queue of `name`'s canonical queue.
#[must_use]
pub fn dq_name(name: &str) -> String {
    format!("{}{DELAY_SUFFIX}", q_name(name))
}

/// The dead-letter queue of `name`'s canonical queue.
#[must_use]
pub fn xq_name(name: &str) -> String {
    format!("{}{DEAD_LETTER_SUFFIX}", q_name(name))
}

/// Whether `name` is a delay queue.
#[must_use]
pub fn is_delay_queue(name: &str) -> bool {
    name.ends_with(DELAY_SUFFIX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_names() {
        for ok in ["default", "_x", "a.b-c_d9", "Q"] {
            assert!(validate_queue_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "9a", "a b", "a/b", ".a", "-a", "é"] {
            assert!(validate_queue_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn suffix_helpers() {
        assert_eq!(q_name("a.DQ"), "a");
        assert_eq!(q_name("a.XQ"), "a");
        assert_eq!(q_name("a"), "a");
        assert_eq!(dq_name("a.XQ"), "a.DQ");
        assert_eq!(xq_name("a.DQ"), "a.XQ");
        assert!(is_delay_queue("a.DQ"));
        assert!(!is_delay_queue("a"));
    }
}
