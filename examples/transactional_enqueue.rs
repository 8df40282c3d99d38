//! Transactional enqueue on PostgreSQL: the welcome email of the email pipeline is enqueued in
//! the same transaction as the sign-up row, so the message exists if and only if the sign-up
//! committed. This is what the seed team's hand-written `task_queue` table gave them, kept.
//!
//! ```text
//! cargo run --example transactional_enqueue --features broker-postgres -- \
//!     --database-url postgres://postgres@127.0.0.1:5432/test
//! ```

use std::sync::Arc;
use std::time::Duration;

use troupe::postgres::sqlx;
use troupe::postgres::{PostgresBroker, PostgresOptions};
use troupe::prelude::*;

/// Sends the welcome email (here: prints it).
#[troupe::actor(queue_name = "email", max_retries = 3)]
async fn send_welcome(address: String) {
    println!("  worker: welcome email sent to {address}");
}

/// Signs a user up and enqueues the welcome email in one transaction; `fail` makes the
/// transaction roll back after both writes.
async fn sign_up(broker: &PostgresBroker, address: &str, fail: bool) -> Result<(), Box<dyn std::error::Error>> {
    let mut tx = broker.pool().begin().await?;
    sqlx::query("INSERT INTO example_users (address) VALUES ($1)")
        .bind(address)
        .execute(&mut *tx)
        .await?;
    broker
        .enqueue_in(&mut tx, SendWelcome.message(address.to_owned())?, None)
        .await?;
    if fail {
        tx.rollback().await?;
        println!("sign-up of {address}: rolled back (the user row and the email both vanish)");
    } else {
        tx.commit().await?;
        println!("sign-up of {address}: committed (the user row and the email both exist)");
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let mut url = String::from("postgres://postgres@127.0.0.1:5432/test");
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--database-url" => url = args.next().ok_or("--database-url needs a URL")?,
            other => {
                return Err(
                    format!("unknown argument {other:?}; usage: transactional_enqueue [--database-url URL]").into(),
                );
            }
        }
    }
    let schema = format!("troupe_example_{}", std::process::id());
    let broker = PostgresBroker::open(PostgresOptions::from_url(&url)?.schema(schema.clone())).await?;
    sqlx::query("CREATE TABLE example_users (address text PRIMARY KEY)")
        .execute(broker.pool())
        .await?;

    sign_up(&broker, "ada@example.com", false).await?;
    sign_up(&broker, "bob@example.com", true).await?;
    let stats = broker.stats("email").await?;
    println!("queue \"email\": {} message(s) ready", stats.ready);

    let app = App::builder(Arc::new(broker.clone())).actor(SendWelcome).build()?;
    let worker = Worker::builder(app.clone()).concurrency(2).start().await?;
    app.join("email", Duration::from_secs(30)).await?;
    worker.stop().await;

    let users: Vec<String> = sqlx::query_scalar("SELECT address FROM example_users ORDER BY address")
        .fetch_all(broker.pool())
        .await?;
    println!("users: {users:?}");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE")))
        .execute(broker.pool())
        .await?;
    Ok(())
}
