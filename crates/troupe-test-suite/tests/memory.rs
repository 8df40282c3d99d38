//! The conformance suite against the in-memory broker.

troupe_test_suite::broker_conformance!(troupe_test_suite::MemoryHarness);

mod results {
    troupe_test_suite::results_conformance!(async { troupe_core::MemoryResults::new().into_dyn() });
}

mod state {
    troupe_test_suite::state_conformance!(async {
        std::sync::Arc::new(troupe_core::MemoryState::new()) as std::sync::Arc<dyn troupe_core::StateBackend>
    });
}
