//! A web dashboard for Troupe, on every broker: queues with their counts, a queue's ready and
//! delayed messages, a message with its task state, the dead letters (requeue, delete), task
//! states with counts, live workers, and throughput over the last hour.
//!
//! Pages are rendered on the server (askama templates, escaped everywhere); a small script
//! refreshes the live parts every two seconds. The assets are compiled into the binary.
//!
//! Run it with `troupe dashboard` (the `troupe` command), or mount [`Dashboard::router`] in
//! your own axum app under a path prefix:
//!
//! ```no_run
//! # async fn demo(app: troupe_core::App) -> Result<(), Box<dyn std::error::Error>> {
//! use troupe_dashboard::Dashboard;
//!
//! let dashboard = Dashboard::new(app).prefix("/admin/troupe");
//! let router = axum::Router::new().nest("/admin/troupe", dashboard.router());
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! axum::serve(listener, router).await?;
//! # Ok(()) }
//! ```
//!
//! # Security
//! [`Dashboard::serve`] binds 127.0.0.1 by default and refuses any other address without a
//! token ([`Dashboard::token`]): a token is asked once on a login page and kept in an
//! `HttpOnly`, `SameSite=Strict` cookie (scripts may send `Authorization: Bearer TOKEN`). Every
//! action is a POST carrying a per-browser CSRF token that must match its cookie, and a POST
//! whose `Origin` is another site is refused. Pages are sent with a Content-Security-Policy
//! that allows only the dashboard's own script. Message contents are escaped on every page and
//! never put in a URL (message ids are, percent-encoded); broker URLs are never shown.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use askama::Template;
use axum::Router;
use axum::extract::{Form, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum_extra::extract::cookie::{Cookie, CookieJar, SameSite};
use serde::Deserialize;
use troupe_core::{
    App, CancelOutcome, DeadLetter, Error, Message, QueueStats, TaskFilter, TaskQuery, TaskRecord, TaskStatus, Waiting,
    WorkerInfo, now_ms,
};

mod history;
mod pages;

/// How many rows a page shows.
const PAGE: usize = 50;

/// The cookie carrying the CSRF token.
const CSRF_COOKIE: &str = "troupe_csrf";

/// The cookie carrying the access token.
const TOKEN_COOKIE: &str = "troupe_token";

/// The dashboard of one app (its broker, and its state backend for task states).
#[derive(Clone, Debug)]
pub struct Dashboard {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    app: App,
    token: Option<String>,
    prefix: String,
}

impl Dashboard {
    /// A dashboard of `app`'s broker (and state backend, for task states and cancellation).
    #[must_use]
    pub fn new(app: App) -> Self {
        Self {
            shared: Arc::new(Shared {
                app,
                token: None,
                prefix: String::new(),
            }),
        }
    }

    fn edit(self, f: impl FnOnce(&mut Shared)) -> Self {
        let mut shared = Arc::try_unwrap(self.shared).unwrap_or_else(|shared| Shared {
            app: shared.app.clone(),
            token: shared.token.clone(),
            prefix: shared.prefix.clone(),
        });
        f(&mut shared);
        Self {
            shared: Arc::new(shared),
        }
    }

    /// Requires this token: asked on a login page, or as `Authorization: Bearer TOKEN`.
    #[must_use]
    pub fn token(self, token: impl Into<String>) -> Self {
        let token = token.into();
        self.edit(|s| s.token = Some(token).filter(|t| !t.is_empty()))
    }

    /// The path the router is mounted under (`"/admin/troupe"`), for its links; none by
    /// default.
    #[must_use]
    pub fn prefix(self, prefix: impl Into<String>) -> Self {
        let prefix = prefix.into().trim_end_matches('/').to_owned();
        self.edit(|s| s.prefix = prefix)
    }

    /// The dashboard's routes, to serve or to nest under [`prefix`](Self::prefix).
    pub fn router(&self) -> Router {
        let protected = Router::new()
            .route("/", get(overview))
            .route("/queues/{queue}", get(queue_page))
            .route("/queues/{queue}/messages/{id}", get(message_page))
            .route("/queues/{queue}/messages/{id}/cancel", post(cancel))
            .route("/dead", get(dead_page))
            .route("/dead/requeue", post(requeue_dead))
            .route("/dead/delete", post(delete_dead))
            .route("/tasks", get(tasks_page))
            .route("/coordination", get(coordination_page))
            .layer(axum::middleware::from_fn_with_state(Arc::clone(&self.shared), guard));
        Router::new()
            .merge(protected)
            .route("/login", get(login_page).post(login))
            .route("/static/app.css", get(css))
            .route("/static/app.js", get(js))
            .layer(axum::middleware::from_fn(security_headers))
            .with_state(Arc::clone(&self.shared))
    }

    /// Serves the dashboard on `addr` until the process ends.
    ///
    /// # Errors
    /// [`Error::Config`] for an address other than loopback without a token, or one that
    /// cannot be bound.
    pub async fn serve(self, addr: SocketAddr) -> troupe_core::Result<()> {
        let mut server = self.start(addr).await?;
        (&mut server.task)
            .await
            .map_err(|e| Error::Config(format!("the dashboard stopped: {e}")))
    }

    /// Starts serving on `addr`; the returned handle stops it when dropped.
    ///
    /// # Errors
    /// As [`serve`](Self::serve).
    pub async fn start(self, addr: SocketAddr) -> troupe_core::Result<DashboardServer> {
        if !addr.ip().is_loopback() && self.shared.token.is_none() {
            return Err(Error::Config(format!(
                "refusing to serve the dashboard on {addr} without a token: anyone who reaches it could requeue, delete and cancel; \
                 set one with --token (or TROUPE_DASHBOARD_TOKEN), or bind 127.0.0.1"
            )));
        }
        let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
            Error::Config(format!(
                "cannot serve the dashboard on {addr}: {e}; choose a free address with --bind"
            ))
        })?;
        let addr = listener
            .local_addr()
            .map_err(|e| Error::Config(format!("the dashboard's address: {e}")))?;
        let router = self.router();
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, router).await {
                tracing::error!(error = %e, "the dashboard stopped");
            }
        });
        Ok(DashboardServer { addr, task })
    }
}

/// A running dashboard; stops when dropped.
#[derive(Debug)]
pub struct DashboardServer {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl DashboardServer {
    /// The address it listens on.
    #[must_use]
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for DashboardServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The overview's path: the prefix itself (axum's `nest` serves the prefix, not the prefix
/// with a slash), or `/`.
fn home(prefix: &str) -> String {
    if prefix.is_empty() {
        "/".to_owned()
    } else {
        prefix.to_owned()
    }
}

/// Equal, in time that does not depend on where they differ.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Requires the token (when one is set) on every page and action.
async fn guard(State(shared): State<Arc<Shared>>, jar: CookieJar, request: Request, next: Next) -> Response {
    let Some(token) = &shared.token else {
        return next.run(request).await;
    };
    let bearer = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let cookie = jar.get(TOKEN_COOKIE).map(Cookie::value);
    if bearer.or(cookie).is_some_and(|given| same(given, token)) {
        return next.run(request).await;
    }
    if request.method() == axum::http::Method::GET {
        return Redirect::to(&format!("{}/login", shared.prefix)).into_response();
    }
    (StatusCode::UNAUTHORIZED, "a token is required").into_response()
}

/// Headers every response carries.
async fn security_headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; \
             form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// A random token, hex.
fn random_token() -> String {
    use rand::Rng;
    let bytes: [u8; 16] = rand::rng().random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The CSRF token of this browser, set in its cookie when missing.
fn csrf(shared: &Shared, jar: CookieJar) -> (CookieJar, String) {
    if let Some(c) = jar.get(CSRF_COOKIE) {
        let value = c.value().to_owned();
        return (jar, value);
    }
    let value = random_token();
    let path = if shared.prefix.is_empty() {
        "/".to_owned()
    } else {
        shared.prefix.clone()
    };
    let cookie = Cookie::build((CSRF_COOKIE, value.clone()))
        .http_only(true)
        .same_site(SameSite::Strict)
        .path(path)
        .build();
    (jar.add(cookie), value)
}

/// Checks an action's CSRF token against its cookie, and its `Origin` (when sent) against the
/// `Host` it was sent to.
fn check_csrf(headers: &HeaderMap, jar: &CookieJar, form_token: &str) -> Result<(), Problem> {
    let cookie = jar.get(CSRF_COOKIE).map(Cookie::value).unwrap_or_default();
    if cookie.is_empty() || !same(cookie, form_token) {
        return Err(Problem::forbidden(
            "the form's CSRF token does not match; reload the page and try again",
        ));
    }
    if let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) {
        let host = headers
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        let origin_host = origin.split_once("://").map_or(origin, |(_, rest)| rest);
        if origin != "null" && origin_host != host {
            return Err(Problem::forbidden("an action from another site was refused"));
        }
    }
    Ok(())
}

/// An error page.
#[derive(Debug)]
struct Problem {
    status: StatusCode,
    message: String,
}

impl Problem {
    fn forbidden(message: &str) -> Self {
        Self {
            status: StatusCode::FORBIDDEN,
            message: message.to_owned(),
        }
    }

    fn not_found(message: String) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            message,
        }
    }
}

impl From<Error> for Problem {
    fn from(e: Error) -> Self {
        Self {
            status: StatusCode::BAD_GATEWAY,
            message: e.to_string(),
        }
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let page = pages::ProblemPage {
            base: String::new(),
            title: self.status.canonical_reason().unwrap_or("Error").to_owned(),
            message: self.message,
        };
        (self.status, render(&page)).into_response()
    }
}

fn render(page: &impl Template) -> Html<String> {
    Html(
        page.render()
            .unwrap_or_else(|e| format!("<p>cannot render the page: {e}</p>")),
    )
}

/// `text` percent-encoded for a URL path segment or query value.
fn url(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `ms` since the epoch, as "YYYY-MM-DD HH:MM:SS UTC".
fn time(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil(i64::try_from(days).unwrap_or(0));
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 as a civil date (Howard Hinnant's algorithm).
fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = u32::try_from(doy - (153 * mp + 2) / 5 + 1).unwrap_or(1);
    let m = u32::try_from(if mp < 10 { mp + 3 } else { mp - 9 }).unwrap_or(1);
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// How long ago `ms` was ("3s ago"), or how far ahead ("in 5m").
fn ago(ms: u64) -> String {
    let now = now_ms();
    let (d, future) = if ms > now { (ms - now, true) } else { (now - ms, false) };
    let s = d / 1000;
    let text = match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86_400 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    };
    if future {
        format!("in {text}")
    } else {
        format!("{text} ago")
    }
}

/// `value` as compact JSON, cut to `max` characters.
fn preview(value: &serde_json::Value, max: usize) -> String {
    let text = value.to_string();
    if text.chars().count() <= max {
        return text;
    }
    let mut cut: String = text.chars().take(max.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

// ---- pages ----

async fn queue_rows(app: &App) -> Result<(Vec<pages::QueueRow>, Vec<WorkerInfo>), Problem> {
    let broker = app.broker();
    let workers = broker.workers().await?;
    let mut held: BTreeMap<&str, u64> = BTreeMap::new();
    for w in &workers {
        for (q, n) in &w.in_flight {
            *held.entry(q.as_str()).or_default() += n;
        }
    }
    let mut names: std::collections::BTreeSet<String> = broker.queue_names().await?.into_iter().collect();
    for w in &workers {
        names.extend(w.queues.iter().cloned());
    }
    let mut rows = Vec::new();
    for name in names {
        let mut stats: QueueStats = broker.quick_stats(&name).await?;
        stats.in_flight = stats.in_flight.max(held.get(name.as_str()).copied().unwrap_or(0));
        rows.push(pages::QueueRow {
            url: url(&name),
            name,
            ready: stats.ready,
            delayed: stats.delayed,
            in_flight: stats.in_flight,
            dead: stats.dead,
            approximate: stats.approximate,
        });
    }
    Ok((rows, workers))
}

async fn overview(State(shared): State<Arc<Shared>>, jar: CookieJar) -> Result<Response, Problem> {
    let (queues, workers) = queue_rows(&shared.app).await?;
    let chart = history::chart(&workers);
    let workers = workers
        .iter()
        .map(|w| pages::WorkerRow {
            id: w.id.get(..8).unwrap_or(&w.id).to_owned(),
            host: w.hostname.clone(),
            pid: w.pid,
            queues: w.queues.join(", "),
            in_flight: w
                .in_flight
                .iter()
                .filter(|(q, _)| !q.ends_with(".DQ"))
                .map(|(_, n)| n)
                .sum(),
            concurrency: w.concurrency,
            processed: w.processed,
            beat: ago(w.beat_at),
        })
        .collect();
    let (jar, _) = csrf(&shared, jar);
    let page = pages::Overview {
        base: shared.prefix.clone(),
        broker: shared.app.broker().backend().to_owned(),
        queues,
        workers,
        chart,
    };
    Ok((jar, render(&page)).into_response())
}

#[derive(Debug, Deserialize)]
struct QueueQuery {
    #[serde(default)]
    state: Option<String>,
    #[serde(default)]
    page: Option<usize>,
    #[serde(default)]
    actor: Option<String>,
    #[serde(default)]
    id: Option<String>,
}

fn check_queue(queue: &str) -> Result<String, Problem> {
    let canonical = troupe_core::queue::q_name(queue).to_owned();
    troupe_core::queue::validate_queue_name(&canonical).map_err(|_| Problem::not_found("no such queue".to_owned()))?;
    Ok(canonical)
}

async fn queue_page(
    State(shared): State<Arc<Shared>>,
    Path(queue): Path<String>,
    Query(query): Query<QueueQuery>,
    jar: CookieJar,
) -> Result<Response, Problem> {
    let queue = check_queue(&queue)?;
    let broker = shared.app.broker();
    let delayed = query.state.as_deref() == Some("delayed");
    let which = if delayed { Waiting::Delayed } else { Waiting::Ready };
    let page = query.page.unwrap_or(0);
    let actor = query.actor.clone().filter(|a| !a.is_empty());
    let search = query.id.clone().filter(|i| !i.is_empty());
    let stats = broker.quick_stats(&queue).await?;
    // A filter or a search reads further than one page to fill it.
    let (offset, limit) = if actor.is_some() || search.is_some() {
        (0, 10_000)
    } else {
        (page * PAGE, PAGE + 1)
    };
    let mut messages: Vec<Message> = broker.peek(&queue, which, offset, limit).await?;
    if let Some(actor) = &actor {
        messages.retain(|m| &m.actor_name == actor);
    }
    if let Some(id) = &search {
        messages.retain(|m| &m.message_id == id);
    }
    let (messages, has_next) = if actor.is_some() || search.is_some() {
        let skip = page * PAGE;
        let more = messages.len() > skip + PAGE;
        (messages.into_iter().skip(skip).take(PAGE).collect::<Vec<_>>(), more)
    } else {
        let more = messages.len() > PAGE;
        (messages.into_iter().take(PAGE).collect(), more)
    };
    let rows = messages
        .iter()
        .map(|m| pages::MessageRow {
            id_url: url(&m.message_id),
            id: m.message_id.clone(),
            actor: m.actor_name.clone(),
            args: preview(&serde_json::Value::Array(m.args.clone()), 80),
            eta: m.eta().map(|e| format!("{} ({})", time(e), ago(e))).unwrap_or_default(),
        })
        .collect();
    let filters = {
        let mut f = String::new();
        if delayed {
            f.push_str("&state=delayed");
        }
        if let Some(a) = &actor {
            f.push_str(&format!("&actor={}", url(a)));
        }
        f
    };
    let (jar, _) = csrf(&shared, jar);
    let page = pages::QueuePage {
        base: shared.prefix.clone(),
        queue_url: url(&queue),
        queue,
        delayed,
        stats_ready: stats.ready,
        stats_delayed: stats.delayed,
        stats_dead: stats.dead,
        approximate: stats.approximate,
        messages: rows,
        actor: actor.unwrap_or_default(),
        search: search.unwrap_or_default(),
        page,
        prev: page.checked_sub(1),
        next: has_next.then_some(page + 1),
        filters,
    };
    Ok((jar, render(&page)).into_response())
}

/// Where a message was found.
async fn find_message(
    app: &App,
    queue: &str,
    id: &str,
) -> Result<(Option<Message>, &'static str, Option<DeadLetter>), Problem> {
    let broker = app.broker();
    for letter in broker.dead_letters(queue, 10_000).await? {
        if letter.id == id {
            let message = letter.message.clone().ok();
            return Ok((message, "dead", Some(letter)));
        }
    }
    for (which, name) in [(Waiting::Ready, "ready"), (Waiting::Delayed, "delayed")] {
        if let Some(m) = broker
            .peek(queue, which, 0, 10_000)
            .await?
            .into_iter()
            .find(|m| m.message_id == id)
        {
            return Ok((Some(m), name, None));
        }
    }
    Ok((None, "", None))
}

async fn message_page(
    State(shared): State<Arc<Shared>>,
    Path((queue, id)): Path<(String, String)>,
    jar: CookieJar,
) -> Result<Response, Problem> {
    let queue = check_queue(&queue)?;
    let (message, found_in, letter) = find_message(&shared.app, &queue, &id).await?;
    let task: Option<TaskRecord> = match shared.app.task_store() {
        Ok(store) => store.task(&id).await?,
        Err(_) => None,
    };
    if message.is_none() && task.is_none() && letter.is_none() {
        return Err(Problem::not_found(
            "no such message in this queue, its dead letters or the task states".to_owned(),
        ));
    }
    let pretty = |v: &serde_json::Value| serde_json::to_string_pretty(v).unwrap_or_default();
    let (args, kwargs, options, traceback, group) = match &message {
        Some(m) => {
            let mut options = m.options.clone();
            let traceback = options
                .shift_remove("traceback")
                .and_then(|t| t.as_str().map(str::to_owned));
            let group = options
                .get(troupe_core::option_keys::GROUP_COMPLETION_UUID)
                .and_then(|g| g.as_str().map(str::to_owned));
            (
                pretty(&serde_json::Value::Array(m.args.clone())),
                pretty(&serde_json::Value::Object(m.kwargs.clone())),
                pretty(&serde_json::Value::Object(options.into_iter().collect())),
                traceback,
                group,
            )
        }
        None => (String::new(), String::new(), String::new(), None, None),
    };
    let reason = letter.as_ref().map(|l| l.reason.clone());
    let mut history = Vec::new();
    if let Some(t) = &task {
        history.push(("sent".to_owned(), time(t.enqueued_at)));
        if let Some(s) = t.started_at {
            history.push(("latest attempt started".to_owned(), time(s)));
        }
        if let Some(e) = t.eta {
            history.push(("due".to_owned(), time(e)));
        }
        if let Some(f) = t.finished_at {
            history.push((format!("finished ({})", t.status), time(f)));
        }
        history.push(("last change".to_owned(), time(t.updated_at)));
    }
    let cancellable = task.as_ref().is_some_and(|t| !t.status.is_final()) || matches!(found_in, "ready" | "delayed");
    let (jar, token) = csrf(&shared, jar);
    let page = pages::MessagePage {
        base: shared.prefix.clone(),
        queue_url: url(&queue),
        queue,
        id_url: url(&id),
        id,
        actor: message
            .as_ref()
            .map(|m| m.actor_name.clone())
            .or_else(|| task.as_ref().map(|t| t.actor.clone()))
            .unwrap_or_default(),
        found_in: found_in.to_owned(),
        args,
        kwargs,
        options,
        traceback,
        reason,
        group,
        status: task.as_ref().map(|t| t.status.to_string()),
        attempts: task.as_ref().map(|t| t.attempts),
        error: task.as_ref().and_then(|t| {
            t.error.clone().map(|e| {
                format!(
                    "{}{e}",
                    t.error_type.as_deref().map(|t| format!("{t}: ")).unwrap_or_default()
                )
            })
        }),
        progress: task.as_ref().and_then(|t| t.progress.as_ref().map(|p| p.to_string())),
        worker: task.as_ref().and_then(|t| t.worker.clone()),
        history,
        cancellable,
        csrf: token,
    };
    Ok((jar, render(&page)).into_response())
}

#[derive(Debug, Deserialize)]
struct ActionForm {
    csrf: String,
}

async fn cancel(
    State(shared): State<Arc<Shared>>,
    Path((queue, id)): Path<(String, String)>,
    headers: HeaderMap,
    jar: CookieJar,
    Form(form): Form<ActionForm>,
) -> Result<Response, Problem> {
    check_csrf(&headers, &jar, &form.csrf)?;
    let queue = check_queue(&queue)?;
    let outcome = shared.app.cancel(&id).await?;
    let note = match outcome {
        CancelOutcome::Cancelled => "cancelled",
        CancelOutcome::Aborting => "aborting",
        CancelOutcome::Finished(_) => "finished",
        _ => "requested",
    };
    Ok(Redirect::to(&format!(
        "{}/queues/{}/messages/{}?cancel={note}",
        shared.prefix,
        url(&queue),
        url(&id)
    ))
    .into_response())
}

#[derive(Debug, Deserialize)]
struct DeadQuery {
    #[serde(default)]
    queue: Option<String>,
    #[serde(default)]
    done: Option<String>,
}

async fn dead_page(
    State(shared): State<Arc<Shared>>,
    Query(query): Query<DeadQuery>,
    jar: CookieJar,
) -> Result<Response, Problem> {
    let broker = shared.app.broker();
    let queues = broker.queue_names().await?;
    let selected = match query.queue.as_deref().filter(|q| !q.is_empty()) {
        Some(q) => vec![check_queue(q)?],
        None => queues.clone(),
    };
    let mut rows = Vec::new();
    for q in &selected {
        for letter in broker.dead_letters(q, PAGE).await? {
            rows.push(pages::DeadRow {
                queue: q.clone(),
                queue_url: url(q),
                id_url: url(&letter.id),
                actor: letter
                    .message
                    .as_ref()
                    .map_or_else(|_| "(undecodable)".to_owned(), |m| m.actor_name.clone()),
                args: letter
                    .message
                    .as_ref()
                    .map(|m| preview(&serde_json::Value::Array(m.args.clone()), 60))
                    .unwrap_or_default(),
                died: ago(letter.failed_at),
                reason: letter.reason.lines().next().unwrap_or_default().to_owned(),
                traceback: letter.reason.clone(),
                id: letter.id,
            });
        }
    }
    let (jar, token) = csrf(&shared, jar);
    let page = pages::DeadPage {
        base: shared.prefix.clone(),
        queues,
        selected: query.queue.unwrap_or_default(),
        rows,
        done: query.done.unwrap_or_default(),
        csrf: token,
    };
    Ok((jar, render(&page)).into_response())
}

/// A dead-letter action: `ids` as `queue/id` pairs, or `all` for the `queue` (or every
/// queue) with `confirm`.
#[derive(Debug, Deserialize)]
struct DeadForm {
    csrf: String,
    #[serde(default)]
    queue: String,
    #[serde(default)]
    ids: Vec<String>,
    #[serde(default)]
    all: Option<String>,
    #[serde(default)]
    confirm: Option<String>,
}

/// Parses the form's `ids` (repeated fields) out of the raw body, which `Form` cannot do for
/// repeated keys.
fn dead_form(body: &str) -> Result<DeadForm, Problem> {
    let mut form = DeadForm {
        csrf: String::new(),
        queue: String::new(),
        ids: Vec::new(),
        all: None,
        confirm: None,
    };
    for pair in body.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = decode(v);
        match k {
            "csrf" => form.csrf = v,
            "queue" => form.queue = v,
            "ids" => form.ids.push(v),
            "all" => form.all = Some(v),
            "confirm" => form.confirm = Some(v),
            _ => {}
        }
    }
    Ok(form)
}

/// Decodes an `application/x-www-form-urlencoded` value.
fn decode(v: &str) -> String {
    let bytes = v.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn dead_action(
    shared: &Shared,
    headers: &HeaderMap,
    jar: &CookieJar,
    body: &str,
    requeue: bool,
) -> Result<Response, Problem> {
    let form = dead_form(body)?;
    check_csrf(headers, jar, &form.csrf)?;
    let broker = shared.app.broker();
    let mut done = 0;
    if form.all.is_some() {
        if form.confirm.as_deref() != Some("yes") {
            return Err(Problem {
                status: StatusCode::BAD_REQUEST,
                message: "tick the confirmation to act on every dead letter".to_owned(),
            });
        }
        let queues = if form.queue.is_empty() {
            broker.queue_names().await?
        } else {
            vec![check_queue(&form.queue)?]
        };
        for q in queues {
            done += if requeue {
                broker.requeue_dead_letters(&q, &[]).await?
            } else {
                broker.purge_dead_letters(&q).await?
            };
        }
    } else {
        let mut by_queue: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for pair in &form.ids {
            let Some((q, id)) = pair.split_once('/') else { continue };
            by_queue.entry(check_queue(q)?).or_default().push(id.to_owned());
        }
        for (q, ids) in by_queue {
            done += if requeue {
                broker.requeue_dead_letters(&q, &ids).await?
            } else {
                broker.delete_dead_letters(&q, &ids).await?
            };
        }
    }
    let verb = if requeue { "requeued" } else { "deleted" };
    let back = if form.queue.is_empty() {
        String::new()
    } else {
        format!("queue={}&", url(&form.queue))
    };
    Ok(Redirect::to(&format!(
        "{}/dead?{back}done={}",
        shared.prefix,
        url(&format!("{verb} {done}"))
    ))
    .into_response())
}

async fn requeue_dead(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    jar: CookieJar,
    body: String,
) -> Result<Response, Problem> {
    dead_action(&shared, &headers, &jar, &body, true).await
}

async fn delete_dead(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    jar: CookieJar,
    body: String,
) -> Result<Response, Problem> {
    dead_action(&shared, &headers, &jar, &body, false).await
}

#[derive(Debug, Deserialize)]
struct TasksQuery {
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    actor: Option<String>,
    #[serde(default)]
    queue: Option<String>,
    #[serde(default)]
    since: Option<String>,
}

async fn tasks_page(
    State(shared): State<Arc<Shared>>,
    Query(query): Query<TasksQuery>,
    jar: CookieJar,
) -> Result<Response, Problem> {
    let mut filter = TaskFilter::new();
    let status = query.status.clone().filter(|s| !s.is_empty());
    if let Some(s) = &status {
        filter = filter.status(s.parse::<TaskStatus>()?);
    }
    let actor = query.actor.clone().filter(|a| !a.is_empty());
    if let Some(a) = &actor {
        filter = filter.actor(a.clone());
    }
    let queue = query.queue.clone().filter(|q| !q.is_empty());
    if let Some(q) = &queue {
        filter = filter.queue(check_queue(q)?);
    }
    let since = query.since.clone().filter(|s| !s.is_empty());
    if let Some(s) = &since {
        let window = parse_window(s).ok_or_else(|| Problem {
            status: StatusCode::BAD_REQUEST,
            message: format!("cannot read the time window {s:?}; use 15m, 1h, 24h or 7d"),
        })?;
        filter = filter.since(now_ms().saturating_sub(window));
    }
    let (tracked, counts, tasks) = match shared.app.task_store() {
        Ok(_) => {
            let counts = shared.app.task_store()?.status_counts(&filter).await?;
            let page = shared.app.tasks(&TaskQuery::new(filter).limit(PAGE)).await?;
            let counts = TaskStatus::ALL
                .iter()
                .map(|s| (s.to_string(), counts.get(s).copied().unwrap_or(0)))
                .collect::<Vec<_>>();
            (true, counts, page.tasks)
        }
        Err(_) => (false, Vec::new(), Vec::new()),
    };
    let rows = tasks
        .iter()
        .map(|t| pages::TaskRow {
            queue_url: url(&t.queue),
            id_url: url(&t.message_id),
            id: t.message_id.clone(),
            actor: t.actor.clone(),
            queue: t.queue.clone(),
            status: t.status.to_string(),
            attempts: t.attempts,
            sent: ago(t.enqueued_at),
            error: t.error.clone().unwrap_or_default(),
        })
        .collect();
    let (jar, _) = csrf(&shared, jar);
    let page = pages::TasksPage {
        base: shared.prefix.clone(),
        tracked,
        counts,
        rows,
        status: status.unwrap_or_default(),
        actor: actor.unwrap_or_default(),
        queue: queue.unwrap_or_default(),
        since: since.unwrap_or_default(),
        statuses: TaskStatus::ALL.iter().map(ToString::to_string).collect(),
    };
    Ok((jar, render(&page)).into_response())
}

/// "15m", "1h", "7d" as milliseconds.
fn parse_window(s: &str) -> Option<u64> {
    let (n, unit) = s.split_at(s.len().checked_sub(1)?);
    let n: u64 = n.parse().ok()?;
    let unit = match unit {
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return None,
    };
    n.checked_mul(unit)
}

async fn coordination_page(State(shared): State<Arc<Shared>>, jar: CookieJar) -> Result<Response, Problem> {
    let (kept, slots, barriers) = match shared.app.state() {
        Some(state) => {
            let seen = state.coordination(PAGE * 4).await?;
            let slots = seen
                .slots
                .into_iter()
                .map(|s| pages::SlotRow {
                    count: s.holders.len(),
                    holders: s.holders.join(", "),
                    key: s.key,
                })
                .collect();
            let barriers = seen
                .barriers
                .into_iter()
                .map(|b| pages::BarrierRow {
                    key: b.key,
                    arrived: b.arrived,
                    cleared: b.cleared,
                })
                .collect();
            (true, slots, barriers)
        }
        None => (false, Vec::new(), Vec::new()),
    };
    let (jar, _) = csrf(&shared, jar);
    let page = pages::CoordinationPage {
        base: shared.prefix.clone(),
        kept,
        slots,
        barriers,
    };
    Ok((jar, render(&page)).into_response())
}

#[derive(Debug, Deserialize)]
struct LoginForm {
    token: String,
}

async fn login_page(State(shared): State<Arc<Shared>>) -> Html<String> {
    render(&pages::LoginPage {
        base: shared.prefix.clone(),
        failed: false,
    })
}

async fn login(State(shared): State<Arc<Shared>>, jar: CookieJar, Form(form): Form<LoginForm>) -> Response {
    match &shared.token {
        Some(token) if same(&form.token, token) => {
            let path = if shared.prefix.is_empty() {
                "/".to_owned()
            } else {
                shared.prefix.clone()
            };
            let cookie = Cookie::build((TOKEN_COOKIE, form.token))
                .http_only(true)
                .same_site(SameSite::Strict)
                .path(path)
                .build();
            (jar.add(cookie), Redirect::to(&home(&shared.prefix))).into_response()
        }
        Some(_) => (
            StatusCode::UNAUTHORIZED,
            render(&pages::LoginPage {
                base: shared.prefix.clone(),
                failed: true,
            }),
        )
            .into_response(),
        None => Redirect::to(&home(&shared.prefix)).into_response(),
    }
}

async fn css() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        include_str!("../static/app.css"),
    )
}

async fn js() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        include_str!("../static/app.js"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helpers() {
        assert_eq!(url("a b/<c>\"'"), "a%20b%2F%3Cc%3E%22%27");
        assert_eq!(decode("a+b%2Fc%3C"), "a b/c<");
        assert_eq!(decode("100%"), "100%");
        assert_eq!(time(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(time(1_796_212_800_000), "2026-12-02 12:00:00 UTC");
        assert_eq!(parse_window("15m"), Some(900_000));
        assert_eq!(parse_window("x"), None);
        assert!(same("abc", "abc") && !same("abc", "abd") && !same("abc", "ab"));
    }
}
