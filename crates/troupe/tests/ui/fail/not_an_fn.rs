#[troupe::actor]
struct NotAFunction;

fn main() {}
