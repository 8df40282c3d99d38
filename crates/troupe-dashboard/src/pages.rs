//! The pages' data, rendered by the templates in `templates/` (askama escapes every value).

use askama::Template;

/// One bar of the throughput chart (a minute).
#[derive(Clone, Debug, Default)]
pub(crate) struct Bar {
    pub(crate) x: u64,
    pub(crate) processed: u64,
    pub(crate) failed: u64,
    pub(crate) processed_height: u64,
    pub(crate) failed_height: u64,
    pub(crate) processed_y: u64,
    pub(crate) failed_y: u64,
}

#[derive(Debug)]
pub(crate) struct QueueRow {
    pub(crate) name: String,
    pub(crate) url: String,
    pub(crate) ready: u64,
    pub(crate) delayed: u64,
    pub(crate) in_flight: u64,
    pub(crate) dead: u64,
    pub(crate) approximate: bool,
}

#[derive(Debug)]
pub(crate) struct WorkerRow {
    pub(crate) id: String,
    pub(crate) host: String,
    pub(crate) pid: u32,
    pub(crate) queues: String,
    pub(crate) in_flight: u64,
    pub(crate) concurrency: u64,
    pub(crate) processed: u64,
    pub(crate) beat: String,
}

#[derive(Template)]
#[template(path = "overview.html")]
pub(crate) struct Overview {
    pub(crate) base: String,
    pub(crate) broker: String,
    pub(crate) queues: Vec<QueueRow>,
    pub(crate) workers: Vec<WorkerRow>,
    pub(crate) chart: Vec<Bar>,
}

#[derive(Debug)]
pub(crate) struct MessageRow {
    pub(crate) id: String,
    pub(crate) id_url: String,
    pub(crate) actor: String,
    pub(crate) args: String,
    pub(crate) eta: String,
}

#[derive(Template)]
#[template(path = "queue.html")]
pub(crate) struct QueuePage {
    pub(crate) base: String,
    pub(crate) queue: String,
    pub(crate) queue_url: String,
    pub(crate) delayed: bool,
    pub(crate) stats_ready: u64,
    pub(crate) stats_delayed: u64,
    pub(crate) stats_dead: u64,
    pub(crate) approximate: bool,
    pub(crate) messages: Vec<MessageRow>,
    pub(crate) actor: String,
    pub(crate) search: String,
    pub(crate) page: usize,
    pub(crate) prev: Option<usize>,
    pub(crate) next: Option<usize>,
    pub(crate) filters: String,
}

#[derive(Template)]
#[template(path = "message.html")]
pub(crate) struct MessagePage {
    pub(crate) base: String,
    pub(crate) queue: String,
    pub(crate) queue_url: String,
    pub(crate) id: String,
    pub(crate) id_url: String,
    pub(crate) actor: String,
    pub(crate) found_in: String,
    pub(crate) args: String,
    pub(crate) kwargs: String,
    pub(crate) options: String,
    pub(crate) traceback: Option<String>,
    pub(crate) reason: Option<String>,
    pub(crate) group: Option<String>,
    pub(crate) status: Option<String>,
    pub(crate) attempts: Option<u64>,
    pub(crate) error: Option<String>,
    pub(crate) progress: Option<String>,
    pub(crate) worker: Option<String>,
    pub(crate) history: Vec<(String, String)>,
    pub(crate) cancellable: bool,
    pub(crate) csrf: String,
}

#[derive(Debug)]
pub(crate) struct DeadRow {
    pub(crate) queue: String,
    pub(crate) queue_url: String,
    pub(crate) id: String,
    pub(crate) id_url: String,
    pub(crate) actor: String,
    pub(crate) args: String,
    pub(crate) died: String,
    pub(crate) reason: String,
    pub(crate) traceback: String,
}

#[derive(Template)]
#[template(path = "dead.html")]
pub(crate) struct DeadPage {
    pub(crate) base: String,
    pub(crate) queues: Vec<String>,
    pub(crate) selected: String,
    pub(crate) rows: Vec<DeadRow>,
    pub(crate) done: String,
    pub(crate) csrf: String,
}

#[derive(Debug)]
pub(crate) struct TaskRow {
    pub(crate) id: String,
    pub(crate) id_url: String,
    pub(crate) actor: String,
    pub(crate) queue: String,
    pub(crate) queue_url: String,
    pub(crate) status: String,
    pub(crate) attempts: u64,
    pub(crate) sent: String,
    pub(crate) error: String,
}

#[derive(Template)]
#[template(path = "tasks.html")]
pub(crate) struct TasksPage {
    pub(crate) base: String,
    pub(crate) tracked: bool,
    pub(crate) counts: Vec<(String, u64)>,
    pub(crate) rows: Vec<TaskRow>,
    pub(crate) status: String,
    pub(crate) actor: String,
    pub(crate) queue: String,
    pub(crate) since: String,
    pub(crate) statuses: Vec<String>,
}

#[derive(Template)]
#[template(path = "login.html")]
pub(crate) struct LoginPage {
    pub(crate) base: String,
    pub(crate) failed: bool,
}

#[derive(Template)]
#[template(path = "problem.html")]
pub(crate) struct ProblemPage {
    pub(crate) base: String,
    pub(crate) title: String,
    pub(crate) message: String,
}

#[derive(Debug)]
pub(crate) struct SlotRow {
    pub(crate) key: String,
    pub(crate) count: usize,
    pub(crate) holders: String,
}

#[derive(Debug)]
pub(crate) struct BarrierRow {
    pub(crate) key: String,
    pub(crate) arrived: u64,
    pub(crate) cleared: bool,
}

#[derive(Template)]
#[template(path = "coordination.html")]
pub(crate) struct CoordinationPage {
    pub(crate) base: String,
    pub(crate) kept: bool,
    pub(crate) slots: Vec<SlotRow>,
    pub(crate) barriers: Vec<BarrierRow>,
}
