//! An actor without arguments.

use serde_json::json;
use troupe::Actor;

#[troupe::actor]
async fn tick() -> u64 {
    1
}

fn main() {
    let _: <Tick as Actor>::Args = ();
    let _: <Tick as Actor>::Output = 0_u64;
    assert!(Tick.arg_names().is_empty());
    assert_eq!(Tick.options().queue_name, "default");
    assert_eq!(Tick.decode_args(Vec::new()), Ok(()));
    let surplus = Tick.decode_args(vec![json!(1)]).unwrap_err();
    assert_eq!(surplus, "takes 0 positional argument(s) but 1 were given");
    let message = Tick.message().unwrap();
    assert!(message.args.is_empty());
    assert_eq!(futures::executor::block_on(Tick.call(())).unwrap(), 1);

    #[allow(dead_code)]
    async fn producer(app: &troupe::App) -> troupe::Result<troupe::Sent<u64>> {
        Tick.send(app).await
    }
}
