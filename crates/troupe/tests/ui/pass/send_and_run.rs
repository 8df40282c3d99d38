//! End to end on the memory broker: send with the typed handle, run a worker, read the result.

use std::time::Duration;

use troupe::{App, MemoryBroker, MemoryResults, Worker};

#[troupe::actor(queue_name = "math", store_results = true)]
async fn add(x: i64, y: i64) -> i64 {
    x + y
}

#[troupe::actor(queue_name = "math", store_results = true)]
fn multiply(x: i64, y: i64) -> Result<i64, std::num::TryFromIntError> {
    Ok(i64::from(i32::try_from(x * y)?))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let broker = MemoryBroker::new();
    let app = App::builder(broker.clone().into_dyn())
        .results(MemoryResults::new().into_dyn())
        .actor(Add)
        .actor(Multiply)
        .build()?;
    let sum = Add.send(&app, 1, 2).await?;
    let product = Multiply.send(&app, 6, 7).await?;
    let worker = Worker::builder(app.clone()).concurrency(2).start().await?;
    broker.join("math", Duration::from_secs(10)).await?;
    worker.stop().await;
    assert_eq!(sum.get_result(&app).await?, 3);
    assert_eq!(product.get_result(&app).await?, 42);
    Ok(())
}
