//! The settings every SQL backend shares, and the one parser of URL query settings.

use std::fmt::Debug;
use std::time::Duration;

use troupe_core::{Error, Result};

/// The settings the shared SQL broker reads, whatever the backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Common {
    /// How long a claim lasts without renewal (a killed worker's messages return after it).
    pub lease: Duration,
    /// How often idle consumers look for messages the backend did not announce.
    pub poll_interval: Duration,
    /// How long dead letters are kept.
    pub dead_letter_ttl: Duration,
    /// Largest accepted message, in bytes.
    pub max_message_size: usize,
    /// Connections in the main pool.
    pub max_connections: u32,
}

impl Common {
    /// The common settings from their parts.
    #[must_use]
    pub fn new(
        lease: Duration,
        poll_interval: Duration,
        dead_letter_ttl: Duration,
        max_message_size: usize,
        max_connections: u32,
    ) -> Self {
        Self {
            lease,
            poll_interval,
            dead_letter_ttl,
            max_message_size,
            max_connections,
        }
    }

    /// The names of the common settings, in the order errors list them.
    pub const KEYS: [&'static str; 5] = [
        "lease",
        "poll_interval",
        "dead_letter_ttl",
        "max_message_size",
        "max_connections",
    ];

    /// Applies `setting` if it is a common one; whether it was.
    ///
    /// # Errors
    /// A bad value, naming the setting.
    pub fn apply(&mut self, setting: &Setting<'_>) -> Result<bool> {
        match setting.key {
            "lease" => self.lease = setting.duration()?,
            "poll_interval" => self.poll_interval = setting.duration()?,
            "dead_letter_ttl" => self.dead_letter_ttl = setting.duration()?,
            "max_message_size" => self.max_message_size = usize::try_from(setting.number()?).unwrap_or(usize::MAX),
            "max_connections" => self.max_connections = u32::try_from(setting.number()?.max(1)).unwrap_or(u32::MAX),
            _ => return Ok(false),
        }
        Ok(true)
    }
}

/// A backend's options, as the shared broker reads them.
pub trait SqlOptions: Clone + Debug + Send + Sync + 'static {
    /// Parses a URL of the backend.
    ///
    /// # Errors
    /// [`Error::Config`] naming the bad part (with no password in it).
    fn parse_url(url: &str) -> Result<Self>;

    /// The common settings.
    fn common(&self) -> Common;

    /// Replaces the common settings.
    fn set_common(&mut self, common: Common);
}

/// Implements [`SqlOptions`] for a backend's options struct whose common settings are fields
/// of the same names as [`Common`]'s, and whose `from_url` parses its URLs, and gives it a
/// builder method per common setting.
#[macro_export]
macro_rules! impl_sql_options {
    ($options:ty) => {
        impl $options {
            /// Sets the lease: how long a worker's claim on a message lasts without renewal.
            #[must_use]
            pub fn lease(mut self, lease: ::std::time::Duration) -> Self {
                self.lease = lease;
                self
            }

            /// Sets how often idle consumers look for messages nobody announced.
            #[must_use]
            pub fn poll_interval(mut self, interval: ::std::time::Duration) -> Self {
                self.poll_interval = interval;
                self
            }

            /// Sets how long dead letters are kept.
            #[must_use]
            pub fn dead_letter_ttl(mut self, ttl: ::std::time::Duration) -> Self {
                self.dead_letter_ttl = ttl;
                self
            }

            /// Sets the largest accepted message, in bytes.
            #[must_use]
            pub fn max_message_size(mut self, limit: usize) -> Self {
                self.max_message_size = limit;
                self
            }

            /// Sets the number of connections in the main pool (at least 1).
            #[must_use]
            pub fn max_connections(mut self, n: u32) -> Self {
                self.max_connections = n.max(1);
                self
            }
        }

        impl $crate::SqlOptions for $options {
            fn parse_url(url: &str) -> ::troupe_core::Result<Self> {
                Self::from_url(url)
            }

            fn common(&self) -> $crate::Common {
                $crate::Common::new(
                    self.lease,
                    self.poll_interval,
                    self.dead_letter_ttl,
                    self.max_message_size,
                    self.max_connections,
                )
            }

            fn set_common(&mut self, common: $crate::Common) {
                self.lease = common.lease;
                self.poll_interval = common.poll_interval;
                self.dead_letter_ttl = common.dead_letter_ttl;
                self.max_message_size = common.max_message_size;
                self.max_connections = common.max_connections;
            }
        }
    };
}

/// One `key=value` pair of a URL's query.
#[derive(Clone, Copy, Debug)]
pub struct Setting<'a> {
    /// The key.
    pub key: &'a str,
    /// The value (empty when the pair has no `=`).
    pub value: &'a str,
    /// The pair as written.
    pub pair: &'a str,
    backend: &'static str,
}

impl Setting<'_> {
    /// The value as a duration (`30s`, `250ms`, `7days`).
    ///
    /// # Errors
    /// [`Error::Config`] naming the key and the value.
    pub fn duration(&self) -> Result<Duration> {
        humantime::parse_duration(self.value).map_err(|e| self.bad(e))
    }

    /// The value as a non-negative integer.
    ///
    /// # Errors
    /// [`Error::Config`] naming the key and the value.
    pub fn number(&self) -> Result<u64> {
        self.value.parse::<u64>().map_err(|e| self.bad(e))
    }

    /// An error saying the value is bad, and why.
    #[must_use]
    pub fn bad(&self, why: impl std::fmt::Display) -> Error {
        Error::Config(format!(
            "bad value {:?} for `{}` in the {} URL: {why}",
            self.value, self.key, self.backend
        ))
    }
}

/// Reads the `&`-separated settings of a URL's query: common ones go into `common`, the rest
/// to `other`, which says whether it took the setting. A setting nobody takes is an error
/// listing the known ones (`other_keys` after the common ones).
///
/// # Errors
/// [`Error::Config`]: a bad value or an unknown setting.
pub fn parse_query<'q>(
    backend: &'static str,
    query: &'q str,
    common: &mut Common,
    other_keys: &[&str],
    mut other: impl FnMut(&Setting<'q>) -> Result<bool>,
) -> Result<()> {
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let setting = Setting {
            key,
            value,
            pair,
            backend,
        };
        if common.apply(&setting)? || other(&setting)? {
            continue;
        }
        let known: Vec<&str> = Common::KEYS.iter().chain(other_keys).copied().collect();
        return Err(Error::Config(format!(
            "unknown setting `{}` in the {backend} URL; known: {}",
            // Escaped: a key with a line break must not break the one-line error.
            key.escape_debug(),
            known.join(", ")
        )));
    }
    Ok(())
}

/// A duration in milliseconds, as SQL integers hold them (saturating).
#[must_use]
pub fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> Common {
        Common::new(
            Duration::from_secs(30),
            Duration::from_millis(50),
            Duration::from_secs(60),
            1024,
            4,
        )
    }

    #[test]
    fn common_and_backend_settings() {
        let mut common = defaults();
        let mut seen = Vec::new();
        parse_query(
            "Test",
            "lease=5s&mode=x&max_connections=0&&max_message_size=10",
            &mut common,
            &["mode"],
            |s| {
                if s.key == "mode" {
                    seen.push(s.value.to_owned());
                    return Ok(true);
                }
                Ok(false)
            },
        )
        .unwrap();
        assert_eq!(common.lease, Duration::from_secs(5));
        assert_eq!(common.max_connections, 1, "at least one connection");
        assert_eq!(common.max_message_size, 10);
        assert_eq!(seen, ["x"]);
    }

    #[test]
    fn errors_name_the_setting() {
        let mut common = defaults();
        let e = parse_query("Test", "lease=soon", &mut common, &[], |_| Ok(false))
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"soon\" for `lease` in the Test URL"), "{e}");
        let e = parse_query("Test", "nope=1", &mut common, &["mode"], |_| Ok(false))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("unknown setting `nope` in the Test URL; known: lease,") && e.ends_with("mode"),
            "{e}"
        );
    }
}
