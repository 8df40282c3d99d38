//! The conformance suite against the in-memory broker.

troupe_test_suite::broker_conformance!(troupe_test_suite::MemoryHarness);
