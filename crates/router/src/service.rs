//! The live router: instances from the discovery plane, their prefix caches from the
//! event plane, requests out over the request plane.
//!
//! Background tasks (on the Tokio runtime [`Router::start`] is called from):
//! - a discovery watcher adds and drops instances; a new instance is resynchronised from a
//!   snapshot at once, since it may have published events before the router attached;
//! - an event consumer applies KV events to the index; a gap in an instance's event ids
//!   (or a lagging subscription) queues a resynchronisation;
//! - a resync worker fetches snapshots;
//! - a health check drops instances that stopped taking requests.
//!
//! Failure policy. An instance that fails is deregistered, which removes it from routing
//! and drops its index entries. Its in-flight requests that have not produced a token
//! yet are re-routed to another instance: the client has seen nothing, so resubmitting
//! the same request is invisible to it (seeded sampling gives the same tokens). Requests
//! that already streamed tokens end with an abort (the frontend answers 503 / an SSE
//! error): resuming them elsewhere would need their generated tokens to be re-prefilled,
//! which is sequence migration, a separate feature.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use engine::core::{EngineStats, FinishReason, GenerateRequest, SubmitError, TokenEvent};
use futures_util::stream::{self, BoxStream, StreamExt};
use runtime::{Discovery, DiscoveryEvent, EventPlane, InstanceClient, InstanceInfo, TokenStream};
use serde::Serialize;
use tokio::sync::{broadcast, mpsc};

use crate::active::{ActiveGuard, InstanceLoad};
use crate::index::KvIndex;
use crate::policy::{Candidate, KvWeights, RouteRequest, RouterMode, Selector};
use crate::InstanceId;

#[derive(Clone, Debug)]
pub struct RouterConfig {
    pub mode: RouterMode,
    pub weights: KvWeights,
    /// Seed of the tie-breaking and softmax draws.
    pub seed: u64,
    /// How often instances are checked for liveness.
    pub health_interval: Duration,
}

impl Default for RouterConfig {
    fn default() -> Self {
        RouterConfig {
            mode: RouterMode::Kv,
            weights: KvWeights::default(),
            seed: 0,
            health_interval: Duration::from_millis(500),
        }
    }
}

struct Instance {
    info: InstanceInfo,
    client: Arc<dyn InstanceClient>,
    load: Arc<InstanceLoad>,
    routed: AtomicU64,
}

/// Router counters, for `/admin/stats` and tests.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RouterStats {
    pub mode: &'static str,
    pub instances: usize,
    pub routed: u64,
    /// Requests placed again after their instance failed before their first token.
    pub rerouted: u64,
    /// Requests that lost their instance after streaming tokens.
    pub failed_midstream: u64,
    pub instance_failures: u64,
    pub resyncs: u64,
    pub index_blocks: usize,
}

/// One instance as `/admin/stats` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct InstanceStats {
    pub info: InstanceInfo,
    pub routed: u64,
    pub active_seqs: usize,
    pub indexed_blocks: usize,
    pub engine: Option<EngineStats>,
}

struct Inner {
    cfg: RouterConfig,
    discovery: Arc<dyn Discovery>,
    /// Sorted by id; replaced whole on change so routing clones one `Arc`.
    instances: RwLock<Arc<Vec<Arc<Instance>>>>,
    index: RwLock<KvIndex>,
    selector: Mutex<Selector>,
    resync_tx: mpsc::Sender<InstanceId>,
    routed: AtomicU64,
    rerouted: AtomicU64,
    failed_midstream: AtomicU64,
    instance_failures: AtomicU64,
    resyncs: AtomicU64,
    /// Set by [`Router::shutdown_all`]: instances stopping now are not failures, and
    /// their requests are not re-routed.
    stopping: AtomicBool,
}

/// A cheap `Clone` handle to the router; the background tasks stop when the last handle
/// is dropped.
#[derive(Clone)]
pub struct Router {
    inner: Arc<Inner>,
}

impl Router {
    /// Starts routing over whatever `discovery` lists, now and later.
    pub fn start(
        cfg: RouterConfig,
        discovery: Arc<dyn Discovery>,
        events: Arc<dyn EventPlane>,
    ) -> Router {
        let (resync_tx, resync_rx) = mpsc::channel(1024);
        // Subscribe before looking at the instances: events published in between are
        // buffered, then dropped as stale by the snapshot each new instance gets.
        let ev_rx = events.subscribe();
        let (initial, disc_rx) = discovery.watch();
        let inner = Arc::new(Inner {
            selector: Mutex::new(Selector::new(cfg.mode, cfg.weights, cfg.seed)),
            cfg,
            discovery,
            instances: RwLock::new(Arc::new(Vec::new())),
            index: RwLock::new(KvIndex::new()),
            resync_tx,
            routed: AtomicU64::new(0),
            rerouted: AtomicU64::new(0),
            failed_midstream: AtomicU64::new(0),
            instance_failures: AtomicU64::new(0),
            resyncs: AtomicU64::new(0),
            stopping: AtomicBool::new(false),
        });
        for (info, client) in initial {
            inner.add_instance(info, client);
        }
        let weak = Arc::downgrade(&inner);
        tokio::spawn(watch_discovery(weak.clone(), disc_rx));
        // Only KV routing reads the index; the other modes skip its upkeep.
        if inner.cfg.mode == RouterMode::Kv {
            tokio::spawn(consume_events(weak.clone(), ev_rx));
            tokio::spawn(resync_worker(weak.clone(), resync_rx));
        }
        tokio::spawn(health_check(weak));
        Router { inner }
    }

    pub fn mode(&self) -> RouterMode {
        self.inner.cfg.mode
    }

    pub fn num_instances(&self) -> usize {
        self.inner.snapshot().len()
    }

    /// Routes `reqs` (choices of one API call, sharing a prompt) to one instance and
    /// returns their token streams, all or none.
    pub async fn submit_many(
        &self,
        reqs: Vec<GenerateRequest>,
    ) -> Result<Vec<BoxStream<'static, TokenEvent>>, SubmitError> {
        let (inst, streams) = self.inner.place(&reqs, &HashSet::new()).await?;
        let keep = self.inner.snapshot().len() > 1;
        Ok(streams
            .into_iter()
            .zip(reqs)
            .map(|((stream, guard), req)| {
                let prompt_tokens = req.prompt.len() as u32;
                routed_stream(
                    Arc::downgrade(&self.inner),
                    Arc::clone(&inst),
                    stream,
                    guard,
                    keep.then_some(req),
                    prompt_tokens,
                )
            })
            .collect())
    }

    /// Requests admitted and unfinished, summed over instances.
    pub fn pending(&self) -> usize {
        self.inner
            .snapshot()
            .iter()
            .map(|i| i.client.pending())
            .sum()
    }

    /// Engine counters summed over instances (`kv_usage` is the mean); `None` when no
    /// instance answered.
    pub async fn engine_stats(&self) -> Option<EngineStats> {
        let all = self.instance_stats().await;
        let answered: Vec<&EngineStats> = all.iter().filter_map(|s| s.engine.as_ref()).collect();
        if answered.is_empty() {
            return None;
        }
        let mut sum = EngineStats::default();
        for s in &answered {
            sum.running += s.running;
            sum.waiting += s.waiting;
            sum.blocks_total += s.blocks_total;
            sum.blocks_used += s.blocks_used;
            sum.blocks_free += s.blocks_free;
            sum.prefix_query_tokens += s.prefix_query_tokens;
            sum.prefix_hit_tokens += s.prefix_hit_tokens;
            sum.preemptions += s.preemptions;
            sum.steps += s.steps;
            sum.step_times.merge(&s.step_times);
        }
        sum.kv_usage = answered.iter().map(|s| s.kv_usage).sum::<f32>() / answered.len() as f32;
        Some(sum)
    }

    pub async fn instance_stats(&self) -> Vec<InstanceStats> {
        let insts = self.inner.snapshot();
        // Ask every instance at once: each answers between two of its engine steps.
        let engines = futures_util::future::join_all(
            insts
                .iter()
                .map(|i| tokio::time::timeout(Duration::from_secs(5), i.client.stats())),
        )
        .await;
        let index = self.inner.index.read().expect("index lock");
        insts
            .iter()
            .zip(engines)
            .map(|(i, engine)| InstanceStats {
                info: i.info.clone(),
                routed: i.routed.load(Ordering::Relaxed),
                active_seqs: i.load.load().active_seqs,
                indexed_blocks: index.num_blocks(i.info.id),
                engine: engine.ok().flatten(),
            })
            .collect()
    }

    pub fn stats(&self) -> RouterStats {
        let inner = &self.inner;
        RouterStats {
            mode: inner.cfg.mode.name(),
            instances: inner.snapshot().len(),
            routed: inner.routed.load(Ordering::Relaxed),
            rerouted: inner.rerouted.load(Ordering::Relaxed),
            failed_midstream: inner.failed_midstream.load(Ordering::Relaxed),
            instance_failures: inner.instance_failures.load(Ordering::Relaxed),
            resyncs: inner.resyncs.load(Ordering::Relaxed),
            index_blocks: inner.index.read().expect("index lock").total_entries(),
        }
    }

    /// Asks every instance to drop its prefix cache; true if all did.
    pub async fn reset_prefix_cache(&self) -> bool {
        let mut ok = true;
        for i in self.inner.snapshot().iter() {
            ok &= i.client.reset_prefix_cache().await.unwrap_or(false);
        }
        ok
    }

    /// Stops one instance (its in-flight requests end as described in the module docs)
    /// and takes it out of discovery. False if no such instance is registered.
    pub async fn stop_instance(&self, id: InstanceId) -> bool {
        let Some(inst) = self
            .inner
            .snapshot()
            .iter()
            .find(|i| i.info.id == id)
            .cloned()
        else {
            return false;
        };
        let client = Arc::clone(&inst.client);
        // Stopping joins an engine thread: keep it off the async workers.
        let _ = tokio::task::spawn_blocking(move || client.shutdown()).await;
        self.inner.fail(id);
        true
    }

    /// Stops every instance, for server shutdown.
    pub async fn shutdown_all(&self) {
        self.inner.stopping.store(true, Ordering::Release);
        for i in self.inner.snapshot().iter() {
            let client = Arc::clone(&i.client);
            let _ = tokio::task::spawn_blocking(move || client.shutdown()).await;
        }
    }
}

impl Inner {
    fn snapshot(&self) -> Arc<Vec<Arc<Instance>>> {
        Arc::clone(&self.instances.read().expect("instances lock"))
    }

    fn add_instance(&self, info: InstanceInfo, client: Arc<dyn InstanceClient>) {
        let id = info.id;
        {
            let mut g = self.instances.write().expect("instances lock");
            // Prompts are hashed once per request with one block size; an instance with
            // another would never match, and its load would be misjudged.
            if let Some(other) = g
                .iter()
                .find(|i| i.info.id != id && i.info.block_size != info.block_size)
            {
                tracing::error!(
                    instance = id,
                    "not routing to this instance: its KV block size {} differs from instance {}'s {}",
                    info.block_size,
                    other.info.id,
                    other.info.block_size
                );
                return;
            }
            let mut v: Vec<Arc<Instance>> = g.iter().filter(|i| i.info.id != id).cloned().collect();
            v.push(Arc::new(Instance {
                info,
                client,
                load: Arc::new(InstanceLoad::default()),
                routed: AtomicU64::new(0),
            }));
            v.sort_by_key(|i| i.info.id);
            *g = Arc::new(v);
        }
        self.index.write().expect("index lock").add_instance(id);
        let _ = self.resync_tx.try_send(id);
        tracing::info!(instance = id, "instance joined the router");
    }

    fn remove_instance(&self, id: InstanceId) {
        {
            let mut g = self.instances.write().expect("instances lock");
            if !g.iter().any(|i| i.info.id == id) {
                return;
            }
            let v: Vec<Arc<Instance>> = g.iter().filter(|i| i.info.id != id).cloned().collect();
            *g = Arc::new(v);
        }
        self.index.write().expect("index lock").remove_instance(id);
        tracing::info!(instance = id, "instance left the router");
    }

    /// Takes a failed instance out of routing now and out of discovery.
    fn fail(&self, id: InstanceId) {
        if self.stopping.load(Ordering::Acquire) {
            return;
        }
        if self.snapshot().iter().any(|i| i.info.id == id) {
            self.instance_failures.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(instance = id, "instance failed; removing it from routing");
        }
        self.remove_instance(id);
        self.discovery.deregister(id);
    }

    /// Chooses an instance (skipping `exclude`) and submits there. An instance that
    /// refuses because it is shutting down is failed and the next choice is tried.
    async fn place(
        &self,
        reqs: &[GenerateRequest],
        exclude: &HashSet<InstanceId>,
    ) -> Result<(Arc<Instance>, Vec<(TokenStream, ActiveGuard)>), SubmitError> {
        let prompt = &reqs.first().expect("at least one request").prompt;
        let mut tried: HashSet<InstanceId> = exclude.clone();
        loop {
            let (inst, new_tokens, blocks) = self.choose(prompt, &tried)?;
            let guards: Vec<ActiveGuard> = reqs
                .iter()
                .map(|_| inst.load.start(blocks, new_tokens))
                .collect();
            match inst.client.submit_many(reqs.to_vec()).await {
                Ok(streams) => {
                    inst.routed.fetch_add(reqs.len() as u64, Ordering::Relaxed);
                    self.routed.fetch_add(reqs.len() as u64, Ordering::Relaxed);
                    return Ok((inst, streams.into_iter().zip(guards).collect()));
                }
                Err(SubmitError::ShuttingDown) if !inst.client.is_alive() => {
                    drop(guards);
                    self.fail(inst.info.id);
                    tried.insert(inst.info.id);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The instance for `prompt`, with the uncached tokens and prompt blocks it counts.
    fn choose(
        &self,
        prompt: &[u32],
        exclude: &HashSet<InstanceId>,
    ) -> Result<(Arc<Instance>, usize, usize), SubmitError> {
        let insts = self.snapshot();
        let live: Vec<&Arc<Instance>> = insts
            .iter()
            .filter(|i| !exclude.contains(&i.info.id))
            .collect();
        let Some(first) = live.first() else {
            return Err(SubmitError::Unavailable(
                "no engine instance is available to serve this request".into(),
            ));
        };
        let bs = first.info.block_size;
        let req = RouteRequest {
            prompt_tokens: prompt.len(),
            block_size: bs,
        };
        if live.len() == 1 {
            let inst = Arc::clone(first);
            return Ok((inst, req.new_tokens(0), req.blocks()));
        }
        let mut overlaps = Vec::new();
        if self.cfg.mode == RouterMode::Kv {
            let hashes = tokens::block_hashes(prompt, bs);
            self.index
                .read()
                .expect("index lock")
                .overlaps(&hashes, &mut overlaps);
            // `live` is sorted by id: sort the overlaps too and join them in one pass.
            overlaps.sort_unstable_by_key(|&(id, _)| id);
        }
        let mut ov = overlaps.iter().peekable();
        let cands: Vec<Candidate> = live
            .iter()
            .map(|i| {
                let id = i.info.id;
                while ov.next_if(|&&(o, _)| o < id).is_some() {}
                let overlap_blocks = ov.next_if(|&&(o, _)| o == id).map_or(0, |&(_, n)| n);
                Candidate {
                    instance: id,
                    overlap_blocks,
                    load: i.load.load(),
                }
            })
            .collect();
        let pick = self
            .selector
            .lock()
            .expect("selector lock")
            .select(&cands, &req)
            .expect("candidates are not empty");
        let c = cands[pick];
        Ok((
            Arc::clone(live[pick]),
            req.new_tokens(c.overlap_blocks),
            req.blocks(),
        ))
    }
}

/// Wraps an instance's stream: marks the prefill done at the first token, frees the load
/// at the end, and handles the instance failing under it (see the module docs).
fn routed_stream(
    router: Weak<Inner>,
    inst: Arc<Instance>,
    stream: TokenStream,
    guard: ActiveGuard,
    req: Option<GenerateRequest>,
    prompt_tokens: u32,
) -> BoxStream<'static, TokenEvent> {
    struct State {
        router: Weak<Inner>,
        inst: Arc<Instance>,
        stream: TokenStream,
        guard: Option<ActiveGuard>,
        req: Option<GenerateRequest>,
        got_token: bool,
        done: bool,
        prompt_tokens: u32,
    }
    let st = State {
        router,
        inst,
        stream,
        guard: Some(guard),
        req,
        got_token: false,
        done: false,
        prompt_tokens,
    };
    stream::unfold(st, |mut st| async move {
        loop {
            if st.done {
                return None;
            }
            let ev = st.stream.next().await;
            let lost = match &ev {
                None => true,
                Some(e) => {
                    e.finish_reason == Some(FinishReason::Abort) && !st.inst.client.is_alive()
                }
            };
            if !lost {
                let ev = ev.expect("checked above");
                if ev.token.is_some() && !st.got_token {
                    st.got_token = true;
                    if let Some(g) = st.guard.as_mut() {
                        g.prefill_done();
                    }
                }
                if ev.finish_reason.is_some() {
                    st.done = true;
                    st.guard = None;
                }
                return Some((ev, st));
            }
            // The instance went away under this request.
            st.guard = None;
            let router = st.router.upgrade();
            let Some(router) = router.filter(|r| !r.stopping.load(Ordering::Acquire)) else {
                st.done = true;
                return Some((abort_event(st.prompt_tokens), st));
            };
            router.fail(st.inst.info.id);
            match (&st.req, st.got_token) {
                (Some(req), false) => {
                    let mut exclude = HashSet::new();
                    exclude.insert(st.inst.info.id);
                    match router.place(std::slice::from_ref(req), &exclude).await {
                        Ok((inst, mut placed)) => {
                            router.rerouted.fetch_add(1, Ordering::Relaxed);
                            let (stream, guard) = placed.pop().expect("one request placed");
                            st.inst = inst;
                            st.stream = stream;
                            st.guard = Some(guard);
                            continue;
                        }
                        Err(e) => {
                            tracing::warn!("re-routing after an instance failure: {e}");
                        }
                    }
                }
                _ => {
                    router.failed_midstream.fetch_add(1, Ordering::Relaxed);
                }
            }
            st.done = true;
            return Some((abort_event(st.prompt_tokens), st));
        }
    })
    .boxed()
}

fn abort_event(prompt_tokens: u32) -> TokenEvent {
    TokenEvent {
        token: None,
        logprob: None,
        top_logprobs: Vec::new(),
        finish_reason: Some(FinishReason::Abort),
        prompt_tokens,
        cached_prompt_tokens: 0,
        sent_at: None,
    }
}

async fn watch_discovery(router: Weak<Inner>, mut rx: broadcast::Receiver<DiscoveryEvent>) {
    loop {
        let ev = rx.recv().await;
        let Some(r) = router.upgrade() else { return };
        match ev {
            Ok(DiscoveryEvent::Added(info, client)) => r.add_instance(info, client),
            Ok(DiscoveryEvent::Removed(id)) => r.remove_instance(id),
            Err(broadcast::error::RecvError::Lagged(_)) => {
                // Start over from the registry's current set.
                let (now, fresh) = r.discovery.watch();
                rx = fresh;
                let ids: HashSet<InstanceId> = now.iter().map(|(i, _)| i.id).collect();
                for gone in r.snapshot().iter().filter(|i| !ids.contains(&i.info.id)) {
                    r.remove_instance(gone.info.id);
                }
                let known: HashSet<InstanceId> = r.snapshot().iter().map(|i| i.info.id).collect();
                for (info, client) in now {
                    if !known.contains(&info.id) {
                        r.add_instance(info, client);
                    }
                }
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

async fn consume_events(
    router: Weak<Inner>,
    mut rx: broadcast::Receiver<Arc<runtime::InstanceEvents>>,
) {
    loop {
        let batch = rx.recv().await;
        let Some(r) = router.upgrade() else { return };
        match batch {
            Ok(b) => {
                if !r.snapshot().iter().any(|i| i.info.id == b.instance) {
                    continue;
                }
                let mut gap = false;
                {
                    let mut index = r.index.write().expect("index lock");
                    for ev in &b.events {
                        gap |= index.apply(b.instance, ev).is_err();
                    }
                }
                if gap {
                    let _ = r.resync_tx.try_send(b.instance);
                }
            }
            Err(broadcast::error::RecvError::Lagged(n)) => {
                tracing::warn!("the router missed {n} KV event batches; resynchronising");
                for i in r.snapshot().iter() {
                    let _ = r.resync_tx.try_send(i.info.id);
                }
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

async fn resync_worker(router: Weak<Inner>, mut rx: mpsc::Receiver<InstanceId>) {
    while let Some(id) = rx.recv().await {
        let Some(r) = router.upgrade() else { return };
        let Some(inst) = r.snapshot().iter().find(|i| i.info.id == id).cloned() else {
            continue;
        };
        let snap = tokio::time::timeout(Duration::from_secs(10), inst.client.kv_snapshot()).await;
        match snap {
            Ok(Some(s)) => {
                // Only if the instance is still routed: a late snapshot must not revive it.
                if r.snapshot().iter().any(|i| i.info.id == id) {
                    r.index
                        .write()
                        .expect("index lock")
                        .resync(id, s.last_event_id, &s.hashes);
                    r.resyncs.fetch_add(1, Ordering::Relaxed);
                }
            }
            _ if !inst.client.is_alive() => r.fail(id),
            _ => tracing::warn!(instance = id, "no KV snapshot; will retry on the next gap"),
        }
    }
}

async fn health_check(router: Weak<Inner>) {
    let interval = match router.upgrade() {
        Some(r) => r.cfg.health_interval,
        None => return,
    };
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(r) = router.upgrade() else { return };
        for i in r.snapshot().iter() {
            if !i.client.is_alive() {
                r.fail(i.info.id);
            }
        }
    }
}
