#[troupe::actor(priority = 11)]
async fn too_lazy() {}

#[troupe::actor(priority = -20)]
async fn too_urgent() {}

#[troupe::actor(priority = -10)]
async fn most_urgent() {}

fn main() {}
