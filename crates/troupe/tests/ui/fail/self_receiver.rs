struct Mailer;

impl Mailer {
    #[troupe::actor]
    async fn send_welcome(&self, email: String) {
        let _ = email;
    }
}

fn main() {}
