//! Throughput over the last hour, sampled every 10 s from the workers' heartbeats (messages
//! processed) and the dead-letter counts (messages that failed for good), kept per minute
//! since the dashboard started.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Weak;
use std::time::Duration;

use troupe_core::now_ms;

use crate::Shared;
use crate::pages::Bar;

/// Minutes shown.
const MINUTES: usize = 60;

/// Per-minute counts, and what the last sample saw.
#[derive(Debug, Default)]
pub(crate) struct History {
    /// (minute since the epoch, processed, failed), oldest first.
    minutes: VecDeque<(u64, u64, u64)>,
    /// Each live worker's `processed` at the last sample.
    processed: BTreeMap<String, u64>,
    /// The dead letters of every queue at the last sample.
    dead: Option<u64>,
}

impl History {
    /// Adds a sample: the workers' processed counts and the total of dead letters, at `now`.
    pub(crate) fn add(&mut self, now: u64, workers: &[(String, u64)], dead: u64) {
        let mut processed = 0;
        for (id, n) in workers {
            // A worker seen for the first time counts from here; counts never go backwards.
            let before = self.processed.get(id).copied().unwrap_or(*n);
            processed += n.saturating_sub(before);
        }
        self.processed = workers.iter().cloned().collect();
        let failed = self.dead.map_or(0, |d| dead.saturating_sub(d));
        self.dead = Some(dead);
        let minute = now / 60_000;
        match self.minutes.back_mut() {
            Some((m, p, f)) if *m == minute => {
                *p += processed;
                *f += failed;
            }
            _ => self.minutes.push_back((minute, processed, failed)),
        }
        while self
            .minutes
            .front()
            .is_some_and(|(m, _, _)| *m + (MINUTES as u64) <= minute)
        {
            self.minutes.pop_front();
        }
    }

    /// Bars for the last hour's minutes, scaled to the busiest.
    pub(crate) fn chart(&self) -> Vec<Bar> {
        let now = now_ms() / 60_000;
        let top = self.minutes.iter().map(|(_, p, f)| p + f).max().unwrap_or(0).max(1);
        (0..MINUTES as u64)
            .map(|i| {
                let minute = now + 1 - MINUTES as u64 + i;
                let (p, f) = self
                    .minutes
                    .iter()
                    .find(|(m, _, _)| *m == minute)
                    .map_or((0, 0), |(_, p, f)| (*p, *f));
                let scale = |n: u64| n * 100 / top;
                Bar {
                    x: i * 10,
                    processed: p,
                    failed: f,
                    processed_height: scale(p),
                    failed_height: scale(f),
                    processed_y: 100 - scale(p),
                    failed_y: 100 - scale(p) - scale(f),
                }
            })
            .collect()
    }
}

/// Samples every 10 s while the dashboard lives.
pub(crate) fn start_sampler(shared: Weak<Shared>) {
    tokio::spawn(async move {
        loop {
            let Some(s) = shared.upgrade() else { return };
            let broker = s.app.broker();
            if let Ok(workers) = broker.workers().await {
                let mut dead = 0;
                let queues = broker.queue_names().await.unwrap_or_default();
                for q in &queues {
                    dead += broker.stats(q).await.map(|st| st.dead).unwrap_or(0);
                }
                let processed: Vec<(String, u64)> = workers.iter().map(|w| (w.id.clone(), w.processed)).collect();
                if let Ok(mut h) = s.history.lock() {
                    h.add(now_ms(), &processed, dead);
                }
            }
            drop(s);
            tokio::time::sleep(Duration::from_secs(10)).await;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_add_up_per_minute() {
        let mut h = History::default();
        let t = 1_000 * 60_000;
        h.add(t, &[("a".into(), 10)], 2);
        h.add(t + 10_000, &[("a".into(), 15), ("b".into(), 7)], 3);
        h.add(t + 70_000, &[("a".into(), 20), ("b".into(), 9)], 3);
        let minutes: Vec<_> = h.minutes.iter().copied().collect();
        assert_eq!(minutes, [(1000, 5, 1), (1001, 7, 0)]);
    }
}
