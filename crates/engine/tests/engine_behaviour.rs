//! Engine-level properties on tiny random models: batch invariance, prefix-cache
//! equivalence, preemption under a small KV budget, KV-event/pool agreement, aborts.

mod common;

use std::collections::HashSet;

use common::*;
use engine::core::{
    EngineHandle, FinishReason, GenerateRequest, HandleOptions, SamplingParams, SubmitError,
};
use protocol::{KvEvent, KvEventData};

const VOCAB: u32 = 512;

fn llama() -> tempfile::TempDir {
    synth_tiny(synth::Arch::Llama, synth::DType::F32, 11)
}

#[test]
fn batch_invariance_mixed_lengths() {
    let dir = llama();
    let prompts: Vec<Vec<u32>> = [5usize, 17, 33, 64, 3, 40]
        .iter()
        .enumerate()
        .map(|(i, &len)| prompt(i as u64 + 1, len, VOCAB))
        .collect();
    let alone: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| {
            let mut e = engine(dir.path(), opts(256, 16));
            run_all(&mut e, vec![greedy(p.clone(), 24)], 1)[0]
                .tokens
                .clone()
        })
        .collect();
    let mut e = engine(dir.path(), opts(256, 16));
    let together = run_all(
        &mut e,
        prompts.iter().map(|p| greedy(p.clone(), 24)).collect(),
        1,
    );
    for (i, (a, b)) in alone.iter().zip(&together).enumerate() {
        assert_eq!(a.len(), 24);
        assert_eq!(a, &b.tokens, "sequence {i} differs when batched");
    }
}

#[test]
fn chunked_prefill_matches_whole_prefill() {
    let dir = llama();
    let p = prompt(99, 150, VOCAB);
    let mut whole = engine(dir.path(), opts(64, 16));
    let a = run_all(&mut whole, vec![greedy(p.clone(), 16)], 1);
    let mut o = opts(64, 16);
    o.max_batched_tokens = 24; // forces 7 chunks, not aligned to blocks
    let mut chunked = engine(dir.path(), o);
    let b = run_all(&mut chunked, vec![greedy(p, 16)], 1);
    assert_eq!(a[0].tokens, b[0].tokens);
}

#[test]
fn prefix_cache_hit_reports_cached_tokens_and_same_output() {
    let dir = llama();
    let shared = prompt(5, 40, VOCAB);
    let mut second = shared.clone();
    second.extend(prompt(6, 9, VOCAB));

    let mut cold = engine(dir.path(), opts(128, 16));
    let cold_out = run_all(&mut cold, vec![greedy(second.clone(), 20)], 1);
    assert_eq!(cold_out[0].cached_prompt_tokens, 0);

    let mut warm = engine(dir.path(), opts(128, 16));
    run_all(&mut warm, vec![greedy(shared, 4)], 1);
    let warm_out = run_all(&mut warm, vec![greedy(second, 20)], 2);
    // 40 shared tokens = 2 full blocks of 16.
    assert_eq!(warm_out[0].cached_prompt_tokens, 32);
    assert_eq!(cold_out[0].tokens, warm_out[0].tokens);
    let st = warm.stats();
    assert_eq!(st.prefix_hit_tokens, 32);
    assert_eq!(st.prefix_query_tokens, 40 + 49);
}

#[test]
fn fully_cached_prompt_still_computes_its_last_token() {
    let dir = llama();
    let p = prompt(8, 32, VOCAB); // exactly two blocks
    let mut e = engine(dir.path(), opts(64, 16));
    let first = run_all(&mut e, vec![greedy(p.clone(), 8)], 1);
    let again = run_all(&mut e, vec![greedy(p, 8)], 2);
    assert_eq!(again[0].cached_prompt_tokens, 16);
    assert_eq!(first[0].tokens, again[0].tokens);
}

#[test]
fn small_kv_budget_preempts_and_still_completes_correctly() {
    let dir = llama();
    let prompts: Vec<Vec<u32>> = (0..6)
        .map(|i| prompt(100 + i, 30 + 7 * i as usize, VOCAB))
        .collect();
    let mut roomy = engine(dir.path(), opts(512, 16));
    let want = run_all(
        &mut roomy,
        prompts.iter().map(|p| greedy(p.clone(), 40)).collect(),
        1,
    );

    // Each sequence needs up to 6 blocks; 10 blocks cannot hold them all at once.
    let mut tight = engine(dir.path(), opts(10, 16));
    let got = run_all(
        &mut tight,
        prompts.iter().map(|p| greedy(p.clone(), 40)).collect(),
        1,
    );
    assert!(
        tight.stats().preemptions > 0,
        "the budget should have forced preemption"
    );
    for (i, (a, b)) in want.iter().zip(&got).enumerate() {
        assert_eq!(a.tokens, b.tokens, "request {i}");
        assert_eq!(b.finish, Some(FinishReason::Length));
    }
    assert_eq!(tight.stats().blocks_used, 0);
}

#[test]
fn sequence_larger_than_the_cache_is_refused() {
    let dir = llama();
    let e = engine(dir.path(), opts(4, 16));
    let err = e.validate(&greedy(prompt(1, 70, VOCAB), 4)).unwrap_err();
    assert!(
        matches!(err, SubmitError::Invalid { ref param, .. } if param == "prompt"),
        "{err:?}"
    );
}

/// Replays KV events into a set.
fn apply(set: &mut HashSet<u64>, next_id: &mut u64, events: Vec<KvEvent>) {
    for ev in events {
        assert_eq!(ev.id, *next_id, "event ids must be consecutive");
        *next_id += 1;
        match ev.data {
            KvEventData::BlockStored { hashes, .. } => {
                for h in hashes {
                    assert!(set.insert(h), "block {h} announced twice");
                }
            }
            KvEventData::BlockRemoved { hashes } => {
                for h in hashes {
                    assert!(set.remove(&h), "removed block {h} was never stored");
                }
            }
            KvEventData::AllBlocksCleared => set.clear(),
        }
    }
}

#[test]
fn kv_events_mirror_the_pool_under_random_workloads() {
    let dir = llama();
    for trial in 0..3u64 {
        let mut e = engine(dir.path(), opts(24, 8));
        let mut mirror = HashSet::new();
        let mut next_event = 0;
        let mut next_req = 1;
        let mut rng = trial * 7919 + 1;
        let mut rand = move |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        let prefixes: Vec<Vec<u32>> = (0..3).map(|i| prompt(50 + i, 24, VOCAB)).collect();
        for _ in 0..60 {
            match rand(4) {
                0 | 1 => {
                    let mut p = prefixes[rand(3) as usize][..8 + rand(16) as usize].to_vec();
                    p.extend(prompt(rand(1000) + 1, 1 + rand(20) as usize, VOCAB));
                    let r = greedy(p, 1 + rand(12) as u32);
                    e.validate(&r).unwrap();
                    e.add_request(next_req, r);
                    next_req += 1;
                }
                2 => {
                    let ids = e.request_ids();
                    if !ids.is_empty() {
                        e.abort(ids[rand(ids.len() as u64) as usize]);
                    }
                }
                _ => {
                    if !e.has_work() && rand(3) == 0 {
                        assert!(e.reset_prefix_cache());
                    }
                }
            }
            e.step();
            apply(&mut mirror, &mut next_event, e.drain_kv_events());
            let pool: HashSet<u64> = e.block_pool().cached_hashes().into_iter().collect();
            assert_eq!(mirror, pool, "events disagree with the pool");
        }
        while e.has_work() {
            e.step();
            apply(&mut mirror, &mut next_event, e.drain_kv_events());
        }
        let pool: HashSet<u64> = e.block_pool().cached_hashes().into_iter().collect();
        assert_eq!(mirror, pool);
        let s = e.stats();
        assert_eq!(s.blocks_used, 0, "blocks leaked");
        assert_eq!(s.blocks_free, s.blocks_total);
    }
}

#[test]
fn eos_stops_unless_ignored_and_stop_tokens_stop() {
    let dir = llama();
    let p = prompt(3, 12, VOCAB);
    let mut e = engine(dir.path(), opts(64, 16));
    let free = run_all(&mut e, vec![greedy(p.clone(), 10)], 1);
    let third = free[0].tokens[2];
    let mut r = greedy(p, 10);
    r.stop_token_ids = vec![third];
    let stopped = run_all(&mut e, vec![r], 2);
    let cut = free[0].tokens.iter().position(|&t| t == third).unwrap();
    assert_eq!(stopped[0].tokens, free[0].tokens[..=cut]);
    assert_eq!(stopped[0].finish, Some(FinishReason::Stop));
}

#[test]
fn seeded_sampling_is_reproducible() {
    let dir = llama();
    let p = prompt(4, 20, VOCAB);
    let req = |seed| GenerateRequest {
        prompt: p.clone(),
        sampling: SamplingParams {
            temperature: 1.0,
            top_p: 0.9,
            seed: Some(seed),
            logprobs: Some(2),
            ..SamplingParams::default()
        },
        max_tokens: 24,
        stop_token_ids: vec![],
        ignore_eos: true,
    };
    let mut e = engine(dir.path(), opts(64, 16));
    let a = run_all(&mut e, vec![req(1), req(1), req(2)], 1);
    assert_eq!(a[0].tokens, a[1].tokens);
    assert_ne!(a[0].tokens, a[2].tokens);
    let ev = &a[0].events[0];
    assert!(ev.logprob.unwrap() <= 0.0);
    assert_eq!(ev.top_logprobs.len(), 2);
}

#[test]
fn async_handle_streams_and_dropping_aborts() {
    let dir = llama();
    let e = engine(dir.path(), opts(64, 16));
    let handle = EngineHandle::spawn(e, HandleOptions::default());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut events = handle.subscribe_kv_events();
        let mut s = handle.submit(greedy(prompt(9, 40, VOCAB), 8)).unwrap();
        let mut n = 0;
        let mut last = None;
        while let Some(ev) = s.next().await {
            n += ev.token.is_some() as usize;
            last = ev.finish_reason;
        }
        assert_eq!((n, last), (8, Some(FinishReason::Length)));
        // 48 tokens were computed: 3 blocks (40 prompt + 7 generated with KV) → 2 full.
        let ev = events.recv().await.unwrap();
        assert!(matches!(ev.data, KvEventData::BlockStored { .. }));

        // A reader that goes away frees its sequence.
        let mut long = handle.submit(greedy(prompt(10, 20, VOCAB), 1000)).unwrap();
        long.next().await.unwrap();
        drop(long);
        for _ in 0..200 {
            let st = handle.stats().await.unwrap();
            if st.running == 0 && st.waiting == 0 {
                assert_eq!(st.blocks_used, 0);
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        let st = handle.stats().await.unwrap();
        assert_eq!((st.running, st.blocks_used), (0, 0));
        assert_eq!(handle.pending(), 0);

        // Bad input is refused at once, naming the parameter.
        let err = handle.submit(greedy(vec![VOCAB + 5], 4)).err().unwrap();
        assert!(matches!(err, SubmitError::Invalid { ref param, .. } if param == "prompt"));
    });
    handle.shutdown();
    assert!(matches!(
        handle.submit(greedy(vec![1], 1)),
        Err(SubmitError::ShuttingDown)
    ));
}

#[test]
fn bounded_admission_answers_queue_full() {
    let dir = llama();
    let e = engine(dir.path(), opts(64, 16));
    let handle = EngineHandle::spawn(
        e,
        HandleOptions {
            max_pending: 2,
            ..HandleOptions::default()
        },
    );
    let a = handle.submit(greedy(prompt(1, 8, VOCAB), 500)).unwrap();
    let b = handle.submit(greedy(prompt(2, 8, VOCAB), 500)).unwrap();
    let c = handle.submit(greedy(prompt(3, 8, VOCAB), 500));
    assert!(matches!(c, Err(SubmitError::QueueFull(_))), "{:?}", c.err());
    drop(b);
    // All or nothing: two more do not fit beside `a`, one does.
    let many = handle.submit_many(vec![
        greedy(prompt(4, 8, VOCAB), 5),
        greedy(prompt(5, 8, VOCAB), 5),
    ]);
    assert!(matches!(many, Err(SubmitError::QueueFull(_))));
    let mut wait = 0;
    while handle.pending() > 1 && wait < 2000 {
        std::thread::sleep(std::time::Duration::from_millis(1));
        wait += 1;
    }
    let one = handle
        .submit_many(vec![greedy(prompt(6, 8, VOCAB), 5)])
        .unwrap();
    assert_eq!(one.len(), 1);
    drop((a, one));
    handle.shutdown();
}

#[test]
fn bf16_model_uses_half_kv_and_its_paths_agree() {
    // Half-precision weights switch the KV cache to bf16: the same byte budget holds twice
    // the blocks, and chunking, batching and prefix hits still give identical tokens.
    let dir = synth_tiny(synth::Arch::Llama, synth::DType::Bf16, 11);
    let f32_dir = llama();
    let budget = engine::model::EngineOptions {
        kv_cache_bytes: 1 << 20,
        ..engine::model::EngineOptions::default()
    };
    let half = engine(dir.path(), budget.clone());
    let full = engine(f32_dir.path(), budget);
    assert_eq!(half.stats().blocks_total, 2 * full.stats().blocks_total);

    let shared = prompt(21, 50, VOCAB);
    let mut longer = shared.clone();
    longer.extend(prompt(22, 11, VOCAB));
    let mut cold = engine(dir.path(), opts(64, 16));
    let want = run_all(&mut cold, vec![greedy(longer.clone(), 20)], 1);

    let mut o = opts(64, 16);
    o.max_batched_tokens = 24;
    let mut warm = engine(dir.path(), o);
    run_all(&mut warm, vec![greedy(shared, 3)], 1);
    let got = run_all(
        &mut warm,
        vec![greedy(longer, 20), greedy(prompt(23, 40, VOCAB), 20)],
        2,
    );
    assert_eq!(got[0].cached_prompt_tokens, 48);
    assert_eq!(got[0].tokens, want[0].tokens);
}
