//! The shop app (`examples/brokers/shop.rs`) on PostgreSQL, with results in the same database
//! (Troupe's tables live in the schema `troupe`, created on first use).
//!
//! ```text
//! createdb test                   # any PostgreSQL 12+; the role needs CREATE on the database
//! cargo run -p troupe --features full --example broker_postgres
//! cargo run -p troupe --features full --example broker_postgres -- postgres://USER:PASSWORD@HOST/DB postgres://USER:PASSWORD@HOST/DB
//! ```

#[path = "brokers/shop.rs"]
mod shop;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let url = "postgres://postgres@127.0.0.1:5432/test";
    shop::main_with(url, url).await
}
