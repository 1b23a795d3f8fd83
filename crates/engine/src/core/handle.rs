//! The async face of the engine: a cheap `Clone` handle around a bounded command channel;
//! the engine itself lives on one dedicated thread (forward passes are CPU- or
//! device-bound and must not block an async runtime).
//!
//! Queues: commands are bounded; requests in flight are capped (`max_pending`), beyond
//! which `submit` answers [`SubmitError::QueueFull`] at once; each request's event channel
//! holds `max_tokens + 1` events, so the engine never blocks on a slow reader. A dropped
//! [`RequestStream`] aborts its sequence and frees its blocks.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use protocol::{KvEvent, KvSnapshot};
use tokio::sync::{broadcast, mpsc, oneshot};

use super::engine::{validate_request, EngineStats, Executor, LlmEngine};
use super::request::{GenerateRequest, RequestId, SubmitError, TokenEvent};

enum Command {
    Add(RequestId, GenerateRequest, mpsc::Sender<TokenEvent>),
    Abort(RequestId),
    Stats(oneshot::Sender<EngineStats>),
    KvSnapshot(oneshot::Sender<KvSnapshot>),
    ResetPrefixCache(oneshot::Sender<bool>),
    Shutdown,
}

#[derive(Clone, Debug)]
pub struct HandleOptions {
    /// Requests admitted but not finished, across waiting and running.
    pub max_pending: usize,
    /// KV events buffered for slow subscribers before they see a gap.
    pub kv_event_capacity: usize,
}

impl Default for HandleOptions {
    fn default() -> Self {
        HandleOptions {
            max_pending: 1024,
            // The broadcast buffer is allocated up front (~64 B a slot): 4096 keeps an
            // instance near 0.3 MB so hundreds fit in one process; a subscriber that
            // falls further behind sees a gap and resynchronises from a snapshot.
            kv_event_capacity: 4096,
        }
    }
}

struct Shared {
    cmd: mpsc::Sender<Command>,
    pending: AtomicUsize,
    next_id: AtomicU64,
    closed: AtomicBool,
    kv_events: broadcast::Sender<KvEvent>,
    max_pending: usize,
    vocab_size: usize,
    max_model_len: usize,
    kv_capacity_tokens: usize,
    thread: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
}

#[derive(Clone)]
pub struct EngineHandle {
    shared: Arc<Shared>,
}

impl EngineHandle {
    /// Moves `engine` onto its own thread and returns the handle to it.
    pub fn spawn<E: Executor>(engine: LlmEngine<E>, opts: HandleOptions) -> Self {
        let (cmd_tx, cmd_rx) = mpsc::channel(opts.max_pending + 64);
        let (kv_tx, _) = broadcast::channel(opts.kv_event_capacity);
        let cfg = engine.config();
        let shared = Arc::new(Shared {
            cmd: cmd_tx,
            pending: AtomicUsize::new(0),
            next_id: AtomicU64::new(1),
            closed: AtomicBool::new(false),
            kv_events: kv_tx.clone(),
            max_pending: opts.max_pending,
            vocab_size: engine.executor().vocab_size(),
            max_model_len: cfg.max_model_len,
            kv_capacity_tokens: cfg.scheduler.num_blocks * cfg.scheduler.block_size,
            thread: std::sync::Mutex::new(None),
        });
        let worker = Arc::downgrade(&shared);
        let thread = std::thread::Builder::new()
            .name("switchyard-engine".into())
            .spawn(move || run_loop(engine, cmd_rx, kv_tx, worker))
            .expect("spawning the engine thread");
        *shared.thread.lock().expect("not poisoned") = Some(thread);
        EngineHandle { shared }
    }

    /// Validates and queues a request; its events arrive on the returned stream.
    pub fn submit(&self, req: GenerateRequest) -> Result<RequestStream, SubmitError> {
        let mut streams = self.submit_many(vec![req])?;
        Ok(streams.pop().expect("one stream per request"))
    }

    /// Validates and queues several requests (e.g. the `n` choices of one API call), all
    /// or none: either every request is admitted or none is.
    pub fn submit_many(
        &self,
        reqs: Vec<GenerateRequest>,
    ) -> Result<Vec<RequestStream>, SubmitError> {
        let s = &self.shared;
        if s.closed.load(Ordering::Acquire) {
            return Err(SubmitError::ShuttingDown);
        }
        for req in &reqs {
            validate_request(req, s.vocab_size, s.max_model_len, s.kv_capacity_tokens)?;
        }
        let n = reqs.len();
        let pending = s.pending.fetch_add(n, Ordering::AcqRel);
        if pending + n > s.max_pending {
            s.pending.fetch_sub(n, Ordering::AcqRel);
            return Err(SubmitError::QueueFull(pending));
        }
        let mut streams = Vec::with_capacity(n);
        for (i, req) in reqs.into_iter().enumerate() {
            let id = s.next_id.fetch_add(1, Ordering::Relaxed);
            let (tx, rx) = mpsc::channel(req.max_tokens as usize + 1);
            if s.cmd.try_send(Command::Add(id, req, tx)).is_err() {
                // Those already sent are aborted when `streams` drops; the rest were
                // never queued, so their reservations are returned here.
                s.pending.fetch_sub(n - i, Ordering::AcqRel);
                return Err(SubmitError::ShuttingDown);
            }
            streams.push(RequestStream {
                id,
                rx,
                handle: self.clone(),
                done: false,
            });
        }
        Ok(streams)
    }

    /// Aborts a request; its stream ends with `FinishReason::Abort`.
    pub fn abort(&self, id: RequestId) {
        // A full queue means the engine is far behind; the dropped receiver is noticed
        // on the next step anyway.
        let _ = self.shared.cmd.try_send(Command::Abort(id));
    }

    pub fn subscribe_kv_events(&self) -> broadcast::Receiver<KvEvent> {
        self.shared.kv_events.subscribe()
    }

    pub fn pending(&self) -> usize {
        self.shared.pending.load(Ordering::Acquire)
    }

    pub async fn stats(&self) -> Option<EngineStats> {
        self.ask(Command::Stats).await
    }

    /// The hashes in the prefix cache right now and the id of the last KV event that
    /// state reflects. Every event up to that id has been published before the reply, so
    /// a subscriber that resynchronises from the snapshot drops events with ids at or
    /// below it and applies the rest.
    pub async fn kv_snapshot(&self) -> Option<KvSnapshot> {
        self.ask(Command::KvSnapshot).await
    }

    /// Whether the engine still takes requests (false once shut down or its thread died).
    pub fn is_alive(&self) -> bool {
        !self.shared.closed.load(Ordering::Acquire) && !self.shared.cmd.is_closed()
    }

    pub async fn reset_prefix_cache(&self) -> Option<bool> {
        self.ask(Command::ResetPrefixCache).await
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Option<T> {
        let (tx, rx) = oneshot::channel();
        self.shared.cmd.send(make(tx)).await.ok()?;
        rx.await.ok()
    }

    /// Stops accepting work, aborts what is in flight and joins the engine thread.
    pub fn shutdown(&self) {
        self.shared.closed.store(true, Ordering::Release);
        let _ = self.shared.cmd.try_send(Command::Shutdown);
        let thread = self.shared.thread.lock().expect("not poisoned").take();
        if let Some(t) = thread {
            let _ = t.join();
        }
    }
}

/// The events of one request. Dropping it before the end aborts the request.
pub struct RequestStream {
    id: RequestId,
    rx: mpsc::Receiver<TokenEvent>,
    handle: EngineHandle,
    done: bool,
}

impl RequestStream {
    pub fn id(&self) -> RequestId {
        self.id
    }

    /// The next event; `None` after the final one.
    pub async fn next(&mut self) -> Option<TokenEvent> {
        if self.done {
            return None;
        }
        let ev = self.rx.recv().await;
        match &ev {
            Some(e) if e.finish_reason.is_none() => {}
            _ => self.done = true,
        }
        ev
    }

    /// Blocking variant for non-async callers (CLI, benchmarks).
    pub fn blocking_next(&mut self) -> Option<TokenEvent> {
        if self.done {
            return None;
        }
        let ev = self.rx.blocking_recv();
        match &ev {
            Some(e) if e.finish_reason.is_none() => {}
            _ => self.done = true,
        }
        ev
    }
}

impl Drop for RequestStream {
    fn drop(&mut self) {
        if !self.done {
            self.handle.abort(self.id);
        }
    }
}

fn run_loop<E: Executor>(
    mut engine: LlmEngine<E>,
    mut rx: mpsc::Receiver<Command>,
    kv_tx: broadcast::Sender<KvEvent>,
    shared: std::sync::Weak<Shared>,
) {
    let mut sinks: HashMap<RequestId, mpsc::Sender<TokenEvent>> = HashMap::new();
    let finish = |sinks: &mut HashMap<RequestId, mpsc::Sender<TokenEvent>>, id: RequestId| {
        if sinks.remove(&id).is_some() {
            if let Some(s) = shared.upgrade() {
                s.pending.fetch_sub(1, Ordering::AcqRel);
            }
        }
    };
    'outer: loop {
        // Block for a command when idle; otherwise take what is queued and keep stepping.
        if !engine.has_work() {
            match rx.blocking_recv() {
                Some(cmd) => {
                    if !handle_command(&mut engine, &mut sinks, &kv_tx, cmd, &finish) {
                        break 'outer;
                    }
                }
                None => break 'outer,
            }
        }
        while let Ok(cmd) = rx.try_recv() {
            if !handle_command(&mut engine, &mut sinks, &kv_tx, cmd, &finish) {
                break 'outer;
            }
        }
        // Readers that went away free their sequences before the step spends work on them.
        let gone: Vec<RequestId> = sinks
            .iter()
            .filter(|(_, tx)| tx.is_closed())
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            engine.abort(id);
            finish(&mut sinks, id);
        }
        let events = engine.step();
        let sent_at = Some(std::time::Instant::now());
        for (id, mut ev) in events {
            ev.sent_at = sent_at;
            let last = ev.finish_reason.is_some();
            if let Some(tx) = sinks.get(&id) {
                if tx.try_send(ev).is_err() {
                    // Receiver gone: stop generating for it.
                    engine.abort(id);
                    finish(&mut sinks, id);
                    continue;
                }
            }
            if last {
                finish(&mut sinks, id);
            }
        }
        for ev in engine.drain_kv_events() {
            let _ = kv_tx.send(ev);
        }
    }
    // Shutting down: end every stream with an abort so no caller waits forever.
    for id in engine.request_ids() {
        if let Some(ev) = engine.abort(id) {
            if let Some(tx) = sinks.get(&id) {
                let _ = tx.try_send(ev);
            }
        }
        finish(&mut sinks, id);
    }
    for ev in engine.drain_kv_events() {
        let _ = kv_tx.send(ev);
    }
}

/// Returns false on shutdown.
fn handle_command<E: Executor>(
    engine: &mut LlmEngine<E>,
    sinks: &mut HashMap<RequestId, mpsc::Sender<TokenEvent>>,
    kv_tx: &broadcast::Sender<KvEvent>,
    cmd: Command,
    finish: &impl Fn(&mut HashMap<RequestId, mpsc::Sender<TokenEvent>>, RequestId),
) -> bool {
    match cmd {
        Command::Add(id, req, tx) => {
            engine.add_request(id, req);
            sinks.insert(id, tx);
        }
        Command::Abort(id) => {
            if let Some(ev) = engine.abort(id) {
                if let Some(tx) = sinks.get(&id) {
                    let _ = tx.try_send(ev);
                }
            }
            finish(sinks, id);
        }
        Command::Stats(reply) => {
            let _ = reply.send(engine.stats());
        }
        Command::KvSnapshot(reply) => {
            // Publish what is pending first, so the snapshot's id covers every event sent.
            for ev in engine.drain_kv_events() {
                let _ = kv_tx.send(ev);
            }
            let pool = engine.block_pool();
            let _ = reply.send(KvSnapshot {
                last_event_id: pool.last_event_id(),
                hashes: pool.cached_hashes(),
            });
        }
        Command::ResetPrefixCache(reply) => {
            let _ = reply.send(engine.reset_prefix_cache());
        }
        Command::Shutdown => return false,
    }
    true
}
