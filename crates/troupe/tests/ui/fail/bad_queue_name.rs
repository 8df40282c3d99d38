#[troupe::actor(queue_name = "my queue")]
async fn spaced() {}

#[troupe::actor(queue_name = "1st")]
async fn digit() {}

fn main() {}
