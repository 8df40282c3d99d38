//! Broker URL parsing: any string is parsed by every backend's `from_url` into options or a
//! one-line error that never repeats a password.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(url) = std::str::from_utf8(data) else {
        return;
    };
    let errors = [
        troupe_redis::RedisOptions::from_url(url).err().map(|e| e.to_string()),
        troupe_postgres::PostgresOptions::from_url(url)
            .err()
            .map(|e| e.to_string()),
        troupe_rabbitmq::RabbitmqOptions::from_url(url)
            .err()
            .map(|e| e.to_string()),
        troupe_sqlite::SqliteOptions::from_url(url).err().map(|e| e.to_string()),
    ];
    let redacted = troupe_core::redact_url(url);
    for error in errors.into_iter().flatten() {
        assert!(!error.contains('\n'), "one line: {error}");
        // A password of some length, written as user:password@, is never shown.
        if let Some(password) = password_of(url)
            && password.len() >= 8
            && !redacted.contains(password)
        {
            assert!(!error.contains(password), "the password appears in {error:?}");
        }
    }
});

/// The password of `scheme://user:password@host`, when the string starts that way (a
/// URL-looking text inside a query value is a value, shown when it is bad).
fn password_of(url: &str) -> Option<&str> {
    let (scheme, rest) = url.split_once("://")?;
    if scheme.is_empty() || !scheme.chars().all(|c| c.is_ascii_alphanumeric() || c == '+') {
        return None;
    }
    let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
    let userinfo = authority.rsplit_once('@')?.0;
    Some(userinfo.split_once(':')?.1)
}
