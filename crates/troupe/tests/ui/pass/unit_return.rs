//! Actors returning nothing have `Output = ()`.

use troupe::Actor;

#[troupe::actor]
async fn log_line(line: String) {
    let _ = line;
}

#[troupe::actor]
fn explicit_unit(n: u8) -> () {
    let _ = n;
}

fn main() {
    let _: <LogLine as Actor>::Output = ();
    let _: <ExplicitUnit as Actor>::Output = ();
    assert_eq!(LogLine.name(), "log_line");
    futures::executor::block_on(LogLine.call(("x".to_owned(),))).unwrap();

    #[allow(dead_code)]
    async fn producer(app: &troupe::App) -> troupe::Result<troupe::Sent<()>> {
        LogLine.send(app, "hello".to_owned()).await
    }
}
