//! The local store: budgets in a redb file in the data folder, for one keygate instance.
//!
//! Why redb and not a journal of our own: a redb write transaction is atomic and, committed with
//! its default durability, fsynced with checksums, so a `kill -9` or a power loss mid-write
//! leaves the last committed state, with no recovery or compaction code of ours to get wrong; and
//! it is pure Rust with no new duplicate dependencies. The file is locked: a second keygate on
//! the same data folder fails at start instead of double-counting.
//!
//! One thread owns the database and the budgets' state. Charges queue to it; it applies every
//! queued charge to the state in order (each one a check-and-charge against the state the
//! previous left), writes the changed budgets in one transaction, commits (one fsync for the
//! batch: group commit), and only then answers. A commit that fails puts the state back and
//! answers every charge of the batch with an error, so an answer "allowed" always means
//! "durably charged".
//!
//! Rate limits are not written to disk: they are GCRA state in memory ([`MemoryLimits`]) on the
//! same wall clock. A restart therefore refills a service's burst once (at most `burst` extra
//! requests per restart), which is documented; budgets, the money, survive restarts.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use async_trait::async_trait;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::oneshot;

use crate::memory::MemoryLimits;
use crate::store::LimitStore;
use crate::window::{BudgetWindow, Clock};
use crate::{BudgetKey, Charge, ChargeOutcome, ChargeRequest, LimitError, RateOutcome, RateSpec};

/// storage key → window length (µs, 8 bytes LE) then (slot u64 LE, amount i64 LE) pairs.
const BUDGETS: TableDefinition<&str, &[u8]> = TableDefinition::new("budgets");

/// Most operations applied in one transaction.
const BATCH: usize = 256;

enum Op {
    Charge(ChargeRequest, oneshot::Sender<Result<ChargeOutcome, LimitError>>),
    Refund(Charge, oneshot::Sender<Result<(), LimitError>>),
    Spent(BudgetKey, oneshot::Sender<i64>),
}

/// The local store.
#[derive(Debug)]
pub struct LocalStore {
    ops: mpsc::Sender<Op>,
    rates: MemoryLimits,
}

fn unavailable(detail: impl Into<String>) -> LimitError {
    LimitError::Unavailable { store: "local", detail: detail.into() }
}

fn encode(window: Duration, state: &BudgetWindow) -> Vec<u8> {
    let mut bytes = crate::window::micros(window).to_le_bytes().to_vec();
    for (slot, amount) in state.entries() {
        bytes.extend_from_slice(&slot.to_le_bytes());
        bytes.extend_from_slice(&amount.to_le_bytes());
    }
    bytes
}

fn decode(bytes: &[u8]) -> Option<BudgetWindow> {
    let rest = bytes.get(8..)?;
    if rest.len() % 16 != 0 {
        return None;
    }
    let entries = rest.chunks_exact(16).filter_map(|chunk| {
        let slot = u64::from_le_bytes(chunk.get(..8)?.try_into().ok()?);
        let amount = i64::from_le_bytes(chunk.get(8..)?.try_into().ok()?);
        Some((slot, amount))
    });
    Some(BudgetWindow::from_entries(entries))
}

impl LocalStore {
    /// Opens (or creates) the store file at `path`, and starts its writer thread.
    pub fn open(path: &Path, clock: Arc<dyn Clock>) -> Result<LocalStore, LimitError> {
        let setup = |detail: String| LimitError::Setup { store: "local", detail };
        if let Some(parent) = path.parent()
            && !parent.as_os_str().is_empty()
        {
            std::fs::create_dir_all(parent)
                .map_err(|e| setup(format!("cannot create the folder {}: {e}", parent.display())))?;
        }
        let db = Database::create(path).map_err(|e| {
            setup(format!(
                "cannot open {} ({e}); is another keygate using the same data folder? Give each instance its own, \
                 or use `limit_store.kind: redis`",
                path.display()
            ))
        })?;
        let mut state: HashMap<String, (BudgetKeyless, BudgetWindow)> = HashMap::new();
        {
            let txn = db.begin_write().map_err(|e| setup(format!("{}: {e}", path.display())))?;
            // Creates the table on first use.
            txn.open_table(BUDGETS).map_err(|e| setup(format!("{}: {e}", path.display())))?;
            txn.commit().map_err(|e| setup(format!("{}: {e}", path.display())))?;
            let read = db.begin_read().map_err(|e| setup(format!("{}: {e}", path.display())))?;
            let table = read.open_table(BUDGETS).map_err(|e| setup(format!("{}: {e}", path.display())))?;
            let entries = table.iter().map_err(|e| setup(format!("{}: {e}", path.display())))?;
            for entry in entries {
                let (key, value) = entry.map_err(|e| setup(format!("{}: {e}", path.display())))?;
                let bytes = value.value();
                let window = bytes.get(..8).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes);
                if let (Some(window), Some(decoded)) = (window, decode(bytes)) {
                    state.insert(key.value().to_owned(), (BudgetKeyless(Duration::from_micros(window)), decoded));
                }
            }
        }
        let (ops, receiver) = mpsc::channel();
        let writer = Writer { db, state, clock: clock.clone() };
        std::thread::Builder::new()
            .name("keygate-limits".into())
            .spawn(move || writer.run(receiver))
            .map_err(|e| setup(format!("cannot start the writer thread: {e}")))?;
        Ok(LocalStore { ops, rates: MemoryLimits::new(clock) })
    }

    async fn ask<T>(&self, op: impl FnOnce(oneshot::Sender<T>) -> Op) -> Result<T, LimitError> {
        let (reply, answer) = oneshot::channel();
        self.ops.send(op(reply)).map_err(|_| unavailable("the store's writer thread has stopped"))?;
        answer.await.map_err(|_| unavailable("the store's writer thread has stopped"))
    }
}

/// The window length of a stored budget (its key holds the rest).
#[derive(Debug, Clone, Copy)]
struct BudgetKeyless(Duration);

struct Writer {
    db: Database,
    state: HashMap<String, (BudgetKeyless, BudgetWindow)>,
    clock: Arc<dyn Clock>,
}

enum Reply {
    Charge(oneshot::Sender<Result<ChargeOutcome, LimitError>>, ChargeOutcome),
    Refund(oneshot::Sender<Result<(), LimitError>>),
    Spent(oneshot::Sender<i64>, BudgetKey),
}

impl Writer {
    fn run(mut self, receiver: mpsc::Receiver<Op>) {
        while let Ok(first) = receiver.recv() {
            let mut batch = vec![first];
            while batch.len() < BATCH {
                match receiver.try_recv() {
                    Ok(op) => batch.push(op),
                    Err(_) => break,
                }
            }
            self.apply(batch);
        }
    }

    fn apply(&mut self, batch: Vec<Op>) {
        let now = self.clock.now_micros();
        let mut before: HashMap<String, Option<(BudgetKeyless, BudgetWindow)>> = HashMap::new();
        let mut replies = Vec::with_capacity(batch.len());
        for op in batch {
            match op {
                Op::Charge(request, reply) => {
                    let key = request.key.storage_key();
                    before.entry(key.clone()).or_insert_with(|| self.state.get(&key).cloned());
                    let (_, window) = self
                        .state
                        .entry(key)
                        .or_insert_with(|| (BudgetKeyless(request.key.window), BudgetWindow::new()));
                    let result = window.charge(now, request.key.window, request.max, request.amount, request.force);
                    let outcome = ChargeOutcome {
                        spent_before: result.spent,
                        exceeded: result.exceeded,
                        charge: result.charged_slot.map(|slot| Charge {
                            key: request.key.clone(),
                            slot,
                            amount: request.amount.max(0),
                        }),
                    };
                    replies.push(Reply::Charge(reply, outcome));
                }
                Op::Refund(charge, reply) => {
                    let key = charge.key.storage_key();
                    before.entry(key.clone()).or_insert_with(|| self.state.get(&key).cloned());
                    if let Some((_, window)) = self.state.get_mut(&key) {
                        window.refund(charge.slot, charge.amount);
                    }
                    replies.push(Reply::Refund(reply));
                }
                Op::Spent(key, reply) => replies.push(Reply::Spent(reply, key)),
            }
        }
        let committed = if before.is_empty() { Ok(()) } else { self.commit(before.keys(), now) };
        if let Err(error) = &committed {
            tracing::error!(error = %error, "the local limit store could not commit; the batch is refused");
            for (key, previous) in before {
                match previous {
                    Some(previous) => self.state.insert(key, previous),
                    None => self.state.remove(&key),
                };
            }
        }
        for reply in replies {
            match reply {
                Reply::Charge(reply, outcome) => {
                    let _ = reply.send(committed.clone().map(|()| outcome));
                }
                Reply::Refund(reply) => {
                    let _ = reply.send(committed.clone());
                }
                Reply::Spent(reply, key) => {
                    let spent = self.state.get(&key.storage_key()).map_or(0, |(_, w)| w.spent(now, key.window));
                    let _ = reply.send(spent);
                }
            }
        }
    }

    fn commit<'a>(&mut self, keys: impl Iterator<Item = &'a String>, now: u64) -> Result<(), LimitError> {
        let failed = |e: &dyn std::fmt::Display| unavailable(format!("cannot write the store file: {e}"));
        let txn = self.db.begin_write().map_err(|e| failed(&e))?;
        {
            let mut table = txn.open_table(BUDGETS).map_err(|e| failed(&e))?;
            for key in keys {
                match self.state.get(key) {
                    Some((window, state)) if !state.is_empty_at(now, window.0) => {
                        table.insert(key.as_str(), encode(window.0, state).as_slice()).map_err(|e| failed(&e))?;
                    }
                    _ => {
                        table.remove(key.as_str()).map_err(|e| failed(&e))?;
                    }
                }
            }
        }
        txn.commit().map_err(|e| failed(&e))?;
        // Budgets with nothing left in their window are forgotten in memory too.
        self.state.retain(|_, (window, state)| !state.is_empty_at(now, window.0));
        Ok(())
    }
}

#[async_trait]
impl LimitStore for LocalStore {
    fn kind(&self) -> &'static str {
        "local"
    }

    async fn charge(&self, request: &ChargeRequest) -> Result<ChargeOutcome, LimitError> {
        let request = request.clone();
        self.ask(|reply| Op::Charge(request, reply)).await?
    }

    async fn refund(&self, charge: &Charge) -> Result<(), LimitError> {
        let charge = charge.clone();
        self.ask(|reply| Op::Refund(charge, reply)).await?
    }

    async fn spent(&self, key: &BudgetKey) -> Result<i64, LimitError> {
        let key = key.clone();
        self.ask(|reply| Op::Spent(key, reply)).await
    }

    async fn acquire(&self, service: &str, rate: RateSpec) -> Result<RateOutcome, LimitError> {
        Ok(self.rates.acquire(service, rate))
    }

    async fn ping(&self) -> Result<(), LimitError> {
        let key = BudgetKey { service: String::new(), currency: String::new(), window: Duration::from_secs(1) };
        self.ask(|reply| Op::Spent(key, reply)).await.map(|_| ())
    }
}
