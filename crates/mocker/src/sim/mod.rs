//! A discrete-event cluster simulator on virtual time: N mock instances (each the real
//! scheduler and block pool over a [`MockExecutor`](crate::MockExecutor) in
//! [`Timing::Virtual`](crate::Timing)), requests arriving at given times, and a router the
//! caller supplies through [`SimRouter`]. No threads, no HTTP, deterministic.
//!
//! Time moves from event to event (a binary heap of step completions merged with the
//! sorted arrivals). It follows the real engine loop:
//! - an arriving request is routed and enters its instance's waiting queue at once; an
//!   idle instance starts a step right away, a busy one picks the request up at its next
//!   step boundary;
//! - a step is scheduled and executed when it starts (so it sees exactly the requests
//!   queued by then) and lasts its modelled time; its token events and KV events are
//!   delivered when it completes, and the instance starts its next step at that moment;
//! - at equal times, completions are handled before arrivals (a router hears the KV events
//!   of a step that ends as a request arrives), and steps start only once every event of
//!   that instant is in, lowest instance first.

mod report;
pub mod workload;

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use engine::core::{GenerateRequest, LlmEngine, RequestId, TokenEvent};
use protocol::KvEvent;

use crate::{build_mock_engine, MockError, MockExecutor, MockOptions};

pub use report::{InstanceReport, LatencySummary, RequestRecord, SimReport};

/// One request of a simulated workload.
#[derive(Clone, Debug, PartialEq)]
pub struct SimRequest {
    /// Arrival time in seconds of virtual time.
    pub arrival_s: f64,
    pub prompt: Vec<u32>,
    pub max_tokens: u32,
}

/// The routing policy under test. Requests are identified by their index in the list
/// given to [`Simulator::run`].
pub trait SimRouter {
    /// Picks the instance for a request arriving at `now` (seconds).
    fn route(&mut self, now: f64, req_id: u64, prompt: &[u32]) -> usize;
    /// The KV events an instance published during a step (in order), delivered when the
    /// step completes.
    fn on_kv_events(&mut self, instance: usize, events: &[KvEvent]);
    fn on_first_token(&mut self, instance: usize, req_id: u64);
    /// Called once per routed request, also for one the instance refused at admission.
    fn on_finish(&mut self, instance: usize, req_id: u64);
}

/// Instances in turn, ignoring everything else.
#[derive(Clone, Debug)]
pub struct RoundRobin {
    num_instances: usize,
    next: usize,
}

impl RoundRobin {
    pub fn new(num_instances: usize) -> Self {
        RoundRobin {
            num_instances: num_instances.max(1),
            next: 0,
        }
    }
}

impl SimRouter for RoundRobin {
    fn route(&mut self, _now: f64, _req_id: u64, _prompt: &[u32]) -> usize {
        let i = self.next;
        self.next = (self.next + 1) % self.num_instances;
        i
    }

    fn on_kv_events(&mut self, _instance: usize, _events: &[KvEvent]) {}

    fn on_first_token(&mut self, _instance: usize, _req_id: u64) {}

    fn on_finish(&mut self, _instance: usize, _req_id: u64) {}
}

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("instance {instance}: {source}")]
    Instance {
        instance: usize,
        #[source]
        source: MockError,
    },
    #[error("the simulation needs at least one instance")]
    NoInstances,
    #[error("requests[{index}].arrival_s must be a finite number ≥ 0, got {value}")]
    BadArrival { index: usize, value: f64 },
    #[error(
        "the router sent request {req_id} to instance {instance}, but there are {num_instances}"
    )]
    BadRoute {
        req_id: u64,
        instance: usize,
        num_instances: usize,
    },
}

/// A fixed set of instance configurations; each [`run`](Self::run) starts them empty.
#[derive(Clone, Debug)]
pub struct Simulator {
    instances: Vec<MockOptions>,
}

impl Simulator {
    /// One instance per entry, each switched to virtual time.
    pub fn new(instances: Vec<MockOptions>) -> Result<Self, SimError> {
        if instances.is_empty() {
            return Err(SimError::NoInstances);
        }
        let instances: Vec<MockOptions> = instances
            .into_iter()
            .map(MockOptions::virtual_time)
            .collect();
        for (instance, o) in instances.iter().enumerate() {
            o.validate()
                .map_err(|source| SimError::Instance { instance, source })?;
        }
        Ok(Simulator { instances })
    }

    /// `n` identical instances.
    pub fn uniform(opts: &MockOptions, n: usize) -> Result<Self, SimError> {
        Self::new(vec![opts.clone(); n])
    }

    pub fn num_instances(&self) -> usize {
        self.instances.len()
    }

    /// Runs `requests` to completion through `router`.
    pub fn run<R: SimRouter + ?Sized>(
        &self,
        requests: &[SimRequest],
        router: &mut R,
    ) -> Result<SimReport, SimError> {
        for (index, r) in requests.iter().enumerate() {
            if !(r.arrival_s.is_finite() && r.arrival_s >= 0.0) {
                return Err(SimError::BadArrival {
                    index,
                    value: r.arrival_s,
                });
            }
        }
        let mut instances = Vec::with_capacity(self.instances.len());
        for (instance, o) in self.instances.iter().enumerate() {
            let engine =
                build_mock_engine(o).map_err(|source| SimError::Instance { instance, source })?;
            instances.push(Instance {
                engine,
                busy: false,
                held: None,
                requests: 0,
                busy_s: 0.0,
            });
        }
        let mut run = Run {
            instances,
            tracks: requests
                .iter()
                .map(|r| Track::new(r.arrival_s, r.prompt.len()))
                .collect(),
            itl: Vec::new(),
            due: BinaryHeap::new(),
            kicked: Vec::new(),
        };
        run.drive(requests, router)?;
        Ok(report::build(
            requests,
            &run.tracks,
            &run.itl,
            run.instances.iter().map(|i| InstanceReport {
                requests: i.requests,
                steps: i.engine.executor().steps(),
                busy_s: i.busy_s,
                preemptions: i.engine.stats().preemptions,
            }),
        ))
    }
}

/// A step's token events and the KV events its block pool emitted.
struct StepOutput {
    tokens: Vec<(RequestId, TokenEvent)>,
    kv: Vec<KvEvent>,
}

struct Instance {
    engine: LlmEngine<MockExecutor>,
    /// A step is in flight (its completion is in the heap).
    busy: bool,
    /// What the step in flight produced, delivered when it completes.
    held: Option<StepOutput>,
    requests: u64,
    busy_s: f64,
}

/// What is known about one request as its events arrive.
#[derive(Clone, Debug)]
pub(crate) struct Track {
    pub arrival_s: f64,
    pub prompt_tokens: u32,
    pub instance: Option<usize>,
    pub first_token_s: Option<f64>,
    pub last_token_s: f64,
    pub output_tokens: u32,
    pub cached_prompt_tokens: u32,
    pub itl_sum: f64,
    pub itl_max: f64,
    pub finish_s: Option<f64>,
    pub finish_reason: Option<engine::core::FinishReason>,
    pub error: Option<String>,
}

impl Track {
    fn new(arrival_s: f64, prompt_tokens: usize) -> Self {
        Track {
            arrival_s,
            prompt_tokens: prompt_tokens as u32,
            instance: None,
            first_token_s: None,
            last_token_s: 0.0,
            output_tokens: 0,
            cached_prompt_tokens: 0,
            itl_sum: 0.0,
            itl_max: 0.0,
            finish_s: None,
            finish_reason: None,
            error: None,
        }
    }
}

/// A step completion in the heap: earliest first, then lowest instance.
#[derive(Clone, Copy, Debug)]
struct Due {
    at: f64,
    instance: usize,
}

impl PartialEq for Due {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Due {}

impl PartialOrd for Due {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Due {
    /// Reversed, so that `BinaryHeap` (a max-heap) pops the earliest.
    fn cmp(&self, other: &Self) -> Ordering {
        other
            .at
            .total_cmp(&self.at)
            .then(other.instance.cmp(&self.instance))
    }
}

/// Steps in a row that may run nothing (a preemption that idles the batch, requests that
/// can never fit) before an instance is left idle until its next arrival.
const MAX_EMPTY_STEPS: usize = 64;

struct Run {
    instances: Vec<Instance>,
    tracks: Vec<Track>,
    itl: Vec<f64>,
    due: BinaryHeap<Due>,
    /// Instances touched at the current instant, to start a step on if idle.
    kicked: Vec<usize>,
}

impl Run {
    fn drive<R: SimRouter + ?Sized>(
        &mut self,
        requests: &[SimRequest],
        router: &mut R,
    ) -> Result<(), SimError> {
        let mut order: Vec<usize> = (0..requests.len()).collect();
        order.sort_by(|&a, &b| {
            requests[a]
                .arrival_s
                .total_cmp(&requests[b].arrival_s)
                .then(a.cmp(&b))
        });
        let mut next_arrival = 0;
        loop {
            let done_at = self.due.peek().map(|d| d.at);
            let arrive_at = order.get(next_arrival).map(|&i| requests[i].arrival_s);
            let now = match (done_at, arrive_at) {
                (None, None) => break,
                (Some(d), None) => d,
                (None, Some(a)) => a,
                (Some(d), Some(a)) => d.min(a),
            };
            while self.due.peek().is_some_and(|d| d.at == now) {
                let d = self.due.pop().expect("peeked");
                self.complete(d.instance, now, router);
            }
            while let Some(&index) = order.get(next_arrival) {
                if requests[index].arrival_s != now {
                    break;
                }
                next_arrival += 1;
                self.arrive(index, &requests[index], now, router)?;
            }
            self.kicked.sort_unstable();
            self.kicked.dedup();
            for i in std::mem::take(&mut self.kicked) {
                self.start_step(i, now, router);
            }
        }
        Ok(())
    }

    fn arrive<R: SimRouter + ?Sized>(
        &mut self,
        index: usize,
        req: &SimRequest,
        now: f64,
        router: &mut R,
    ) -> Result<(), SimError> {
        let id = index as u64;
        let instance = router.route(now, id, &req.prompt);
        let num_instances = self.instances.len();
        let inst = self.instances.get_mut(instance).ok_or(SimError::BadRoute {
            req_id: id,
            instance,
            num_instances,
        })?;
        inst.requests += 1;
        let track = &mut self.tracks[index];
        track.instance = Some(instance);
        let gen = GenerateRequest::greedy(req.prompt.clone(), req.max_tokens);
        if let Err(e) = inst.engine.validate(&gen) {
            track.error = Some(e.to_string());
            track.finish_s = Some(now);
            router.on_finish(instance, id);
            return Ok(());
        }
        inst.engine.add_request(id, gen);
        self.kicked.push(instance);
        Ok(())
    }

    fn complete<R: SimRouter + ?Sized>(&mut self, i: usize, now: f64, router: &mut R) {
        let inst = &mut self.instances[i];
        inst.busy = false;
        if let Some(out) = inst.held.take() {
            self.deliver(i, now, out.tokens, out.kv, router);
        }
        self.kicked.push(i);
    }

    /// Starts instance `i`'s next step at `now` if it is idle and has work.
    fn start_step<R: SimRouter + ?Sized>(&mut self, i: usize, now: f64, router: &mut R) {
        for _ in 0..MAX_EMPTY_STEPS {
            let inst = &mut self.instances[i];
            if inst.busy || !inst.engine.has_work() {
                return;
            }
            let before = inst.engine.executor().steps();
            let tokens = inst.engine.step();
            let kv = inst.engine.drain_kv_events();
            if inst.engine.executor().steps() != before {
                let dt = inst.engine.executor().last_step_seconds();
                inst.busy = true;
                inst.busy_s += dt;
                inst.held = Some(StepOutput { tokens, kv });
                self.due.push(Due {
                    at: now + dt,
                    instance: i,
                });
                return;
            }
            // Nothing ran: whatever the scheduler decided (requests that can never fit)
            // takes no time.
            self.deliver(i, now, tokens, kv, router);
        }
    }

    fn deliver<R: SimRouter + ?Sized>(
        &mut self,
        instance: usize,
        now: f64,
        tokens: Vec<(RequestId, TokenEvent)>,
        kv: Vec<KvEvent>,
        router: &mut R,
    ) {
        if !kv.is_empty() {
            router.on_kv_events(instance, &kv);
        }
        for (id, ev) in tokens {
            let t = &mut self.tracks[id as usize];
            t.cached_prompt_tokens = ev.cached_prompt_tokens;
            if ev.token.is_some() {
                t.output_tokens += 1;
                if t.first_token_s.is_none() {
                    t.first_token_s = Some(now);
                    router.on_first_token(instance, id);
                } else {
                    let gap = now - t.last_token_s;
                    t.itl_sum += gap;
                    t.itl_max = t.itl_max.max(gap);
                    self.itl.push(gap);
                }
                t.last_token_s = now;
            }
            if ev.finish_reason.is_some() {
                t.finish_s = Some(now);
                t.finish_reason = ev.finish_reason;
                router.on_finish(instance, id);
            }
        }
    }
}
