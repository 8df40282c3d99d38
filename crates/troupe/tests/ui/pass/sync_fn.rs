//! A plain `fn` actor runs on the blocking pool; a panic becomes a failure.

use troupe::{Actor, ErrorAction};

#[troupe::actor(queue_name = "text")]
pub fn shout(text: String, times: usize) -> String {
    assert_ne!(std::thread::current().name(), Some("main"), "runs on the blocking pool");
    text.to_uppercase().repeat(times)
}

#[troupe::actor]
fn explode() -> u8 {
    panic!("boom")
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let _: <Shout as Actor>::Args = (String::new(), 0_usize);
    assert_eq!(Shout.name(), "shout");
    assert_eq!(Shout.options().queue_name, "text");
    assert_eq!(Shout.call(("hi".to_owned(), 2)).await.unwrap(), "HIHI");

    std::panic::set_hook(Box::new(|_| {}));
    let error = Explode.call(()).await.unwrap_err();
    assert_eq!(error.type_name(), "Panic");
    assert_eq!(error.message(), "boom");
    assert_eq!(error.action(), ErrorAction::Fail);
}
