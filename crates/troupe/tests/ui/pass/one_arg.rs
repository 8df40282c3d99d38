//! An actor with one argument: `Args` is a one-element tuple.

use serde_json::json;
use troupe::Actor;

#[troupe::actor]
pub async fn greet(name: String) -> String {
    format!("hello {name}")
}

fn main() {
    let _: <Greet as Actor>::Args = (String::new(),);
    assert_eq!(Greet.arg_names(), ["name"]);
    assert_eq!(Greet.decode_args(vec![json!("ada")]), Ok(("ada".to_owned(),)));
    let missing = Greet.decode_args(vec![json!(null)]).unwrap_err();
    assert!(missing.starts_with("argument \"name\" (position 0):"), "{missing}");
    assert_eq!(Greet.message("ada".to_owned()).unwrap().args, vec![json!("ada")]);
    let greeting = futures::executor::block_on(Greet.call(("ada".to_owned(),))).unwrap();
    assert_eq!(greeting, "hello ada");
}
