//! The local delivery state: one `redb` file in `webhooks.state_dir` holding the received events
//! (body and metadata), the dedup index, the pending deliveries of every destination (attempts,
//! next attempt time), the dead letters, and which events still lack their lake row.
//!
//! Every change goes through one writer thread that commits in batches (group commit): each
//! batch is one redb transaction committed with `Durability::Immediate` (fsynced) before any
//! caller in it is answered. So when [`Store::ingest`] returns, the event, its dedup entry and
//! one pending delivery per matching destination are on disk together, or none of them is.
//!
//! Invariants:
//! - an event is in the dedup index if and only if it is in the event table;
//! - every pending delivery and dead letter names an event in the event table (events are swept
//!   only when they have neither, and only once older than the dedup window);
//! - a new pending row is handed to its destination's dispatcher only after its commit.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::error::WebhookError;
use crate::event::EventMeta;

const EVENTS: TableDefinition<u128, &[u8]> = TableDefinition::new("events");
const DEDUP: TableDefinition<&str, u128> = TableDefinition::new("dedup");
const PENDING: TableDefinition<(u128, &str), &[u8]> = TableDefinition::new("pending");
const DEAD: TableDefinition<(u128, &str), &[u8]> = TableDefinition::new("dead");
const UNJOURNALED: TableDefinition<u128, u8> = TableDefinition::new("unjournaled");

/// Most operations waiting for the writer; beyond, ingestion is refused (503) at once.
pub const QUEUE_CAPACITY: usize = 8192;

/// Most operations committed in one transaction.
const MAX_BATCH: usize = 1024;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)).unwrap_or(0)
}

/// The time part of a UUIDv7 as a u128 key (milliseconds since the epoch).
pub fn id_time_ms(id: u128) -> u64 {
    u64::try_from(id >> 80).unwrap_or(u64::MAX)
}

/// The smallest UUIDv7 key of a millisecond.
fn first_id_of(ms: u64) -> u128 {
    u128::from(ms) << 80
}

/// A received event as stored.
#[derive(Debug, Clone)]
pub struct StoredEvent {
    pub id: u128,
    pub endpoint: String,
    pub meta: EventMeta,
    pub received_at_ms: u64,
    pub peer: Option<String>,
    pub body: Bytes,
}

#[derive(Serialize, Deserialize)]
struct StoredHead {
    endpoint: String,
    meta: EventMeta,
    received_at_ms: u64,
    peer: Option<String>,
}

fn encode_event(event: &StoredEvent) -> Vec<u8> {
    let head = StoredHead {
        endpoint: event.endpoint.clone(),
        meta: event.meta.clone(),
        received_at_ms: event.received_at_ms,
        peer: event.peer.clone(),
    };
    let head = serde_json::to_vec(&head).unwrap_or_default();
    let mut out = Vec::with_capacity(4 + head.len() + event.body.len());
    out.extend_from_slice(&u32::try_from(head.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(&head);
    out.extend_from_slice(&event.body);
    out
}

fn decode_event(id: u128, bytes: &[u8]) -> Option<StoredEvent> {
    let length = usize::try_from(u32::from_be_bytes(bytes.get(..4)?.try_into().ok()?)).ok()?;
    let head: StoredHead = serde_json::from_slice(bytes.get(4..4 + length)?).ok()?;
    Some(StoredEvent {
        id,
        endpoint: head.endpoint,
        meta: head.meta,
        received_at_ms: head.received_at_ms,
        peer: head.peer,
        body: Bytes::copy_from_slice(bytes.get(4 + length..)?),
    })
}

/// Where a pending delivery stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingState {
    /// Attempts made so far.
    pub attempts: u32,
    /// When the next attempt is due (ms since the epoch).
    pub next_attempt_ms: u64,
    /// When the first attempt failed; the retry time counts from here.
    pub first_failure_ms: Option<u64>,
    /// Queued by an operator (replay or re-drive): its success is recorded as `replayed`.
    pub replay: bool,
    /// The last failure's reason.
    pub last_error: Option<String>,
}

impl PendingState {
    fn fresh(now: u64, replay: bool) -> PendingState {
        PendingState { attempts: 0, next_attempt_ms: now, first_failure_ms: None, replay, last_error: None }
    }
}

/// A delivery that ran out of retries (or failed permanently).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub attempts: u32,
    pub dead_at_ms: u64,
    pub first_failure_ms: Option<u64>,
    pub last_error: Option<String>,
    pub last_status: Option<u16>,
}

/// Work for a destination's dispatcher: a pending row that was just committed (or recovered).
#[derive(Debug, Clone)]
pub struct Work {
    pub event: u128,
    pub destination: String,
    pub state: PendingState,
}

/// What [`Store::ingest`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ingested {
    /// A new event, stored with its pending deliveries.
    New { event: u128 },
    /// The Stripe event id is already known (within the dedup window): nothing was stored.
    /// `journaled` says whether its `received` lake row is durable.
    Duplicate { event: u128, journaled: bool },
}

/// A new event to store, with the destinations it goes to.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub event: StoredEvent,
    pub destinations: Vec<String>,
}

/// What an operator asks to queue again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Requeue {
    /// Re-drive dead letters: each named (event, destination) dead letter becomes pending.
    DeadLetters,
    /// Replay: each named event is delivered to the destination again, whatever happened before.
    Replay,
}

enum Op {
    Ingest {
        new: Box<NewEvent>,
        reply: oneshot::Sender<Result<Ingested, WebhookError>>,
    },
    Journaled {
        event: u128,
    },
    Delivered {
        event: u128,
        destination: String,
    },
    Reschedule {
        event: u128,
        destination: String,
        state: PendingState,
    },
    DeadLetter {
        event: u128,
        destination: String,
        dead: DeadLetter,
    },
    Requeue {
        items: Vec<(u128, String)>,
        how: Requeue,
        restore: Vec<StoredEvent>,
        reply: oneshot::Sender<Result<usize, WebhookError>>,
    },
    Sweep {
        cutoff_ms: u64,
        reply: oneshot::Sender<Result<usize, WebhookError>>,
    },
}

/// What recovery found in the state file at open.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Every pending delivery, by destination.
    pub pending: HashMap<String, Vec<Work>>,
    /// Dead letters per destination.
    pub dead: HashMap<String, usize>,
    /// Events whose `received` lake row is not known to be durable.
    pub unjournaled: Vec<u128>,
}

/// The state file and its writer.
#[derive(Debug, Clone)]
pub struct Store {
    db: Arc<Database>,
    path: Arc<PathBuf>,
    ops: mpsc::Sender<Op>,
}

impl std::fmt::Debug for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Op")
    }
}

impl Store {
    /// Opens (or creates) `dir/state.redb`, reads what it holds, and starts the writer, which
    /// hands every newly committed pending row to `routes[destination]`.
    pub fn open(
        dir: &Path,
        routes: HashMap<String, mpsc::UnboundedSender<Work>>,
    ) -> Result<(Store, Recovered), WebhookError> {
        std::fs::create_dir_all(dir).map_err(|e| WebhookError::state(dir, e))?;
        let path = dir.join("state.redb");
        let db = Database::create(&path).map_err(|e| WebhookError::state(&path, e))?;
        let db = Arc::new(db);
        // Create every table so that readers never meet a missing one.
        let fail = |e: redb::Error| WebhookError::state(&path, e);
        (|| -> Result<(), redb::Error> {
            let txn = db.begin_write()?;
            txn.open_table(EVENTS)?;
            txn.open_table(DEDUP)?;
            txn.open_table(PENDING)?;
            txn.open_table(DEAD)?;
            txn.open_table(UNJOURNALED)?;
            txn.commit()?;
            Ok(())
        })()
        .map_err(fail)?;
        let recovered = recover(&db).map_err(fail)?;
        let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
        let writer_db = db.clone();
        let writer_path = path.clone();
        std::thread::Builder::new()
            .name("webhook-state".into())
            .spawn(move || writer(writer_db, writer_path, rx, routes))
            .map_err(|e| WebhookError::state(&path, e))?;
        Ok((Store { db, path: Arc::new(path), ops: tx }, recovered))
    }

    fn send(&self, op: Op) -> Result<(), WebhookError> {
        self.ops.try_send(op).map_err(|error| match error {
            mpsc::error::TrySendError::Full(_) => WebhookError::Overloaded { capacity: QUEUE_CAPACITY },
            mpsc::error::TrySendError::Closed(_) => WebhookError::Closed,
        })
    }

    async fn send_wait(&self, op: Op) -> Result<(), WebhookError> {
        self.ops.send(op).await.map_err(|_| WebhookError::Closed)
    }

    /// Stores a verified event and its pending deliveries (fsynced) unless its Stripe id is
    /// already known for the endpoint. Refuses at once when the writer's queue is full.
    pub async fn ingest(&self, new: NewEvent) -> Result<Ingested, WebhookError> {
        let (reply, answer) = oneshot::channel();
        self.send(Op::Ingest { new: Box::new(new), reply })?;
        answer.await.map_err(|_| WebhookError::Closed)?
    }

    /// Notes that an event's `received` lake row is durable (batched, not awaited).
    pub async fn journaled(&self, event: u128) {
        let _ = self.send_wait(Op::Journaled { event }).await;
    }

    /// A delivery succeeded: its pending row goes.
    pub async fn delivered(&self, event: u128, destination: &str) {
        let _ = self.send_wait(Op::Delivered { event, destination: destination.to_owned() }).await;
    }

    /// A delivery failed and will be retried.
    pub async fn reschedule(&self, event: u128, destination: &str, state: PendingState) {
        let _ = self.send_wait(Op::Reschedule { event, destination: destination.to_owned(), state }).await;
    }

    /// A delivery is dead-lettered.
    pub async fn dead_letter(&self, event: u128, destination: &str, dead: DeadLetter) {
        let _ = self.send_wait(Op::DeadLetter { event, destination: destination.to_owned(), dead }).await;
    }

    /// Queues deliveries again (re-drive or replay); returns how many were queued.
    pub async fn requeue(&self, items: Vec<(u128, String)>, how: Requeue) -> Result<usize, WebhookError> {
        let (reply, answer) = oneshot::channel();
        self.send_wait(Op::Requeue { items, how, restore: Vec::new(), reply }).await?;
        answer.await.map_err(|_| WebhookError::Closed)?
    }

    /// Replays events read back from the audit lake (no longer in the state file) to
    /// `destination`: each event is stored again, without a dedup entry (its Stripe id is past
    /// the dedup window), with one pending replay delivery, in one fsynced commit; an event the
    /// state file still holds is only queued (unless already pending there). Returns how many
    /// deliveries were queued. Once delivered, a restored event is swept as any old event is.
    pub async fn replay_restored(&self, events: Vec<StoredEvent>, destination: &str) -> Result<usize, WebhookError> {
        let items = events.iter().map(|e| (e.id, destination.to_owned())).collect();
        let (reply, answer) = oneshot::channel();
        self.send_wait(Op::Requeue { items, how: Requeue::Replay, restore: events, reply }).await?;
        answer.await.map_err(|_| WebhookError::Closed)?
    }

    /// Removes events received before `cutoff_ms` that have no pending delivery and no dead
    /// letter (and their dedup entries); returns how many went.
    pub async fn sweep(&self, cutoff_ms: u64) -> Result<usize, WebhookError> {
        let (reply, answer) = oneshot::channel();
        self.send_wait(Op::Sweep { cutoff_ms, reply }).await?;
        answer.await.map_err(|_| WebhookError::Closed)?
    }

    fn read<T>(&self, f: impl FnOnce(&redb::ReadTransaction) -> Result<T, redb::Error>) -> Result<T, WebhookError> {
        let txn = self.db.begin_read().map_err(|e| WebhookError::state(self.path.as_ref(), e))?;
        f(&txn).map_err(|e| WebhookError::state(self.path.as_ref(), e))
    }

    /// One stored event.
    pub fn event(&self, id: u128) -> Result<Option<StoredEvent>, WebhookError> {
        self.read(|txn| {
            let table = txn.open_table(EVENTS)?;
            Ok(table.get(id)?.and_then(|bytes| decode_event(id, bytes.value())))
        })
    }

    /// Events received in `[from_ms, to_ms)`, oldest first, that pass `keep`.
    pub fn events_between(
        &self,
        from_ms: u64,
        to_ms: u64,
        mut keep: impl FnMut(&StoredEvent) -> bool,
    ) -> Result<Vec<StoredEvent>, WebhookError> {
        self.read(|txn| {
            let table = txn.open_table(EVENTS)?;
            let mut out = Vec::new();
            for row in table.range(first_id_of(from_ms)..first_id_of(to_ms))? {
                let (key, value) = row?;
                if let Some(event) = decode_event(key.value(), value.value())
                    && keep(&event)
                {
                    out.push(event);
                }
            }
            Ok(out)
        })
    }

    /// Every dead letter (of one destination, or all), oldest event first.
    pub fn dead_letters(&self, destination: Option<&str>) -> Result<Vec<(u128, String, DeadLetter)>, WebhookError> {
        self.read(|txn| {
            let table = txn.open_table(DEAD)?;
            let mut out = Vec::new();
            for row in table.iter()? {
                let (key, value) = row?;
                let (event, name) = key.value();
                if destination.is_some_and(|d| d != name) {
                    continue;
                }
                if let Ok(dead) = serde_json::from_slice::<DeadLetter>(value.value()) {
                    out.push((event, name.to_owned(), dead));
                }
            }
            Ok(out)
        })
    }

    /// Events whose `received` lake row is not known to be durable.
    pub fn unjournaled(&self) -> Result<Vec<u128>, WebhookError> {
        self.read(|txn| {
            let table = txn.open_table(UNJOURNALED)?;
            let mut out = Vec::new();
            for row in table.iter()? {
                out.push(row?.0.value());
            }
            Ok(out)
        })
    }

    /// The state file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn recover(db: &Database) -> Result<Recovered, redb::Error> {
    let txn = db.begin_read()?;
    let mut recovered = Recovered::default();
    for row in txn.open_table(PENDING)?.iter()? {
        let (key, value) = row?;
        let (event, destination) = key.value();
        let Ok(state) = serde_json::from_slice::<PendingState>(value.value()) else { continue };
        recovered.pending.entry(destination.to_owned()).or_default().push(Work {
            event,
            destination: destination.to_owned(),
            state,
        });
    }
    for row in txn.open_table(DEAD)?.iter()? {
        let (key, _) = row?;
        *recovered.dead.entry(key.value().1.to_owned()).or_default() += 1;
    }
    for row in txn.open_table(UNJOURNALED)?.iter()? {
        recovered.unjournaled.push(row?.0.value());
    }
    Ok(recovered)
}

fn dedup_key(endpoint: &str, stripe_id: &str) -> String {
    format!("{endpoint}\n{stripe_id}")
}

/// What one operation of a batch produced, handed out after the commit.
enum Done {
    Ingested(Ingested),
    Count(usize),
    Nothing,
}

fn writer(
    db: Arc<Database>,
    path: PathBuf,
    mut rx: mpsc::Receiver<Op>,
    routes: HashMap<String, mpsc::UnboundedSender<Work>>,
) {
    while let Some(first) = rx.blocking_recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        let mut work = Vec::new();
        match apply(&db, &batch, &mut work) {
            Ok(done) => {
                for (op, done) in batch.into_iter().zip(done) {
                    match (op, done) {
                        (Op::Ingest { reply, .. }, Done::Ingested(ingested)) => {
                            let _ = reply.send(Ok(ingested));
                        }
                        (Op::Requeue { reply, .. } | Op::Sweep { reply, .. }, Done::Count(count)) => {
                            let _ = reply.send(Ok(count));
                        }
                        _ => {}
                    }
                }
                for item in work {
                    if let Some(route) = routes.get(&item.destination) {
                        let _ = route.send(item);
                    }
                }
            }
            Err(error) => {
                tracing::error!(path = %path.display(), error = %error, "webhook state commit failed");
                let failure = || WebhookError::state(&path, &error);
                for op in batch {
                    match op {
                        Op::Ingest { reply, .. } => {
                            let _ = reply.send(Err(failure()));
                        }
                        Op::Requeue { reply, .. } | Op::Sweep { reply, .. } => {
                            let _ = reply.send(Err(failure()));
                        }
                        _ => {}
                    }
                }
            }
        }
    }
}

fn apply(db: &Database, batch: &[Op], work: &mut Vec<Work>) -> Result<Vec<Done>, redb::Error> {
    let mut txn = db.begin_write()?;
    txn.set_durability(redb::Durability::Immediate)?;
    let mut done = Vec::with_capacity(batch.len());
    {
        let mut events = txn.open_table(EVENTS)?;
        let mut dedup = txn.open_table(DEDUP)?;
        let mut pending = txn.open_table(PENDING)?;
        let mut dead = txn.open_table(DEAD)?;
        let mut unjournaled = txn.open_table(UNJOURNALED)?;
        let now = now_ms();
        for op in batch {
            match op {
                Op::Ingest { new, .. } => {
                    let event = &new.event;
                    let key = dedup_key(&event.endpoint, &event.meta.id);
                    let existing = dedup.get(key.as_str())?.map(|id| id.value());
                    if let Some(existing) = existing {
                        let journaled = unjournaled.get(existing)?.is_none();
                        done.push(Done::Ingested(Ingested::Duplicate { event: existing, journaled }));
                        continue;
                    }
                    events.insert(event.id, encode_event(event).as_slice())?;
                    dedup.insert(key.as_str(), event.id)?;
                    unjournaled.insert(event.id, 1)?;
                    for destination in &new.destinations {
                        let state = PendingState::fresh(now, false);
                        let bytes = serde_json::to_vec(&state).unwrap_or_default();
                        pending.insert((event.id, destination.as_str()), bytes.as_slice())?;
                        work.push(Work { event: event.id, destination: destination.clone(), state });
                    }
                    done.push(Done::Ingested(Ingested::New { event: event.id }));
                }
                Op::Journaled { event } => {
                    unjournaled.remove(*event)?;
                    done.push(Done::Nothing);
                }
                Op::Delivered { event, destination } => {
                    pending.remove((*event, destination.as_str()))?;
                    done.push(Done::Nothing);
                }
                Op::Reschedule { event, destination, state } => {
                    // Only while still pending: an operator may have changed it meanwhile.
                    if pending.get((*event, destination.as_str()))?.is_some() {
                        let bytes = serde_json::to_vec(state).unwrap_or_default();
                        pending.insert((*event, destination.as_str()), bytes.as_slice())?;
                    }
                    done.push(Done::Nothing);
                }
                Op::DeadLetter { event, destination, dead: letter } => {
                    pending.remove((*event, destination.as_str()))?;
                    let bytes = serde_json::to_vec(letter).unwrap_or_default();
                    dead.insert((*event, destination.as_str()), bytes.as_slice())?;
                    done.push(Done::Nothing);
                }
                Op::Requeue { items, how, restore, .. } => {
                    for event in restore {
                        if events.get(event.id)?.is_none() {
                            events.insert(event.id, encode_event(event).as_slice())?;
                        }
                    }
                    let mut count = 0;
                    for (event, destination) in items {
                        if events.get(*event)?.is_none() {
                            continue;
                        }
                        let was_dead = dead.remove((*event, destination.as_str()))?.is_some();
                        if *how == Requeue::DeadLetters && !was_dead {
                            continue;
                        }
                        if pending.get((*event, destination.as_str()))?.is_some() {
                            continue;
                        }
                        let state = PendingState::fresh(now, true);
                        let bytes = serde_json::to_vec(&state).unwrap_or_default();
                        pending.insert((*event, destination.as_str()), bytes.as_slice())?;
                        work.push(Work { event: *event, destination: destination.clone(), state });
                        count += 1;
                    }
                    done.push(Done::Count(count));
                }
                Op::Sweep { cutoff_ms, .. } => {
                    let mut doomed = Vec::new();
                    for row in events.range(..first_id_of(*cutoff_ms))? {
                        let (key, value) = row?;
                        let id = key.value();
                        let open = pending.range((id, "")..(id.saturating_add(1), ""))?.next().is_some()
                            || dead.range((id, "")..(id.saturating_add(1), ""))?.next().is_some()
                            || unjournaled.get(id)?.is_some();
                        if !open && let Some(event) = decode_event(id, value.value()) {
                            doomed.push((id, dedup_key(&event.endpoint, &event.meta.id)));
                        }
                    }
                    for (id, key) in &doomed {
                        events.remove(*id)?;
                        // A restored (replayed-from-the-lake) event has no dedup entry of its
                        // own; the key may then name a newer copy of the same Stripe event.
                        if dedup.get(key.as_str())?.is_some_and(|v| v.value() == *id) {
                            dedup.remove(key.as_str())?;
                        }
                    }
                    done.push(Done::Count(doomed.len()));
                }
            }
        }
    }
    txn.commit()?;
    Ok(done)
}

/// The UUIDv7 key of a received event, for display.
pub fn event_uuid(id: u128) -> uuid::Uuid {
    uuid::Uuid::from_u128(id)
}

/// How long ago `ms` was, saturating at zero.
pub fn age(ms: u64) -> Duration {
    Duration::from_millis(now_ms().saturating_sub(ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(endpoint: &str, stripe_id: &str) -> NewEvent {
        NewEvent {
            event: StoredEvent {
                id: uuid::Uuid::now_v7().as_u128(),
                endpoint: endpoint.to_owned(),
                meta: EventMeta {
                    id: stripe_id.to_owned(),
                    object: "event".into(),
                    event_type: "invoice.paid".into(),
                    livemode: Some(false),
                    account: None,
                    api_version: None,
                    created: Some(1),
                },
                received_at_ms: now_ms(),
                peer: None,
                body: Bytes::from_static(b"{\"id\":\"evt\"}"),
            },
            destinations: vec!["a".into(), "b".into()],
        }
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn events_restored_from_the_lake_are_replayed_once_and_swept_without_touching_dedup() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let rt = runtime();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let routes = HashMap::from([("a".to_owned(), tx.clone()), ("b".to_owned(), tx)]);
        rt.block_on(async {
            let (store, _) = Store::open(dir.path(), routes).unwrap_or_else(|e| panic!("{e}"));
            // An old event, read back from the lake, whose Stripe id was received again since
            // (a newer copy holds the dedup entry).
            let mut old = event("main", "evt_old").event;
            old.id = first_id_of(1_000) | 7;
            let newer = event("main", "evt_old");
            let newer_id = newer.event.id;
            assert!(matches!(store.ingest(newer).await, Ok(Ingested::New { .. })));
            for _ in 0..2 {
                let _ = rx.recv().await;
            }
            assert_eq!(store.replay_restored(vec![old.clone()], "b").await.ok(), Some(1));
            let work = rx.recv().await.unwrap_or_else(|| panic!("no work"));
            assert_eq!((work.event, work.destination.as_str(), work.state.replay), (old.id, "b", true));
            assert_eq!(store.event(old.id).ok().flatten().map(|e| e.body), Some(old.body.clone()));
            // Asked again while pending: not queued twice.
            assert_eq!(store.replay_restored(vec![old.clone()], "b").await.ok(), Some(0));
            // Not swept while pending; once delivered it goes, and the newer copy's dedup entry
            // stays.
            assert_eq!(store.sweep(2_000).await.ok(), Some(0));
            store.delivered(old.id, "b").await;
            assert_eq!(store.sweep(2_000).await.ok(), Some(1));
            assert!(store.event(old.id).ok().flatten().is_none());
            let again = event("main", "evt_old");
            assert_eq!(
                store.ingest(again).await.ok(),
                Some(Ingested::Duplicate { event: newer_id, journaled: false }),
                "the dedup entry of the newer copy survived the sweep of the restored one"
            );
        });
    }

    #[test]
    fn events_deliveries_and_dedup_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let rt = runtime();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let routes = HashMap::from([("a".to_owned(), tx.clone()), ("b".to_owned(), tx)]);
        let first = event("main", "evt_1");
        let id = first.event.id;
        rt.block_on(async {
            let (store, recovered) = Store::open(dir.path(), routes.clone()).unwrap_or_else(|e| panic!("{e}"));
            assert!(recovered.pending.is_empty());
            assert_eq!(store.ingest(first.clone()).await.ok(), Some(Ingested::New { event: id }));
            assert_eq!(rx.recv().await.map(|w| w.event), Some(id));
            assert_eq!(rx.recv().await.map(|w| w.destination), Some("b".to_owned()));
            // The same Stripe id on the same endpoint is a duplicate, on another endpoint it is not.
            let again = event("main", "evt_1");
            assert_eq!(store.ingest(again).await.ok(), Some(Ingested::Duplicate { event: id, journaled: false }));
            let other = event("other", "evt_1");
            let other_id = other.event.id;
            assert!(matches!(store.ingest(other).await, Ok(Ingested::New { .. })));
            // Not swept while pending, dead or without its audit record.
            assert_eq!(store.sweep(now_ms() + 1).await.ok(), Some(0));
            store.journaled(other_id).await;
            store.delivered(other_id, "a").await;
            store.delivered(other_id, "b").await;
            store.journaled(id).await;
            store.delivered(id, "a").await;
            store
                .dead_letter(
                    id,
                    "b",
                    DeadLetter {
                        attempts: 3,
                        dead_at_ms: now_ms(),
                        first_failure_ms: None,
                        last_error: Some("HTTP 500".into()),
                        last_status: Some(500),
                    },
                )
                .await;
            // A sweep now keeps the event: it has a dead letter.
            assert_eq!(store.sweep(now_ms() + 1).await.ok(), Some(1), "only the other endpoint's event goes");
        });
        drop(rt);
        // Reopen: the writer thread of the first store is gone with its runtime's channel.
        let rt = runtime();
        rt.block_on(async {
            let dir2 = dir.path().to_owned();
            let (tx, _rx) = mpsc::unbounded_channel();
            let mut reopened = None;
            for _ in 0..100 {
                match Store::open(&dir2, HashMap::from([("b".to_owned(), tx.clone())])) {
                    Ok(opened) => {
                        reopened = Some(opened);
                        break;
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
            let (store, recovered) = reopened.unwrap_or_else(|| panic!("state file did not reopen"));
            assert!(recovered.pending.is_empty(), "{:?}", recovered.pending);
            assert_eq!(recovered.dead.get("b"), Some(&1));
            assert!(recovered.unjournaled.is_empty());
            assert_eq!(store.dead_letters(Some("b")).map(|d| d.len()).ok(), Some(1));
            assert_eq!(store.requeue(vec![(id, "b".into())], Requeue::DeadLetters).await.ok(), Some(1));
            assert_eq!(store.requeue(vec![(id, "b".into())], Requeue::DeadLetters).await.ok(), Some(0));
            let dup = event("main", "evt_1");
            assert_eq!(store.ingest(dup).await.ok(), Some(Ingested::Duplicate { event: id, journaled: true }));
            assert_eq!(store.event(id).ok().flatten().map(|e| e.meta.id), Some("evt_1".to_owned()));
        });
    }
}
