//! Troupe's RabbitMQ broker, on [lapin]: Python Dramatiq's topology and message format, so
//! Python and Rust workers share queues in both directions.
//!
//! ```no_run
//! # async fn run() -> troupe_core::Result<()> {
//! let broker = troupe_rabbitmq::RabbitmqBroker::connect("amqp://guest:guest@127.0.0.1:5672/%2f").await?;
//! # Ok(()) }
//! ```
//!
//! # Topology
//!
//! For each queue `Q` the broker declares, lazily on first use and in this order, three durable
//! queues on the default exchange, with exactly Dramatiq's arguments:
//!
//! | queue | arguments |
//! |---|---|
//! | `Q` | `x-dead-letter-exchange: ""`, `x-dead-letter-routing-key: "Q.XQ"` (+ `x-max-priority` when [`RabbitmqOptions::max_priority`] is set) |
//! | `Q.DQ` | the same as `Q` |
//! | `Q.XQ` | `x-message-ttl: 604800000` ([`RabbitmqOptions::dead_message_ttl`]) |
//!
//! Strings go as AMQP long strings and integers as signed 32-bit ints, as pika sends them, so a
//! queue Python Dramatiq declared is accepted, and the reverse. Every peer must agree on
//! `max_priority` and the dead-letter TTL: RabbitMQ refuses a declaration with other arguments
//! (406 `PRECONDITION_FAILED`). What was declared is cached, and declared again after a
//! reconnect, a 404 or a message returned as unroutable (a deleted queue).
//!
//! Messages are published to the default exchange with routing key `Q` (or `Q.DQ` with `eta`
//! for a delay; the worker holds delayed messages until due, as Dramatiq's does), persistent
//! (`delivery_mode = 2`). On queues declared with [`RabbitmqOptions::max_priority`], a message
//! carries an AMQP priority when Dramatiq's `broker_priority` option is set (that value, as
//! Dramatiq publishes it), or else when its Troupe priority p (`troupe_core::priority`, lower
//! first) is below 0: `ceil(-p * max_priority / 10)`, so -10 is `max_priority`. Priorities 0 and
//! above publish no priority property, exactly as Dramatiq does, and so run in arrival order
//! among themselves. With publisher confirms
//! (on by default here; Dramatiq's `confirm_delivery` defaults to off) an enqueue returns once
//! RabbitMQ has the message, and `mandatory` publishes that come back unroutable are declared
//! again and retried. A publish that fails on a lost connection is retried on a new one (at
//! most 6 attempts, as Dramatiq); one that times out is not, since RabbitMQ may have it.
//!
//! # Connections and channels
//!
//! A broker keeps two connections, each re-established on demand after a failure (the URLs in
//! order, backing off from 100 ms doubling to 10 s), both named by
//! [`RabbitmqOptions::connection_name`] in `rabbitmqctl list_connections`:
//!
//! - **publish**: one channel in confirm mode shared by every task that enqueues (and one
//!   without confirms when [`RabbitmqOptions::confirm_delivery`] is off), plus short-lived
//!   channels for declares, stats and dead letters (a refused declaration or a 404 closes only
//!   its own channel);
//! - **consume**: one channel per consumer, with `basic_qos(prefetch)` and manual acks; a resized
//!   window (`Consumer::set_prefetch`) re-consumes on that channel with the new prefetch.
//!   Consumers share a connection rather than opening one each (Dramatiq's way): channels
//!   already isolate them, and one socket per consumer buys nothing. It is separate from the
//!   publishing connection because RabbitMQ blocks *publishing* connections on a memory or disk
//!   alarm, and consumers must still be able to ack (and so free memory) meanwhile.
//!
//! A lost connection makes fetches fail with [`ErrorKind::Connection`](troupe_core::ErrorKind)
//! (the worker then makes a new consumer, which reconnects); RabbitMQ itself redelivers the
//! messages that were unacked on it, flagged [`Delivery::redelivered`](troupe_core::Delivery).
//! An ack or nack on a channel that is gone fails with a non-transient error, since delivery
//! tags are per channel: the message is redelivered. An ack, nack or requeue that does not
//! finish within the operation time-out (its channel's connection died as it was written)
//! fails the same way.
//!
//! # Dead letters
//!
//! A nack publishes the message as the worker last saw it, with the reason in
//! `options.traceback`, to `Q.XQ` (confirmed), then acks the original: the dead letter says why
//! it died. If that publish fails, the delivery is `basic_nack`ed without requeue and RabbitMQ
//! dead-letters it to `Q.XQ` itself, as Dramatiq does. [`Broker::dead_letters`](troupe_core::Broker)
//! peeks with `basic_get` on a short-lived channel and closes it, which returns them all in
//! order (and marks them redelivered).
//!
//! # Stats
//!
//! `ready`, `delayed` and `dead` are the message counts of `Q`, `Q.DQ` and `Q.XQ` (passive
//! declares). `in_flight` (and the delayed messages held by workers, added to `delayed`) counts
//! only the deliveries held unacked by **this broker instance's** consumers: AMQP does not show
//! other connections' unacked messages (the management API does).
//!
//! # Quorum queues
//!
//! With `?queue_type=quorum` ([`QueueType::Quorum`]) the broker declares `Q`, `Q.DQ` and `Q.XQ`
//! as quorum queues (Dramatiq's arguments plus `x-queue-type`): replicated over a cluster's
//! nodes by Raft, so a queue and its confirmed messages survive the loss of a minority of them.
//! `Q` also gets `x-delivery-limit` (default 20; `?delivery_limit=N`, 0 for none): a message
//! delivered that many times without being settled (its worker died, lost its link, or was
//! stopped while holding it) is dead-lettered to `Q.XQ` by RabbitMQ, reason `delivery_limit`,
//! a guard against a message that kills its worker. Retries do not count (each is a new
//! message); a peek does (it reads and returns the messages it shows), so an operator who
//! peeks a queue often should raise the limit. Quorum queues have no priorities on RabbitMQ
//! 3.x: `max_priority` is refused with them. Every producer and worker of a queue, Python ones
//! included, must declare it the same way (RabbitMQ refuses a declaration of another type).
//!
//! # Long-running actors and `consumer_timeout`
//!
//! RabbitMQ 3.8.15+ closes a channel whose delivery stays unacked longer than
//! `consumer_timeout` (default 30 minutes; `consumer_timeout` in `rabbitmq.conf`, in ms, or per
//! queue with the `x-consumer-timeout` argument or a policy on RabbitMQ 3.12+). Nothing a client
//! does keeps a delivery past it: the channel closes with `PRECONDITION_FAILED`, its unacked
//! messages go back to the queue and run again, and the late ack fails. Troupe does nothing
//! special: the worker sees the consumer fail and makes a new one. **Set `consumer_timeout`
//! above your longest actor time limit, and above your longest delay** (delayed messages are
//! held unacked on `Q.DQ` until their eta, so a longer delay is redelivered and may run
//! twice). Troupe does not add `x-consumer-timeout` to the queue arguments: that would break
//! declaration equivalence with Dramatiq.

mod ack;
mod admin;
mod broker;
mod conn;
mod consumer;
mod publish;
mod topology;
mod workers;

pub use broker::RabbitmqBroker;
pub use conn::{QueueType, RabbitmqOptions};

/// The AMQP client this crate is built on.
pub use lapin;
