#[troupe::actor]
async fn f((a, b): (u8, u8), _: u8, text: impl Into<String>) -> impl std::fmt::Debug {
    let _ = text.into();
    a + b
}

fn main() {}
