//! The shop app (`examples/brokers/shop.rs`) on RabbitMQ, with Python Dramatiq's topology, and
//! results in Redis (RabbitMQ stores no results; Dramatiq users pair it with Redis too).
//!
//! ```text
//! rabbitmq-server -detached       # and a Redis for the results
//! cargo run -p troupe --features full --example broker_rabbitmq
//! cargo run -p troupe --features full --example broker_rabbitmq -- amqp://USER:PASSWORD@HOST:5672/%2f redis://HOST:6379/0
//! ```

#[path = "brokers/shop.rs"]
mod shop;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    shop::main_with("amqp://guest:guest@127.0.0.1:5672/%2f", "redis://127.0.0.1:6379/0").await
}
