#[troupe::actor(queue = "math")]
async fn add(x: i64, y: i64) -> i64 {
    x + y
}

#[troupe::actor(retries = 3)]
async fn sub(x: i64, y: i64) -> i64 {
    x - y
}

fn main() {}
