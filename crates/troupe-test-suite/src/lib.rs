//! The broker conformance suite: the behaviour every Troupe broker shares (design §4), written
//! once and run against every backend.
//!
//! A backend crate instantiates it in a test file with a [`Harness`]:
//!
//! ```text
//! troupe_test_suite::broker_conformance!(my_backend::testing::Harness::from_env());
//! ```
//!
//! Each case is a plain `async fn` in [`cases`], so a failure can be debugged like any test.
//! Cases use queue names of their own, so one broker may serve them all.

// The suite's job is to panic on a violation.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::missing_panics_doc)]

pub mod backends;
pub mod cases;
pub mod chaos;
pub mod coordination;
pub mod groups;
pub mod kill;
pub mod lifecycle;
pub mod operations;
pub mod periodic;
pub mod servers;
mod support;
pub mod tasks;
pub mod tls;

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use troupe_core::{Broker, MemoryResults, MemoryState, Result, ResultBackend, StateBackend};

pub use support::{COUNT_QUEUE, Call, Count, TestActor, counting_app, eventually, unique_queue};

/// Puts raw bytes on a queue, bypassing the encoder (to test bad input).
pub type RawEnqueue = Arc<dyn Fn(String, Vec<u8>) -> BoxFuture<'static, Result<()>> + Send + Sync>;

/// A broker under test, with what the cases need to know about it.
#[derive(Clone)]
#[non_exhaustive]
pub struct TestBroker {
    /// The broker.
    pub broker: Arc<dyn Broker>,
    /// Raw enqueue, bypassing the encoder.
    pub raw: RawEnqueue,
    /// The longest time the broker takes to redeliver the messages of a consumer that died
    /// without acking them.
    pub redelivery_timeout: Duration,
    /// The message size limit the broker was configured with.
    pub max_message_size: usize,
    /// The results backend the cases that store results use (the backend's own when it has
    /// one; memory otherwise).
    pub results: Arc<dyn ResultBackend>,
    /// The state backend the lifecycle cases keep task states in (the backend's own when it
    /// has one; memory otherwise).
    pub state: Arc<dyn StateBackend>,
}

impl std::fmt::Debug for TestBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestBroker")
            .field("broker", &self.broker)
            .field("redelivery_timeout", &self.redelivery_timeout)
            .field("max_message_size", &self.max_message_size)
            .finish_non_exhaustive()
    }
}

impl TestBroker {
    /// A test broker from its parts.
    #[must_use]
    pub fn new(
        broker: Arc<dyn Broker>,
        raw: RawEnqueue,
        redelivery_timeout: Duration,
        max_message_size: usize,
    ) -> Self {
        Self {
            broker,
            raw,
            redelivery_timeout,
            max_message_size,
            results: MemoryResults::new().into_dyn(),
            state: Arc::new(MemoryState::new()),
        }
    }

    /// Uses `state` in the lifecycle cases.
    #[must_use]
    pub fn with_state(mut self, state: Arc<dyn StateBackend>) -> Self {
        self.state = state;
        self
    }

    /// Uses `results` in the cases that store results.
    #[must_use]
    pub fn with_results(mut self, results: Arc<dyn ResultBackend>) -> Self {
        self.results = results;
        self
    }
}

/// Connects the suite to a backend.
pub trait Harness: Send + Sync + 'static {
    /// A broker to run one case against. It must fail (panic), not skip, when the server is
    /// missing.
    fn setup(&self) -> BoxFuture<'_, TestBroker>;
}

/// The in-memory broker's harness.
#[derive(Clone, Copy, Debug, Default)]
pub struct MemoryHarness;

impl Harness for MemoryHarness {
    fn setup(&self) -> BoxFuture<'_, TestBroker> {
        Box::pin(async {
            let limit = 64 * 1024;
            let broker = troupe_core::MemoryBroker::new().with_max_message_size(limit);
            let raw_broker = broker.clone();
            let raw: RawEnqueue = Arc::new(move |queue, bytes| {
                let b = raw_broker.clone();
                Box::pin(async move { b.enqueue_raw(&queue, bytes) })
            });
            TestBroker::new(Arc::new(broker), raw, Duration::from_millis(100), limit)
        })
    }
}

/// Stamps one `#[tokio::test]` per conformance case, each calling [`cases`] with a broker from
/// `$harness`. The calling crate needs `tokio` (with `macros` and `rt-multi-thread`).
#[macro_export]
macro_rules! broker_conformance {
    ($harness:expr) => {
        $crate::__conformance_cases!(
            $harness, cases;
            enqueue_consume_ack,
            a_resized_consumer_loses_and_repeats_nothing,
            fifo_within_a_queue,
            nack_dead_letters_with_reason,
            dead_letters_requeue_and_purge,
            requeue_returns_without_retry,
            unacked_messages_are_redelivered,
            out_of_order_settles_touch_only_their_own_messages,
            a_late_ack_does_not_touch_the_redelivered_message,
            stats_and_purge,
            oversized_message_rejected_on_enqueue,
            enqueue_many_keeps_order_and_delays,
            send_many_runs_each_once,
            worker_runs_actor_and_acks,
            app_join_waits_for_the_drain_and_fails_fast,
            kwargs_bind_by_name,
            delayed_message_not_started_before_eta,
            delayed_messages_do_not_block_ready_ones,
            retries_reenqueue_with_backoff,
            retries_exhausted_go_to_dead_letters,
            fail_permanently_skips_retries,
            bad_input_goes_to_dead_letters,
            bad_input_corpus_is_dead_lettered_or_refused,
            actor_priority_orders_prefetched_work,
            broker_delivers_lower_priorities_first,
            urgent_message_overtakes_a_backlog,
            a_quiet_queue_overtakes_another_queues_prefetched_messages,
            graceful_shutdown_returns_prefetched_and_delayed,
            time_limit_fails_and_retries,
            panics_are_failures,
            results_are_stored,
            pipelines_pass_results_on
        );
        $crate::__conformance_cases!(
            $harness, lifecycle;
            task_state_follows_a_message_through_the_worker,
            cancel_while_the_worker_is_stopped,
            cancel_stops_a_running_async_actor,
            cancel_abandons_a_running_blocking_actor,
            cancel_pending_only_lets_running_work_finish,
            cancel_unknown_or_finished_ids_are_told_apart,
            unique_sends_return_the_first_id,
            unique_key_frees_itself_when_unique_for_passes,
            progress_is_readable_while_the_task_runs,
            progress_soft_time_limit_tells_the_actor
        );
        $crate::__conformance_cases!(
            $harness, groups;
            group_results_come_in_order,
            group_completion_callback_fires_once_after_every_child,
            group_finished_callback_gets_every_outcome,
            group_callbacks_are_refused_without_their_needs,
            group_inside_a_pipeline_feeds_the_next_stage
        );
        $crate::__conformance_cases!(
            $harness, operations;
            dead_letters_are_deleted_by_id,
            declared_queues_are_listed,
            worker_heartbeats_are_listed_until_they_expire,
            a_running_worker_is_listed_with_what_it_holds,
            peek_pages_through_waiting_messages
        );
        $crate::__conformance_cases!(
            $harness, periodic;
            periodic_actor_runs_once_per_tick_across_workers,
            missed_ticks_are_skipped_or_run_once
        );
    };
}

/// Stamps one `#[tokio::test]` per results-backend case; `$setup` is an async expression
/// giving an `Arc<dyn ResultBackend>`.
#[macro_export]
macro_rules! results_conformance {
    ($setup:expr) => {
        $crate::__backend_cases!(
            $setup, backends;
            results_store_and_get,
            results_failures_round_trip,
            results_block_until_stored_or_timeout,
            results_expire
        );
    };
}

/// Stamps one `#[tokio::test]` per state-backend case, the task-store cases ([`tasks`]) and
/// the rate-limit and barrier cases ([`coordination`]) included; `$setup` is an async expression giving an `Arc<dyn StateBackend>`.
#[macro_export]
macro_rules! state_conformance {
    ($setup:expr) => {
        $crate::__backend_cases!(
            $setup, backends;
            state_counters_respect_bounds,
            state_keys_expire,
            state_window_sums,
            state_concurrent_increments_are_atomic,
            state_wait_and_notify
        );
        $crate::__backend_cases!(
            $setup, tasks;
            task_state_records_follow_versions,
            task_state_record_many_applies_each_by_its_version,
            task_state_queries_filter_and_page,
            task_state_counts_per_status_actor_and_queue,
            task_state_delete_and_expire,
            progress_is_stored_with_the_record,
            cancel_requests_are_kept_and_marked,
            cancel_requests_wake_a_watcher,
            unique_keys_are_claimed_once,
            unique_claims_race_to_one_winner
        );
        $crate::__backend_cases!(
            $setup, coordination;
            rate_limit_concurrent_admits_up_to_its_limit,
            rate_limit_concurrent_guard_releases_on_drop_panic_and_cancel,
            rate_limit_concurrent_dead_holder_frees_with_its_lease,
            rate_limit_concurrent_contention_never_exceeds_its_limit,
            rate_limit_when_limited_retries_skips_or_waits,
            rate_limit_bucket_admits_its_limit_per_bucket,
            rate_limit_window_admits_its_limit_per_window,
            barrier_clears_when_every_party_arrives,
            barrier_wait_times_out,
            barrier_arrivals_count_each_party_once,
            coordination_lists_holders_and_arrivals
        );
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __backend_cases {
    ($setup:expr, $module:ident; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let backend = $setup.await;
                $crate::$module::$case(backend).await;
            }
        )*
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_cases {
    ($harness:expr, $module:ident; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let broker = $crate::Harness::setup(&$harness).await;
                $crate::$module::$case(&broker).await;
            }
        )*
    };
}
