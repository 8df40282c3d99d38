//! The scheduler of periodic actors (see [`troupe_core::periodic`]): one task per periodic
//! actor a worker consumes, sending one message per tick across every worker.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value};
use tokio_util::sync::CancellationToken;
use troupe_core::periodic::{MISSED_OPTION, MissedTicks, Periodic, TICK_OPTION, last_tick_key};
use troupe_core::{App, Message, StateBackend, now_ms};

/// How late a tick may be seen and still be sent as due (not missed): a worker wakes on time,
/// but a busy machine or a slow state backend may make it late.
const GRACE: Duration = Duration::from_secs(60);

/// The longest sleep between two looks at the schedule (clock changes, a long cron period).
const MAX_SLEEP: Duration = Duration::from_secs(60);

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// One periodic actor's scheduler.
pub(crate) struct Scheduler {
    pub(crate) app: App,
    pub(crate) state: Arc<dyn StateBackend>,
    pub(crate) actor: String,
    pub(crate) queue: String,
    pub(crate) periodic: Periodic,
}

impl Scheduler {
    /// Runs until `stop`.
    pub(crate) async fn run(self, stop: CancellationToken) {
        tracing::info!(actor = %self.actor, "periodic actor scheduled");
        let mut failing = false;
        loop {
            // The next look is planned from when this one began: a tick that falls due while
            // this one sends (a slow backend, a loaded machine) is looked at right after, not
            // passed over and later counted as missed.
            let began = now_ms();
            match self.tick(began).await {
                Ok(()) if failing => {
                    tracing::info!(actor = %self.actor, "periodic actor scheduling again");
                    failing = false;
                }
                Ok(()) => {}
                Err(e) => {
                    if !failing {
                        tracing::warn!(actor = %self.actor, error = %e, "cannot send the periodic actor's tick; retrying");
                    }
                    failing = true;
                }
            }
            let now = now_ms();
            let wait = match self.periodic.schedule.next_after(began) {
                Some(next) => Duration::from_millis(next.saturating_sub(now)).min(MAX_SLEEP),
                None => MAX_SLEEP,
            };
            let wait = if failing {
                wait.min(Duration::from_secs(1))
            } else {
                wait
            };
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Looks at the schedule once: sends the due tick (and a catch-up for missed ticks, by the
    /// policy) when this worker wins it.
    async fn tick(&self, now: u64) -> troupe_core::Result<()> {
        let schedule = &self.periodic.schedule;
        let Some(due) = schedule.latest_at_or_before(now) else {
            return Ok(());
        };
        let period = schedule.period_near(due);
        let current = now.saturating_sub(due) < millis(GRACE.min(period));
        let ttl = (period * 3).max(Duration::from_secs(7 * 86_400));
        let key = last_tick_key(&self.actor);
        let due_i = i64::try_from(due).unwrap_or(i64::MAX);
        let missed = match self.state.get(&key).await? {
            None => {
                // Never sent (or its key expired): nothing counts as missed.
                if !self.state.add(&key, due_i, ttl).await? {
                    return Ok(());
                }
                false
            }
            Some(last) if last >= due_i => return Ok(()),
            Some(last) => {
                // Moves the key from `last` to `due`; a worker that read `last` after another
                // moved it would pass `due` and is refused.
                if !self.state.incr(&key, due_i - last, due_i, ttl).await? {
                    return Ok(());
                }
                let before = schedule
                    .latest_before(due)
                    .and_then(|t| i64::try_from(t).ok())
                    .is_some_and(|t| t > last);
                before || !current
            }
        };
        if missed {
            match self.periodic.missed {
                MissedTicks::RunOnce => {
                    tracing::info!(actor = %self.actor, "ticks were missed while no worker ran; running once for them");
                    self.send(due, true).await?;
                }
                _ => tracing::info!(actor = %self.actor, "ticks were missed while no worker ran; skipping them"),
            }
        }
        if current {
            self.send(due, false).await?;
        }
        Ok(())
    }

    async fn send(&self, tick: u64, missed: bool) -> troupe_core::Result<()> {
        let mut message = Message::new(self.queue.as_str(), self.actor.as_str(), Vec::new(), Map::new());
        message.options.insert(TICK_OPTION.into(), Value::from(tick));
        if missed {
            message.options.insert(MISSED_OPTION.into(), Value::Bool(true));
        }
        let sent = self.app.enqueue(message, None).await?;
        tracing::debug!(actor = %self.actor, tick, missed, message_id = %sent.message_id, "periodic message sent");
        Ok(())
    }
}
