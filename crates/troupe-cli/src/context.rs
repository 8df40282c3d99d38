//! The broker and state backend a command works on.

use std::sync::Arc;

use troupe::{App, Broker, StateBackend};

use crate::Failure;

/// What every command gets: the broker, the app (with the state backend when there is one)
/// and the output mode.
pub(crate) struct Context {
    pub(crate) broker: Arc<dyn Broker>,
    app: App,
    state: Option<Arc<dyn StateBackend>>,
    pub(crate) json: bool,
}

/// Schemes whose server also keeps task states.
fn keeps_state(url: &str) -> bool {
    let scheme = url.split_once(':').map_or("", |(s, _)| s).to_ascii_lowercase();
    matches!(
        scheme.as_str(),
        "sqlite" | "redis" | "rediss" | "redis+unix" | "redis+sentinel" | "redis+cluster" | "postgres" | "postgresql"
    )
}

/// Refuses a URL the command cannot use: `memory://` (it lives inside one process) and a
/// SQLite file that does not exist (connecting would create an empty one).
fn check_url(flag: &str, url: &str) -> Result<(), Failure> {
    let scheme = url.split_once(':').map_or("", |(s, _)| s).to_ascii_lowercase();
    if scheme == "memory" {
        return Err(Failure::Usage(format!(
            "{flag} memory:// lives inside one process; point it at the broker your workers use"
        )));
    }
    if scheme == "sqlite" {
        let options = troupe::sqlite::SqliteOptions::from_url(url)?;
        if !options.path.exists() {
            return Err(Failure::Error(format!(
                "{flag}: no SQLite database at {}; check the path (relative paths start in the current directory)",
                options.path.display()
            )));
        }
    }
    Ok(())
}

impl Context {
    pub(crate) async fn connect(
        broker_url: Option<&str>,
        state_url: Option<&str>,
        json: bool,
    ) -> Result<Self, Failure> {
        let Some(broker_url) = broker_url else {
            return Err(Failure::Usage(
                "no broker: pass --broker-url URL or set TROUPE_BROKER_URL".into(),
            ));
        };
        check_url("--broker-url", broker_url)?;
        let broker = troupe::connect(broker_url).await?;
        let state_url = state_url.or_else(|| keeps_state(broker_url).then_some(broker_url));
        let state = match state_url {
            Some(url) => {
                check_url("--state-url", url)?;
                Some(troupe::connect_state(url).await?)
            }
            None => None,
        };
        let mut builder = App::builder(Arc::clone(&broker));
        if let Some(state) = &state {
            builder = builder.state(Arc::clone(state));
        }
        let app = builder.build()?;
        Ok(Self {
            broker,
            app,
            state,
            json,
        })
    }

    pub(crate) fn app(&self) -> &App {
        &self.app
    }

    /// The app, when it has a state backend that keeps task states.
    pub(crate) fn tasks_app(&self) -> Result<&App, Failure> {
        if self.state.as_ref().is_none_or(|s| s.tasks().is_none()) {
            return Err(Failure::Usage(
                "task states need a state backend: pass --state-url URL (SQLite, Redis or PostgreSQL) where the workers record them"
                    .into(),
            ));
        }
        Ok(&self.app)
    }

    /// An app that records the task states of what it sends (`enqueue --track`).
    pub(crate) fn tracking_app(&self) -> Result<App, Failure> {
        self.tasks_app()?;
        let mut builder = App::builder(Arc::clone(&self.broker)).track_tasks(troupe::TaskTracking::default());
        if let Some(state) = &self.state {
            builder = builder.state(Arc::clone(state));
        }
        Ok(builder.build()?)
    }

    pub(crate) async fn close(&self) {
        let _ = self.broker.close().await;
    }
}
