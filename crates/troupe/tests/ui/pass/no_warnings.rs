//! The generated code is warning-free under strict lints, whether or not the handles are used.
#![deny(
    warnings,
    missing_docs,
    unreachable_pub,
    missing_debug_implementations,
    rust_2018_idioms
)]

mod jobs {
    /// A public actor in a private module.
    #[troupe::actor]
    pub(crate) async fn public_one(app: String, options: u8, values: Vec<u8>) -> usize {
        app.len() + usize::from(options) + values.len()
    }

    #[troupe::actor]
    fn private_sync(x: u8) -> u8 {
        x
    }
}

/// Exported actor.
#[troupe::actor]
pub async fn exported() {}

fn main() {
    let _ = jobs::PublicOne;
}
