//! The mock behind the real async handle: token streams and KV events as a frontend and a
//! router would see them.

use std::time::Duration;

use engine::core::{EngineHandle, GenerateRequest, HandleOptions, SamplingParams, SchedulerConfig};
use mocker::{build_mock_engine, CostModel, MockOptions, StepCost, Timing};
use protocol::KvEventData;

fn small_options() -> MockOptions {
    MockOptions {
        vocab_size: 1000,
        output_vocab: None,
        eos_token_ids: vec![0],
        eos_probability: 0.0,
        max_model_len: 512,
        scheduler: SchedulerConfig {
            block_size: 16,
            num_blocks: 64,
            ..SchedulerConfig::default()
        },
        cost: StepCost::Model(CostModel::default()),
        // Fast, but through the sleeping path.
        timing: Timing::WallClock { speedup: 50.0 },
    }
}

async fn collect(handle: &EngineHandle, req: GenerateRequest) -> (Vec<u32>, u32) {
    let mut stream = handle.submit(req).expect("admitted");
    let mut tokens = Vec::new();
    let mut cached = 0;
    while let Some(ev) = stream.next().await {
        tokens.extend(ev.token);
        cached = ev.cached_prompt_tokens;
    }
    (tokens, cached)
}

#[tokio::test]
async fn streams_max_tokens_and_publishes_the_prompt_block_hashes() {
    let engine = build_mock_engine(&small_options()).unwrap();
    let handle = EngineHandle::spawn(engine, HandleOptions::default());
    let mut kv = handle.subscribe_kv_events();

    let prompt: Vec<u32> = (0..48).map(|i| 100 + i * 7).collect();
    let (out, cached) = collect(&handle, GenerateRequest::greedy(prompt.clone(), 20)).await;
    assert_eq!(out.len(), 20);
    assert_eq!(cached, 0);
    assert!(out.iter().all(|&t| t != 0 && t < 1000));

    // 48 prompt tokens and 19 fed-back outputs have KV: four full blocks.
    let mut all = prompt.clone();
    all.extend(&out);
    let want = tokens::block_hashes(&all, 16)[..4].to_vec();
    assert_eq!(
        want[..3],
        tokens::block_hashes(&prompt, 16)[..],
        "the first three blocks are the prompt's"
    );
    let mut stored = Vec::new();
    let mut last_id = None;
    while stored.len() < want.len() {
        let ev = tokio::time::timeout(Duration::from_secs(5), kv.recv())
            .await
            .expect("KV events arrive")
            .expect("channel open");
        if let Some(prev) = last_id {
            assert_eq!(ev.id, prev + 1, "consecutive event ids");
        }
        last_id = Some(ev.id);
        if let KvEventData::BlockStored { hashes, .. } = ev.data {
            stored.extend(hashes);
        }
    }
    assert_eq!(stored, want);

    // The same prompt again: two cached blocks (one token is always recomputed), and the
    // same continuation, because tokens depend only on the text.
    let (again, cached) = collect(&handle, GenerateRequest::greedy(prompt.clone(), 20)).await;
    assert_eq!(cached, 32);
    assert_eq!(again, out);

    // Seeded temperature sampling (the device-sampling path) and logprobs (the logits
    // path) both stream every token, and agree with greedy on this one-hot model.
    let seeded = GenerateRequest {
        sampling: SamplingParams {
            temperature: 0.8,
            seed: Some(7),
            ..SamplingParams::default()
        },
        ..GenerateRequest::greedy(prompt.clone(), 20)
    };
    assert_eq!(collect(&handle, seeded).await.0, out);
    let with_logprobs = GenerateRequest {
        sampling: SamplingParams {
            temperature: 1.0,
            seed: Some(3),
            logprobs: Some(2),
            ..SamplingParams::default()
        },
        ..GenerateRequest::greedy(prompt.clone(), 20)
    };
    assert_eq!(collect(&handle, with_logprobs).await.0, out);

    handle.shutdown();
}

#[tokio::test]
async fn eos_probability_ends_requests_early() {
    let opts = MockOptions {
        eos_probability: 0.2,
        timing: Timing::Virtual,
        ..small_options()
    };
    let handle = EngineHandle::spawn(build_mock_engine(&opts).unwrap(), HandleOptions::default());
    let mut lengths = Vec::new();
    for p in 0..10u32 {
        let prompt: Vec<u32> = (0..20).map(|i| 1 + (p * 31 + i) % 999).collect();
        let (out, _) = collect(&handle, GenerateRequest::greedy(prompt, 100)).await;
        if out.len() < 100 {
            assert_eq!(out.last(), Some(&0), "an early end is an EOS");
        }
        lengths.push(out.len());
    }
    assert!(lengths.iter().any(|&n| n < 100), "{lengths:?}");
    handle.shutdown();
}
