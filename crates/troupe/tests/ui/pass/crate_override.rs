//! `crate = "..."` names the facade under another name.

extern crate troupe as renamed;

use renamed::Actor;

#[renamed::actor(crate = "renamed", queue_name = "q")]
async fn quoted(x: u8) -> u8 {
    x
}

#[renamed::actor(crate = ::renamed)]
fn bare(x: u8) -> u8 {
    x
}

mod nested {
    #[renamed::actor(crate = "crate::facade", time_limit = 1500)]
    pub(crate) async fn inner() {}
}

mod facade {
    pub use renamed::*;
}

fn main() {
    assert_eq!(Quoted.options().queue_name, "q");
    assert_eq!(Bare.name(), "bare");
    assert_eq!(
        nested::Inner.options().time_limit,
        Some(std::time::Duration::from_millis(1500))
    );
}
