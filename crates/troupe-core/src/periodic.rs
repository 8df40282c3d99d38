//! Periodic actors: `#[actor(cron = "0 */5 * * * *")]` or `#[actor(every = "30s")]`.
//!
//! A worker that consumes a periodic actor's queue sends the actor one message (no arguments)
//! at each tick of its schedule. However many worker processes and hosts run it, each tick is
//! sent once: the workers race to move the actor's last-tick key on the state backend from the
//! previous tick to this one (a bounded increment, atomic on every backend), and only the winner
//! sends. A message carries its tick in the `troupe_tick` option (ms since the epoch), and
//! `troupe_missed: true` when it stands for ticks missed while no worker ran.
//!
//! Ticks missed while every worker was stopped follow the actor's [`MissedTicks`] policy:
//! skipped (the default), or run once. A worker that crashes between winning a tick and
//! sending its message loses that tick (at most once per tick, never twice).

use std::str::FromStr;
use std::time::Duration;

use crate::error::{Error, Result};

/// The message option carrying a periodic message's tick (ms since the epoch).
pub const TICK_OPTION: &str = "troupe_tick";

/// The message option set on a message that stands for missed ticks.
pub const MISSED_OPTION: &str = "troupe_missed";

/// The state-backend key holding a periodic actor's last sent tick (ms since the epoch).
#[must_use]
pub fn last_tick_key(actor: &str) -> String {
    format!("troupe-periodic:{actor}")
}

/// What a periodic actor does with ticks missed while no worker ran.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum MissedTicks {
    /// Skip them: the next tick runs as usual.
    #[default]
    Skip,
    /// Run once for all of them, as soon as a worker is back (the message has
    /// `troupe_missed: true`).
    RunOnce,
}

impl MissedTicks {
    /// The policy's name, as `#[actor(missed = ...)]` takes it.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Skip => "skip",
            Self::RunOnce => "run_once",
        }
    }
}

impl FromStr for MissedTicks {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "skip" => Ok(Self::Skip),
            "run_once" => Ok(Self::RunOnce),
            other => Err(Error::Config(format!(
                "unknown missed-ticks policy {other:?}; use \"skip\" or \"run_once\""
            ))),
        }
    }
}

/// When a periodic actor's ticks fall.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum Schedule {
    /// A cron expression (with seconds) read in a time zone.
    Cron {
        /// The parsed expression.
        schedule: Box<cron::Schedule>,
        /// The time zone it is read in.
        timezone: chrono_tz::Tz,
    },
    /// Every this long, counted from the Unix epoch (`every = "5m"` ticks at :00, :05, ...).
    Every(Duration),
}

impl Schedule {
    /// Parses a cron expression with seconds (`sec min hour day-of-month month day-of-week
    /// [year]`) in the IANA time zone `timezone` (such as `"Europe/Paris"`; `"UTC"`).
    ///
    /// # Errors
    /// [`Error::Config`] for an expression or a time zone that does not parse.
    pub fn cron(expression: &str, timezone: &str) -> Result<Self> {
        let schedule = cron::Schedule::from_str(expression).map_err(|e| {
            Error::Config(format!(
                "invalid cron expression {expression:?}: {e}; expected six or seven fields with seconds first, \
                 such as \"0 */5 * * * *\" (every five minutes)"
            ))
        })?;
        let timezone = chrono_tz::Tz::from_str(timezone).map_err(|_| {
            Error::Config(format!(
                "unknown time zone {timezone:?}; use an IANA name such as \"UTC\" or \"Europe/Paris\""
            ))
        })?;
        Ok(Self::Cron {
            schedule: Box::new(schedule),
            timezone,
        })
    }

    /// Every `period` (at least 1 ms), counted from the Unix epoch.
    ///
    /// # Errors
    /// [`Error::Config`] for a period under 1 ms.
    pub fn every(period: Duration) -> Result<Self> {
        if period < Duration::from_millis(1) {
            return Err(Error::Config(format!(
                "a periodic actor's period must be at least 1ms, got {period:?}"
            )));
        }
        Ok(Self::Every(period))
    }

    /// The first tick strictly after `t` (ms since the epoch), if any.
    #[must_use]
    pub fn next_after(&self, t: u64) -> Option<u64> {
        match self {
            Self::Every(period) => {
                let p = crate::message::duration_ms(*period).max(1);
                Some((t / p + 1) * p)
            }
            Self::Cron { schedule, timezone } => {
                let at = chrono::DateTime::from_timestamp_millis(i64::try_from(t).ok()?)?.with_timezone(timezone);
                let next = schedule.after(&at).next()?;
                u64::try_from(next.timestamp_millis()).ok()
            }
        }
    }

    /// The latest tick at or before `t`, if any.
    #[must_use]
    pub fn latest_at_or_before(&self, t: u64) -> Option<u64> {
        match self {
            Self::Every(period) => {
                let p = crate::message::duration_ms(*period).max(1);
                Some(t / p * p)
            }
            Self::Cron { schedule, timezone } => {
                // Ticks strictly after t - 1 ms... walk back from t + 1 ms.
                let at = chrono::DateTime::from_timestamp_millis(i64::try_from(t.checked_add(1)?).ok()?)?
                    .with_timezone(timezone);
                let prev = schedule.after(&at).next_back()?;
                u64::try_from(prev.timestamp_millis()).ok().filter(|p| *p <= t)
            }
        }
    }

    /// The latest tick strictly before `t`, if any.
    #[must_use]
    pub fn latest_before(&self, t: u64) -> Option<u64> {
        t.checked_sub(1).and_then(|t| self.latest_at_or_before(t))
    }

    /// About how long between two ticks (the next two after `t`), for key lifetimes.
    #[must_use]
    pub fn period_near(&self, t: u64) -> Duration {
        match self {
            Self::Every(period) => *period,
            Self::Cron { .. } => {
                let first = self.next_after(t);
                let second = first.and_then(|f| self.next_after(f));
                match (first, second) {
                    (Some(a), Some(b)) => Duration::from_millis(b.saturating_sub(a)),
                    _ => Duration::from_secs(86_400),
                }
            }
        }
    }
}

/// A periodic actor's schedule and policy, from its options.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Periodic {
    /// When its ticks fall.
    pub schedule: Schedule,
    /// What it does with missed ticks.
    pub missed: MissedTicks,
}

impl Periodic {
    /// The schedule an actor's options set (`cron` with `timezone`, or `every`), if any.
    ///
    /// # Errors
    /// [`Error::Config`] for both `cron` and `every`, an expression or time zone that does not
    /// parse, or `timezone`/`missed` without a schedule.
    pub fn of(actor: &str, options: &crate::ActorOptions) -> Result<Option<Self>> {
        let schedule = match (&options.cron, options.every) {
            (Some(_), Some(_)) => {
                return Err(Error::Config(format!(
                    "actor {actor} sets both cron and every; a periodic actor has one schedule"
                )));
            }
            (Some(expr), None) => Schedule::cron(expr, options.timezone.as_deref().unwrap_or("UTC"))
                .map_err(|e| Error::Config(format!("actor {actor}: {e}")))?,
            (None, Some(period)) => {
                if options.timezone.is_some() {
                    return Err(Error::Config(format!(
                        "actor {actor} sets a timezone for `every`, which counts from the Unix epoch; use cron for wall-clock times"
                    )));
                }
                Schedule::every(period).map_err(|e| Error::Config(format!("actor {actor}: {e}")))?
            }
            (None, None) => {
                if options.timezone.is_some() || options.missed.is_some() {
                    return Err(Error::Config(format!(
                        "actor {actor} sets timezone or missed without a schedule; add cron or every"
                    )));
                }
                return Ok(None);
            }
        };
        Ok(Some(Self {
            schedule,
            missed: options.missed.unwrap_or_default(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: u64 = 60_000;

    #[test]
    fn every_counts_from_the_epoch() {
        let s = Schedule::every(Duration::from_secs(300)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(s.next_after(0), Some(5 * MIN));
        assert_eq!(s.next_after(5 * MIN), Some(10 * MIN));
        assert_eq!(s.latest_at_or_before(5 * MIN), Some(5 * MIN));
        assert_eq!(s.latest_at_or_before(5 * MIN + 1), Some(5 * MIN));
        assert_eq!(s.latest_before(5 * MIN), Some(0));
    }

    #[test]
    fn cron_in_a_time_zone() {
        // 09:00 every day in Paris: 08:00 UTC in winter (2026-12-02 is in winter).
        let s = Schedule::cron("0 0 9 * * *", "Europe/Paris").unwrap_or_else(|e| panic!("{e}"));
        let noon_utc = 1_796_212_800_000; // 2026-12-02T12:00:00Z
        let nine_paris = 1_796_198_400_000; // 2026-12-02T08:00:00Z
        assert_eq!(s.latest_at_or_before(noon_utc), Some(nine_paris));
        assert_eq!(s.latest_at_or_before(nine_paris), Some(nine_paris));
        assert_eq!(s.next_after(nine_paris), Some(nine_paris + 24 * 60 * MIN));
        assert_eq!(s.latest_before(nine_paris), Some(nine_paris - 24 * 60 * MIN));
        assert_eq!(s.period_near(noon_utc), Duration::from_secs(86_400));
    }

    #[test]
    fn bad_schedules_say_how_to_fix_them() {
        let e = Schedule::cron("*/5 * * * *", "UTC").unwrap_err().to_string();
        assert!(e.contains("seconds first"), "{e}");
        let e = Schedule::cron("0 * * * * *", "Mars/Olympus").unwrap_err().to_string();
        assert!(e.contains("IANA"), "{e}");
        assert!(Schedule::every(Duration::ZERO).is_err());
        let both = crate::ActorOptions::new()
            .cron("0 * * * * *")
            .every(Duration::from_secs(1));
        assert!(Periodic::of("a", &both).unwrap_err().to_string().contains("both"));
        assert!(Periodic::of("a", &crate::ActorOptions::new()).unwrap_or(None).is_none());
        assert_eq!("run_once".parse::<MissedTicks>().ok(), Some(MissedTicks::RunOnce));
        assert!("later".parse::<MissedTicks>().is_err());
    }
}
