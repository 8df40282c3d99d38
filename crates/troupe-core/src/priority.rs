//! The one priority model: an actor's priority and a message's (`troupe_priority`), lower runs
//! first (Dramatiq's direction), default 0, in [`MIN`]`..=`[`MAX`].
//!
//! Every broker honours it itself: SQLite and PostgreSQL claim in priority order, Redis keeps a
//! lane list per non-zero priority, RabbitMQ maps negative priorities to AMQP priorities on a
//! queue declared with `max_priority`, and the memory broker delivers lower first. The actor's
//! priority becomes its messages' priority when they are sent, and a worker orders what it
//! prefetched by the same number. A message at priority 0 carries no `troupe_priority` option,
//! so it is byte for byte what Python Dramatiq sends.
//!
//! Values outside the range are clamped into it, by [`clamp`] and the readers built on it
//! ([`Message::priority`](crate::Message::priority), [`of_value`]), wherever they are read.

use serde_json::Value;

/// The message option carrying a message's priority.
pub const OPTION: &str = "troupe_priority";

/// The most urgent priority (the actor options table's, which the `#[actor]` macro checks).
pub const MIN: i32 = troupe_options::PRIORITY_MIN;

/// The least urgent priority.
pub const MAX: i32 = troupe_options::PRIORITY_MAX;

/// The priority of a message that has none, and of actors by default.
pub const DEFAULT: i32 = troupe_options::defaults::PRIORITY;

/// `priority` clamped into [`MIN`]`..=`[`MAX`].
#[must_use]
pub fn clamp(priority: i64) -> i32 {
    // In range after the clamp, so the conversion cannot fail.
    i32::try_from(priority.clamp(i64::from(MIN), i64::from(MAX))).unwrap_or(DEFAULT)
}

/// The priority a `troupe_priority` option value stands for: an integer (or a float, truncated)
/// clamped into range; anything else (`null`, a string, ...) is [`DEFAULT`].
#[must_use]
pub fn of_value(value: &Value) -> i32 {
    let Value::Number(n) = value else {
        return DEFAULT;
    };
    if let Some(v) = n.as_i64() {
        clamp(v)
    } else if n.as_u64().is_some() {
        MAX
    } else {
        n.as_f64().filter(|v| v.is_finite()).map_or(DEFAULT, float_priority)
    }
}

#[allow(clippy::cast_possible_truncation)]
fn float_priority(v: f64) -> i32 {
    // Clamped first, so the cast only drops the fraction.
    v.clamp(f64::from(MIN), f64::from(MAX)) as i32
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn clamps_into_range() {
        assert_eq!(clamp(0), 0);
        assert_eq!(clamp(-5), -5);
        assert_eq!(clamp(10), 10);
        assert_eq!(clamp(11), MAX);
        assert_eq!(clamp(-11), MIN);
        assert_eq!(clamp(i64::MAX), MAX);
        assert_eq!(clamp(i64::MIN), MIN);
    }

    #[test]
    fn reads_option_values() {
        assert_eq!(of_value(&json!(3)), 3);
        assert_eq!(of_value(&json!(-3)), -3);
        assert_eq!(of_value(&json!(1000)), MAX);
        assert_eq!(of_value(&json!(u64::MAX)), MAX);
        assert_eq!(of_value(&json!(-2.7)), -2);
        assert_eq!(of_value(&json!(1e300)), MAX);
        assert_eq!(of_value(&json!("high")), DEFAULT);
        assert_eq!(of_value(&Value::Null), DEFAULT);
    }
}
