//! The function stays as written: callable directly, with its attributes, from its module.

mod jobs {
    /// Adds (documented by the user).
    #[troupe::actor(queue_name = "math")]
    #[inline]
    pub(crate) async fn add(mut x: i64, y: i64) -> i64 {
        x += y;
        x
    }

    #[troupe::actor]
    pub fn double(r#type: u32) -> u32 {
        r#type * 2
    }
}

use troupe::Actor;

fn main() {
    assert_eq!(futures::executor::block_on(jobs::add(1, 2)), 3);
    assert_eq!(jobs::double(21), 42);
    assert_eq!(jobs::Add.options().queue_name, "math");
    assert_eq!(jobs::Double.arg_names(), ["type"]);
}
