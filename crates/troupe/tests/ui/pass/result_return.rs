//! `Result` returns: `Output` is the `Ok` type and the error converts into `ActorError`.

use troupe::{Actor, ActorError};

#[troupe::actor]
async fn parse(text: String) -> Result<i32, std::num::ParseIntError> {
    text.parse()
}

#[troupe::actor]
fn read(path: std::path::PathBuf) -> std::io::Result<Vec<u8>> {
    std::fs::read(path)
}

#[troupe::actor]
async fn refuse(why: String) -> Result<(), ActorError> {
    Err(ActorError::msg(why))
}

fn main() {
    let _: <Parse as Actor>::Output = 0_i32;
    let _: <Read as Actor>::Output = Vec::<u8>::new();
    let _: <Refuse as Actor>::Output = ();

    futures::executor::block_on(async {
        assert_eq!(Parse.call(("42".to_owned(),)).await.unwrap(), 42);
        let error = Parse.call(("x".to_owned(),)).await.unwrap_err();
        assert_eq!(error.type_name(), "ParseIntError");
        let error = Refuse.call(("no".to_owned(),)).await.unwrap_err();
        assert_eq!(error.message(), "no");
    });
}
