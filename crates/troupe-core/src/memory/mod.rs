//! In-memory broker, results and state backends: for users' unit tests and examples
//! (Dramatiq's `StubBroker`). Nothing survives the process.

mod broker;
mod results;
mod state;
mod tasks;

pub use broker::MemoryBroker;
pub use results::MemoryResults;
pub use state::MemoryState;
