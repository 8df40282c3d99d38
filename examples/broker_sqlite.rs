//! The shop app (`examples/brokers/shop.rs`) on the embedded SQLite broker: no server needed.
//!
//! ```text
//! cargo run --example broker_sqlite                         # ./troupe-shop.db
//! cargo run --example broker_sqlite -- sqlite:///tmp/s.db   # another file (results in it too)
//! ```

#[path = "brokers/shop.rs"]
mod shop;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let url = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "sqlite://troupe-shop.db".to_owned());
    shop::main_with(&url, &url).await
}
