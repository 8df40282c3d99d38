#[troupe::actor(max_retries = "3", store_results = 1, queue_name = math, priority = 1.5)]
async fn add(x: i64, y: i64) -> i64 {
    x + y
}

fn main() {}
