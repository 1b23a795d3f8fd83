//! The live router over real engine cores (with a trivial executor: no model math) and
//! the embedded planes: KV events reach the index, gaps resynchronise, dead instances are
//! dropped.

use std::sync::Arc;
use std::time::{Duration, Instant};

use engine::backend::ForwardBatch;
use engine::core::{
    EngineConfig, EngineHandle, Executor, FinishReason, GenerateRequest, HandleOptions, LlmEngine,
    SchedulerConfig,
};
use futures_util::StreamExt;
use protocol::{KvEvent, KvEventData};
use router::{Router, RouterConfig, RouterMode};
use runtime::{
    Discovery, EventPlane, InstanceEvents, InstanceInfo, LocalClient, LocalDiscovery,
    LocalEventPlane, Role,
};

const VOCAB: usize = 64;
const BS: usize = 16;

/// Always predicts token 5.
struct Constant;

impl Executor for Constant {
    fn vocab_size(&self) -> usize {
        VOCAB
    }
    fn execute(&mut self, batch: &ForwardBatch) -> Vec<f32> {
        let mut out = vec![0.0; batch.logit_rows.len() * VOCAB];
        for row in out.chunks_mut(VOCAB) {
            row[5] = 10.0;
        }
        out
    }
}

struct Cluster {
    discovery: Arc<LocalDiscovery>,
    events: Arc<LocalEventPlane>,
    handles: Vec<EngineHandle>,
    router: Router,
}

fn cluster(n: usize, mode: RouterMode) -> Cluster {
    let discovery = Arc::new(LocalDiscovery::new());
    let events = Arc::new(LocalEventPlane::new(256));
    let mut handles = Vec::new();
    for id in 0..n as u64 {
        let cfg = EngineConfig {
            scheduler: SchedulerConfig {
                block_size: BS,
                num_blocks: 64,
                ..SchedulerConfig::default()
            },
            max_model_len: 1024,
            eos_token_ids: vec![],
        };
        let h = EngineHandle::spawn(LlmEngine::new(cfg, Constant), HandleOptions::default());
        events.forward(id, h.subscribe_kv_events());
        let info = InstanceInfo {
            id,
            model: "m".into(),
            role: Role::Both,
            block_size: BS,
            kv_blocks: 64,
            device: "test".into(),
            tensor_parallel: 1,
        };
        discovery.register(info, Arc::new(LocalClient::new(h.clone())));
        handles.push(h);
    }
    let router = Router::start(
        RouterConfig {
            mode,
            health_interval: Duration::from_millis(20),
            ..RouterConfig::default()
        },
        discovery.clone(),
        events.clone(),
    );
    Cluster {
        discovery,
        events,
        handles,
        router,
    }
}

async fn run(router: &Router, prompt: Vec<u32>) -> (usize, Option<FinishReason>) {
    let mut streams = router
        .submit_many(vec![GenerateRequest::greedy(prompt, 3)])
        .await
        .expect("submitted");
    let mut s = streams.pop().unwrap();
    let mut tokens = 0;
    let mut finish = None;
    while let Some(ev) = s.next().await {
        tokens += ev.token.is_some() as usize;
        finish = ev.finish_reason;
    }
    (tokens, finish)
}

async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

async fn routed(router: &Router) -> Vec<u64> {
    router
        .instance_stats()
        .await
        .iter()
        .map(|i| i.routed)
        .collect()
}

fn prompt(seed: u32, len: usize) -> Vec<u32> {
    (0..len as u32)
        .map(|i| (seed * 7 + i * 3) % VOCAB as u32)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_mode_follows_the_events_to_the_cached_instance() {
    let c = cluster(4, RouterMode::Kv);
    wait_for("instances", || c.router.num_instances() == 4).await;
    let p = prompt(1, 4 * BS + 3);
    assert_eq!(
        run(&c.router, p.clone()).await,
        (3, Some(FinishReason::Length))
    );
    // The prompt's 4 full blocks reach the index through the event plane.
    wait_for("index", || c.router.stats().index_blocks >= 4).await;
    let first = routed(&c.router).await;
    let holder = first.iter().position(|&n| n == 1).unwrap();
    // The same prefix with other suffixes goes where the prefix is, every time.
    for k in 0..8 {
        let mut q = p[..4 * BS].to_vec();
        q.extend(prompt(100 + k, 5));
        run(&c.router, q).await;
    }
    let after = routed(&c.router).await;
    assert_eq!(after[holder], 9, "{after:?}");
    assert_eq!(after.iter().sum::<u64>(), 9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gap_in_event_ids_resynchronises_from_a_snapshot() {
    let c = cluster(2, RouterMode::Kv);
    // Each instance is resynchronised once when it joins.
    wait_for("joining resyncs", || c.router.stats().resyncs == 2).await;
    // A batch that claims events 0..999 were lost, storing a block the engine lacks.
    c.events.publish(InstanceEvents {
        instance: 1,
        events: vec![KvEvent {
            id: 1000,
            data: KvEventData::BlockStored {
                parent_hash: None,
                hashes: vec![42],
                tokens: vec![0; BS],
            },
        }],
    });
    wait_for("resync", || c.router.stats().resyncs == 3).await;
    // The snapshot (an empty cache) replaced the bogus block.
    wait_for("clean index", || c.router.stats().index_blocks == 0).await;
    // And later real events still apply.
    run(&c.router, prompt(3, 2 * BS + 1)).await;
    wait_for("index", || c.router.stats().index_blocks == 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_instance_is_dropped_and_work_goes_elsewhere() {
    let c = cluster(3, RouterMode::RoundRobin);
    wait_for("instances", || c.router.num_instances() == 3).await;
    // Kill instance 1 behind the router's back.
    let h = c.handles[1].clone();
    tokio::task::spawn_blocking(move || h.shutdown())
        .await
        .unwrap();
    wait_for("health check", || c.router.num_instances() == 2).await;
    assert_eq!(c.router.stats().instance_failures, 1);
    let ids: Vec<u64> = c.discovery.list().iter().map(|(i, _)| i.id).collect();
    assert_eq!(ids, [0, 2]);
    for k in 0..6 {
        assert_eq!(run(&c.router, prompt(k, 20)).await.0, 3);
    }
    // With every instance gone, requests are refused with a clear error, not a hang.
    for h in [&c.handles[0], &c.handles[2]] {
        let h = h.clone();
        tokio::task::spawn_blocking(move || h.shutdown())
            .await
            .unwrap();
    }
    let err = c
        .router
        .submit_many(vec![GenerateRequest::greedy(prompt(9, 8), 2)])
        .await
        .err()
        .expect("refused");
    assert!(err.to_string().contains("no engine instance"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_with_another_block_size_is_not_routed_to() {
    let c = cluster(2, RouterMode::Kv);
    wait_for("instances", || c.router.num_instances() == 2).await;
    let extra = |id: u64, block_size: usize| {
        let cfg = EngineConfig {
            scheduler: SchedulerConfig {
                block_size,
                num_blocks: 64,
                ..SchedulerConfig::default()
            },
            max_model_len: 1024,
            eos_token_ids: vec![],
        };
        let h = EngineHandle::spawn(LlmEngine::new(cfg, Constant), HandleOptions::default());
        let info = InstanceInfo {
            id,
            model: "m".into(),
            role: Role::Both,
            block_size,
            kv_blocks: 64,
            device: "test".into(),
            tensor_parallel: 1,
        };
        c.discovery
            .register(info, Arc::new(LocalClient::new(h.clone())));
        h
    };
    let odd = extra(7, 32);
    let fine = extra(8, BS);
    // Discovery changes apply in order: once 8 is in, 7 has been seen and refused.
    wait_for("instance 8", || c.router.num_instances() == 3).await;
    let ids: Vec<u64> = c
        .router
        .instance_stats()
        .await
        .iter()
        .map(|i| i.info.id)
        .collect();
    assert_eq!(ids, [0, 1, 8]);
    for h in [odd, fine] {
        tokio::task::spawn_blocking(move || h.shutdown())
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_every_instance_is_not_counted_as_failures() {
    let c = cluster(2, RouterMode::Kv);
    wait_for("instances", || c.router.num_instances() == 2).await;
    c.router.shutdown_all().await;
    // Several health-check rounds (every 20 ms here) see the stopped instances.
    tokio::time::sleep(Duration::from_millis(120)).await;
    let stats = c.router.stats();
    assert_eq!(stats.instance_failures, 0, "{stats:?}");
    assert_eq!(c.router.num_instances(), 2);
    // New work is refused, not hung.
    let err = c
        .router
        .submit_many(vec![GenerateRequest::greedy(prompt(1, 8), 2)])
        .await
        .err()
        .expect("refused");
    assert!(err.to_string().contains("no engine instance"), "{err}");
}
