//! Compile tests of `#[troupe::actor]`: what it accepts (`ui/pass`, each also run) and the
//! errors it reports (`ui/fail`, against their `.stderr`).
//!
//! Regenerate the expected errors with `TRYBUILD=overwrite cargo test -p troupe --test macros`.

#[test]
fn actor_macro() {
    let t = trybuild::TestCases::new();
    t.pass("tests/ui/pass/*.rs");
    t.compile_fail("tests/ui/fail/*.rs");
}
