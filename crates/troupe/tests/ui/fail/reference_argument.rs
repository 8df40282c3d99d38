#[troupe::actor]
async fn greet(name: &str) -> usize {
    name.len()
}

#[troupe::actor]
fn sum(values: &[i64], names: Vec<&'static str>) -> i64 {
    let _ = names;
    values.iter().sum()
}

fn main() {}
