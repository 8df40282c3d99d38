//! Broker URL parsing: any string is parsed by every backend's `from_url` into options or a
//! one-line error that never repeats a password.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(url) = std::str::from_utf8(data) else {
        return;
    };
    let redacted = troupe_core::redact_url(url);
    let password = password_of(url).filter(|p| p.len() >= 8 && !redacted.contains(*p));
    // The same URL with another password: a password that is also fixed text of an error
    // (`postgres` in "use postgres://USER:PASSWORD@...") is in that error either way.
    let other = password.map(|p| {
        let letter = if p.chars().all(|c| c == 'Z') { "Y" } else { "Z" };
        errors(&url.replacen(&format!(":{p}@"), &format!(":{}@", letter.repeat(p.len())), 1))
    });
    for (i, error) in errors(url).into_iter().enumerate() {
        let Some(error) = error else { continue };
        assert!(!error.contains('\n'), "one line: {error}");
        // A password of some length, written as user:password@, is never shown.
        if let (Some(password), Some(other)) = (password, &other) {
            let fixed_text = other[i].as_ref().is_some_and(|o| o.contains(password));
            assert!(
                fixed_text || !error.contains(password),
                "the password appears in {error:?}"
            );
        }
    }
});

/// Every backend's `from_url` error for `url`, in one order.
fn errors(url: &str) -> [Option<String>; 4] {
    [
        troupe_redis::RedisOptions::from_url(url).err().map(|e| e.to_string()),
        troupe_postgres::PostgresOptions::from_url(url)
            .err()
            .map(|e| e.to_string()),
        troupe_rabbitmq::RabbitmqOptions::from_url(url)
            .err()
            .map(|e| e.to_string()),
        troupe_sqlite::SqliteOptions::from_url(url).err().map(|e| e.to_string()),
    ]
}

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
