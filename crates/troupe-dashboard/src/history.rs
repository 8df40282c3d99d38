//! Throughput over the last hour: the live workers' per-minute counts (each worker keeps its
//! last hour and sends it with every heartbeat), summed.

use std::collections::BTreeMap;

use troupe_core::{WorkerInfo, now_ms};

use crate::pages::Bar;

/// Minutes shown.
const MINUTES: u64 = 60;

/// Bars for the last hour's minutes (processed, dead-lettered), scaled to the busiest.
pub(crate) fn chart(workers: &[WorkerInfo]) -> Vec<Bar> {
    let mut per_minute: BTreeMap<u64, (u64, u64)> = BTreeMap::new();
    for w in workers {
        for [minute, processed, failed] in &w.minutes {
            let entry = per_minute.entry(*minute).or_default();
            entry.0 += processed;
            entry.1 += failed;
        }
    }
    let now = now_ms() / 60_000;
    let first = now + 1 - MINUTES;
    let top = per_minute
        .range(first..=now)
        .map(|(_, (p, f))| p + f)
        .max()
        .unwrap_or(0)
        .max(1);
    (0..MINUTES)
        .map(|i| {
            let minute = first + i;
            let (p, f) = per_minute.get(&minute).copied().unwrap_or((0, 0));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_add_up_per_minute() {
        let now = now_ms() / 60_000;
        let mut a = WorkerInfo::new("a", vec![], 1, std::time::Duration::from_secs(15));
        a.minutes = vec![[now - 1, 10, 1], [now, 4, 0]];
        let mut b = WorkerInfo::new("b", vec![], 1, std::time::Duration::from_secs(15));
        b.minutes = vec![[now, 6, 2], [now - 90, 100, 0]];
        let bars = chart(&[a, b]);
        assert_eq!(bars.len(), 60);
        let last = &bars[59];
        assert_eq!((last.processed, last.failed), (10, 2));
        assert_eq!((bars[58].processed, bars[58].failed), (10, 1));
        assert!(
            last.processed_height + last.failed_height >= 98,
            "the busiest minute fills the chart"
        );
        assert!(
            bars.iter().map(|b| b.processed).sum::<u64>() == 20,
            "older than an hour is left out"
        );
    }
}
