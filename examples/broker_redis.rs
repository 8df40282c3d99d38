//! The shop app (`examples/brokers/shop.rs`) on Redis, with Python Dramatiq's key layout, and
//! results in the same Redis.
//!
//! ```text
//! redis-server --daemonize yes    # or any Redis 6.2+ (scripts/services.sh starts one here)
//! cargo run -p troupe --features full --example broker_redis
//! cargo run -p troupe --features full --example broker_redis -- redis://HOST:6379/0 redis://HOST:6379/0
//! ```

#[path = "brokers/shop.rs"]
mod shop;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    shop::main_with("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0").await
}
