#[troupe::actor(queue_name = "a", max_retries = 1, queue_name = "b")]
async fn add(x: i64, y: i64) -> i64 {
    x + y
}

fn main() {}
