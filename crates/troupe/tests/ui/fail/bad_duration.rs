#[troupe::actor(time_limit = "5 parsecs")]
async fn slow() {}

#[troupe::actor(min_backoff = "1500us")]
async fn precise() {}

#[troupe::actor(max_age = -1)]
async fn negative() {}

fn main() {}
