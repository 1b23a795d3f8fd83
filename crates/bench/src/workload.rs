//! Request sets for load generation, independent of how they are sent: the HTTP load
//! generator (`switchyard bench serve`) turns them into streamed OpenAI requests, and an
//! in-process simulator can feed the same items to an engine directly.
//!
//! Three kinds: synthetic prompts (random tokens, optionally in shared-prefix groups, as
//! vLLM's `benchmark_serving.py --dataset random`), multi-turn conversations whose prompts
//! grow turn by turn, and replay of a Mooncake trace (FAST'25 release), whose prefix block
//! ids become token blocks so that the trace's prefix-sharing structure reaches the server's
//! prefix cache. Every generator is seeded and deterministic: the same options give the same
//! tokens, so runs are comparable.
//!
//! [`sessions`] turns items and an [`Arrivals`] schedule into the send plan: the turns of
//! one conversation run one after another, everything else independently.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Block size of the Mooncake traces' `hash_ids`, in tokens.
pub const MOONCAKE_BLOCK_TOKENS: usize = 512;

/// One request to send.
#[derive(Clone, Debug, PartialEq)]
pub struct WorkItem {
    /// When to send it, in seconds from the start of the run (trace replay); `None` when
    /// the schedule decides (closed loop, Poisson) or it follows its conversation's
    /// previous turn.
    pub arrival_s: Option<f64>,
    pub prompt: Vec<u32>,
    /// Tokens to generate (sent with `ignore_eos`, so this is the exact output length).
    pub max_tokens: u32,
    /// (conversation id, turn): turns of one conversation are sent in turn order, each
    /// after the previous one finished.
    pub conversation: Option<(u64, u32)>,
}

/// How requests are released.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Arrivals {
    /// Closed loop: this many sessions (requests, or whole conversations) in flight, the
    /// next one starting when one finishes.
    Concurrency(usize),
    /// Open loop: sessions start as a Poisson process with this mean rate per second.
    Rate(f64),
    /// Each item's own `arrival_s` (a trace's timestamps, already scaled).
    Trace,
}

#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    /// An option out of range; `flag` is the command-line flag that sets it.
    #[error("{flag}: {reason}")]
    Invalid { flag: &'static str, reason: String },
    #[error("reading {path}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    /// A malformed trace line (1-based `line`; `field` when one field is at fault).
    #[error("{path} line {line}{}: {message}", field.as_ref().map(|f| format!(", field `{f}`")).unwrap_or_default())]
    Trace {
        path: String,
        line: usize,
        field: Option<String>,
        message: String,
    },
    #[error("{path}: no requests in the trace")]
    EmptyTrace { path: String },
    #[error("the workload has no arrival times: use --concurrency or --rate")]
    NoArrivalTimes,
}

fn invalid(flag: &'static str, reason: impl Into<String>) -> WorkloadError {
    WorkloadError::Invalid {
        flag,
        reason: reason.into(),
    }
}

/// Random prompts of one length; `prefix_groups` groups (round-robin) each share their
/// first `prefix_tokens` tokens.
#[derive(Clone, Debug, Serialize)]
pub struct SyntheticOptions {
    pub requests: usize,
    pub prompt_tokens: usize,
    pub max_tokens: u32,
    /// 0: no shared prefixes.
    pub prefix_groups: usize,
    /// Part of `prompt_tokens`.
    pub prefix_tokens: usize,
}

/// `conversations` chats of `turns` turns. Turn 0's prompt is a user message of
/// `user_tokens`; turn k's prompt is turn k-1's prompt, then a stand-in for the previous
/// answer (`answer_tokens` tokens), then a new user message of `user_tokens`.
///
/// The stand-in answer is deterministic, not what the model really said: the workload stays
/// reproducible and independent of the model, at the cost that the server's cache can hold
/// the previous turn's prompt but not its generated tokens (those differ from the stand-in).
/// So a turn's cacheable prefix is the previous turn's prompt, as with a client that
/// rewrites answers; real chat clients echo the answer and could reuse a little more.
#[derive(Clone, Debug, Serialize)]
pub struct MultiTurnOptions {
    pub conversations: usize,
    pub turns: usize,
    pub user_tokens: usize,
    pub answer_tokens: usize,
    /// Tokens generated per turn.
    pub max_tokens: u32,
}

/// How a Mooncake trace is replayed.
#[derive(Clone, Debug, Serialize)]
pub struct MooncakeOptions {
    /// Tokens each `hash_ids` block expands to. The trace's 512 replays it at full length;
    /// less shrinks every prompt by `block_tokens / 512` while keeping which requests share
    /// which blocks, so a small model can replay the sharing structure. Prefix-cache hits
    /// line up with the server's blocks when this is a multiple of its KV block size (16).
    pub block_tokens: usize,
    /// Arrival times are divided by this (2 replays twice as fast).
    pub speedup: f64,
    /// Only the first N requests.
    pub max_requests: Option<usize>,
    /// Caps each request's `output_length`.
    pub max_output_tokens: Option<u32>,
}

/// A workload as chosen on the command line; serialized into reports.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Workload {
    Synthetic(SyntheticOptions),
    MultiTurn(MultiTurnOptions),
    Mooncake {
        trace: PathBuf,
        #[serde(flatten)]
        options: MooncakeOptions,
    },
}

impl Workload {
    /// The schedule used when none is given: the trace's own timestamps for trace replay,
    /// 16 in flight otherwise.
    pub fn default_arrivals(&self) -> Arrivals {
        match self {
            Workload::Mooncake { .. } => Arrivals::Trace,
            _ => Arrivals::Concurrency(16),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Workload::Synthetic(_) => "synthetic",
            Workload::MultiTurn(_) => "multi-turn",
            Workload::Mooncake { .. } => "mooncake",
        }
    }

    /// Checks the options without building anything (cheap; call it before starting a
    /// server).
    pub fn validate(&self) -> Result<(), WorkloadError> {
        match self {
            Workload::Synthetic(o) => {
                if o.requests == 0 {
                    return Err(invalid("--requests", "must be at least 1"));
                }
                if o.prompt_tokens == 0 {
                    return Err(invalid("--prompt-tokens", "must be at least 1"));
                }
                if o.max_tokens == 0 {
                    return Err(invalid("--max-tokens", "must be at least 1"));
                }
                if o.prefix_groups > 0 && o.prefix_tokens >= o.prompt_tokens {
                    return Err(invalid(
                        "--prefix-tokens",
                        "must be smaller than --prompt-tokens",
                    ));
                }
            }
            Workload::MultiTurn(o) => {
                for (flag, v) in [
                    ("--conversations", o.conversations),
                    ("--turns", o.turns),
                    ("--user-tokens", o.user_tokens),
                    ("--max-tokens", o.max_tokens as usize),
                ] {
                    if v == 0 {
                        return Err(invalid(flag, "must be at least 1"));
                    }
                }
                if u32::try_from(o.turns).is_err() {
                    return Err(invalid("--turns", "too many"));
                }
            }
            Workload::Mooncake { options: o, .. } => {
                if o.block_tokens == 0 {
                    return Err(invalid("--trace-block-tokens", "must be at least 1"));
                }
                if !(o.speedup > 0.0 && o.speedup.is_finite()) {
                    return Err(invalid("--speedup", "must be positive"));
                }
                if o.max_requests == Some(0) {
                    return Err(invalid("--max-requests", "must be at least 1"));
                }
                if o.max_output_tokens == Some(0) {
                    return Err(invalid("--max-output-tokens", "must be at least 1"));
                }
            }
        }
        Ok(())
    }

    /// The items, with token ids in `[0, vocab)`; `seed` picks the random tokens of the
    /// synthetic and multi-turn workloads (trace blocks depend on their ids alone).
    pub fn build(&self, vocab: u32, seed: u64) -> Result<Vec<WorkItem>, WorkloadError> {
        self.validate()?;
        if vocab == 0 {
            return Err(invalid("--vocab", "must be at least 1"));
        }
        Ok(match self {
            Workload::Synthetic(o) => synthetic(o, vocab, seed),
            Workload::MultiTurn(o) => multi_turn(o, vocab, seed),
            Workload::Mooncake { trace, options } => load_mooncake(trace, options, vocab)?,
        })
    }
}

/// Synthetic prompts, in send order.
pub fn synthetic(opts: &SyntheticOptions, vocab: u32, seed: u64) -> Vec<WorkItem> {
    let mut rng = SplitMix(seed);
    let groups = opts.prefix_groups;
    let prefix_len = if groups > 0 { opts.prefix_tokens } else { 0 };
    let prefixes: Vec<Vec<u32>> = (0..groups)
        .map(|_| (0..prefix_len).map(|_| rng.token(vocab)).collect())
        .collect();
    (0..opts.requests)
        .map(|i| {
            let mut prompt = if groups > 0 {
                prefixes[i % groups].clone()
            } else {
                Vec::with_capacity(opts.prompt_tokens)
            };
            prompt.extend((prefix_len..opts.prompt_tokens).map(|_| rng.token(vocab)));
            WorkItem {
                arrival_s: None,
                prompt,
                max_tokens: opts.max_tokens,
                conversation: None,
            }
        })
        .collect()
}

/// Multi-turn conversations, conversation by conversation, turns in order.
pub fn multi_turn(opts: &MultiTurnOptions, vocab: u32, seed: u64) -> Vec<WorkItem> {
    // Separate streams per (conversation, turn, part), so changing one length does not
    // reshuffle every other message.
    const USER: u64 = 1;
    const ANSWER: u64 = 2;
    let mut items = Vec::with_capacity(opts.conversations * opts.turns);
    for conv in 0..opts.conversations as u64 {
        let mut prompt: Vec<u32> = Vec::new();
        for turn in 0..opts.turns as u64 {
            if turn > 0 {
                let mut answer = SplitMix::keyed(&[seed, conv, turn - 1, ANSWER]);
                prompt.extend((0..opts.answer_tokens).map(|_| answer.token(vocab)));
            }
            let mut user = SplitMix::keyed(&[seed, conv, turn, USER]);
            prompt.extend((0..opts.user_tokens).map(|_| user.token(vocab)));
            items.push(WorkItem {
                arrival_s: None,
                prompt: prompt.clone(),
                max_tokens: opts.max_tokens,
                conversation: Some((conv, turn as u32)),
            });
        }
    }
    items
}

/// One line of a Mooncake trace.
#[derive(Deserialize)]
struct TraceLine {
    /// Milliseconds since the trace's start.
    timestamp: f64,
    input_length: u64,
    output_length: u64,
    hash_ids: Vec<u64>,
}

/// Reads a Mooncake trace (JSON lines). See [`parse_mooncake`].
pub fn load_mooncake(
    path: &Path,
    opts: &MooncakeOptions,
    vocab: u32,
) -> Result<Vec<WorkItem>, WorkloadError> {
    let name = path.display().to_string();
    let file = std::fs::File::open(path).map_err(|source| WorkloadError::Io {
        path: name.clone(),
        source,
    })?;
    parse_mooncake(BufReader::new(file), &name, opts, vocab)
}

/// Parses a Mooncake trace; `source` names it in errors.
///
/// Each `hash_ids` entry becomes `block_tokens` tokens that depend on the id alone, so
/// requests with equal leading ids get equal leading tokens. The prompt is `input_length`
/// scaled by `block_tokens / 512` (rounded up, which keeps the block count), the last block
/// cut to fit; a line with fewer ids than blocks gets tokens of its own for the rest, as an
/// unshared suffix. Arrival is the timestamp relative to the first request taken, divided
/// by 1000 and by `speedup`. An `output_length` of 0 becomes 1 (a request must generate).
pub fn parse_mooncake(
    reader: impl BufRead,
    source: &str,
    opts: &MooncakeOptions,
    vocab: u32,
) -> Result<Vec<WorkItem>, WorkloadError> {
    let limit = opts.max_requests.unwrap_or(usize::MAX);
    let bt = opts.block_tokens;
    let mut items = Vec::new();
    let mut first_ms = None;
    let mut blocks: HashMap<u64, Vec<u32>> = HashMap::new();
    for (i, line) in reader.lines().enumerate() {
        if items.len() >= limit {
            break;
        }
        let n = i + 1;
        let err = |field: Option<String>, message: String| WorkloadError::Trace {
            path: source.to_string(),
            line: n,
            field,
            message,
        };
        let line = line.map_err(|e| err(None, e.to_string()))?;
        if line.trim().is_empty() {
            continue;
        }
        let mut de = serde_json::Deserializer::from_str(&line);
        let rec: TraceLine = serde_path_to_error::deserialize(&mut de).map_err(|e| {
            let path = e.path().to_string();
            let field = (path != ".").then_some(path);
            let inner = e.into_inner();
            // serde_json places the error "at line 1 column C" of this one-line document;
            // only the column means anything here.
            let text = inner.to_string();
            let pos = format!(" at line {} column {}", inner.line(), inner.column());
            let message = match text.strip_suffix(&pos) {
                Some(m) => format!("{m} (column {})", inner.column()),
                None => text,
            };
            err(field, message)
        })?;
        if !(rec.timestamp >= 0.0 && rec.timestamp.is_finite()) {
            return Err(err(
                Some("timestamp".into()),
                format!("must be a non-negative number, got {}", rec.timestamp),
            ));
        }
        if rec.input_length == 0 {
            return Err(err(
                Some("input_length".into()),
                "must be at least 1".into(),
            ));
        }
        let len = usize::try_from(rec.input_length)
            .ok()
            .and_then(|l| l.checked_mul(bt))
            .map(|l| l.div_ceil(MOONCAKE_BLOCK_TOKENS))
            .ok_or_else(|| err(Some("input_length".into()), "too large".into()))?;
        let mut prompt = Vec::with_capacity(len);
        for &id in &rec.hash_ids {
            if prompt.len() >= len {
                break;
            }
            let block = blocks.entry(id).or_insert_with(|| block_of(id, bt, vocab));
            let take = (len - prompt.len()).min(bt);
            prompt.extend_from_slice(&block[..take]);
        }
        let mut own = SplitMix::keyed(&[UNSHARED, n as u64]);
        while prompt.len() < len {
            prompt.push(own.token(vocab));
        }
        let first = *first_ms.get_or_insert(rec.timestamp);
        let out = u32::try_from(rec.output_length).unwrap_or(u32::MAX).max(1);
        items.push(WorkItem {
            arrival_s: Some((rec.timestamp - first).max(0.0) / 1000.0 / opts.speedup),
            prompt,
            max_tokens: opts.max_output_tokens.map_or(out, |cap| out.min(cap)),
            conversation: None,
        });
    }
    if items.is_empty() {
        return Err(WorkloadError::EmptyTrace {
            path: source.to_string(),
        });
    }
    Ok(items)
}

/// Stream keys that keep trace blocks and unshared filler apart.
const BLOCK: u64 = 0x0062_6c6f_636b; // "block"
const UNSHARED: u64 = 0x006f_776e; // "own"

/// The tokens a trace block id stands for (a function of the id alone).
pub fn block_of(id: u64, block_tokens: usize, vocab: u32) -> Vec<u32> {
    let mut rng = SplitMix::keyed(&[BLOCK, id]);
    (0..block_tokens).map(|_| rng.token(vocab)).collect()
}

/// Requests that run one after another: a conversation's turns, or a single request.
#[derive(Clone, Debug, PartialEq)]
pub struct Session {
    /// Indices into the items, in send order.
    pub items: Vec<usize>,
    /// When each item is due, in seconds from the start (`None`: as soon as the previous
    /// one in the session finished, or when a closed-loop slot frees). An item is sent at
    /// the later of its due time and its predecessor's end.
    pub due_s: Vec<Option<f64>>,
}

/// Groups items into sessions and gives them times. Sessions come in order of their first
/// item (closed loop) or of their start time (Poisson, trace). Poisson start times are
/// seeded with `seed`: the first session starts at 0.
pub fn sessions(
    items: &[WorkItem],
    arrivals: Arrivals,
    seed: u64,
) -> Result<Vec<Session>, WorkloadError> {
    let mut out: Vec<Session> = Vec::new();
    let mut by_conv: HashMap<u64, usize> = HashMap::new();
    let mut turns: Vec<Vec<(u32, usize)>> = Vec::new();
    for (i, item) in items.iter().enumerate() {
        match item.conversation {
            Some((conv, turn)) => {
                let s = *by_conv.entry(conv).or_insert_with(|| {
                    turns.push(Vec::new());
                    turns.len() - 1
                });
                turns[s].push((turn, i));
            }
            None => turns.push(vec![(0, i)]),
        }
    }
    for mut t in turns {
        t.sort_by_key(|&(turn, _)| turn);
        let items: Vec<usize> = t.into_iter().map(|(_, i)| i).collect();
        out.push(Session {
            due_s: vec![None; items.len()],
            items,
        });
    }
    match arrivals {
        Arrivals::Concurrency(_) => {}
        Arrivals::Rate(rate) => {
            for (s, at) in out.iter_mut().zip(poisson_times(rate, seed)) {
                s.due_s[0] = Some(at);
            }
        }
        Arrivals::Trace => {
            for s in &mut out {
                for (due, &i) in s.due_s.iter_mut().zip(&s.items) {
                    *due = items[i].arrival_s;
                }
            }
            if out.iter().any(|s| s.due_s[0].is_none()) {
                return Err(WorkloadError::NoArrivalTimes);
            }
            out.sort_by(|a, b| {
                a.due_s[0]
                    .unwrap_or(0.0)
                    .total_cmp(&b.due_s[0].unwrap_or(0.0))
            });
        }
    }
    Ok(out)
}

/// Start times of a Poisson process with `rate` per second: 0, then exponential gaps.
pub fn poisson_times(rate: f64, seed: u64) -> impl Iterator<Item = f64> {
    let mut rng = SplitMix(seed ^ 0x5eed);
    std::iter::successors(Some(0.0), move |at| Some(at - rng.unit().ln() / rate))
}

/// A seeded generator (SplitMix64: tiny, and good enough for synthetic workloads).
struct SplitMix(u64);

impl SplitMix {
    /// A stream keyed by several values, e.g. (seed, conversation, turn).
    fn keyed(key: &[u64]) -> SplitMix {
        let mut s = SplitMix(0x243f_6a88_85a3_08d3);
        for &k in key {
            s.0 ^= k;
            s.0 = s.next();
        }
        s
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1].
    fn unit(&mut self) -> f64 {
        ((self.next() >> 11) + 1) as f64 / (1u64 << 53) as f64
    }

    fn token(&mut self, vocab: u32) -> u32 {
        (self.next() % u64::from(vocab)) as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VOCAB: u32 = 500;

    fn mooncake(block_tokens: usize) -> MooncakeOptions {
        MooncakeOptions {
            block_tokens,
            speedup: 1.0,
            max_requests: None,
            max_output_tokens: None,
        }
    }

    fn parse(text: &str, opts: &MooncakeOptions) -> Result<Vec<WorkItem>, WorkloadError> {
        parse_mooncake(text.as_bytes(), "t.jsonl", opts, VOCAB)
    }

    #[test]
    fn synthetic_is_deterministic_and_shares_prefixes_within_groups() {
        let o = SyntheticOptions {
            requests: 4,
            prompt_tokens: 8,
            max_tokens: 3,
            prefix_groups: 2,
            prefix_tokens: 5,
        };
        let a = synthetic(&o, VOCAB, 1);
        assert_eq!(a, synthetic(&o, VOCAB, 1));
        assert_ne!(a, synthetic(&o, VOCAB, 2));
        let p: Vec<&[u32]> = a.iter().map(|w| &w.prompt[..]).collect();
        assert!(p.iter().all(|p| p.len() == 8));
        assert_eq!(p[0][..5], p[2][..5]);
        assert_ne!(p[0][..5], p[1][..5]);
        assert_ne!(p[0][5..], p[2][5..]);
        assert!(a
            .iter()
            .all(|w| w.max_tokens == 3 && w.prompt.iter().all(|&t| t < VOCAB)));
    }

    #[test]
    fn multi_turn_prompts_extend_the_previous_turn() {
        let o = MultiTurnOptions {
            conversations: 2,
            turns: 3,
            user_tokens: 5,
            answer_tokens: 4,
            max_tokens: 2,
        };
        let items = multi_turn(&o, VOCAB, 7);
        assert_eq!(items, multi_turn(&o, VOCAB, 7));
        assert_eq!(items.len(), 6);
        let lens: Vec<usize> = items.iter().map(|w| w.prompt.len()).collect();
        assert_eq!(lens, [5, 14, 23, 5, 14, 23]);
        for k in 1..3 {
            let (prev, cur) = (&items[k - 1].prompt, &items[k].prompt);
            assert_eq!(cur[..prev.len()], prev[..]);
            assert_eq!(items[k].conversation, Some((0, k as u32)));
        }
        // Conversations do not share their first message.
        assert_ne!(items[0].prompt, items[3].prompt);

        let s = sessions(&items, Arrivals::Concurrency(4), 0).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].items, [0, 1, 2]);
        assert_eq!(s[1].items, [3, 4, 5]);
        let s = sessions(&items, Arrivals::Rate(10.0), 0).unwrap();
        assert_eq!(s[0].due_s, [Some(0.0), None, None]);
        assert!(s[1].due_s[0].unwrap() > 0.0);
        assert!(matches!(
            sessions(&items, Arrivals::Trace, 0),
            Err(WorkloadError::NoArrivalTimes)
        ));
    }

    const TRACE: &str = r#"{"timestamp": 1000, "input_length": 1100, "output_length": 30, "hash_ids": [0, 1, 2]}
{"timestamp": 1500, "input_length": 1500, "output_length": 0, "hash_ids": [0, 1, 3]}

{"timestamp": 3000, "input_length": 600, "output_length": 7, "hash_ids": [4, 5]}
{"timestamp": 3000, "input_length": 900, "output_length": 7, "hash_ids": [0]}
"#;

    #[test]
    fn shared_hash_ids_give_shared_block_hashes() {
        let items = parse(TRACE, &mooncake(32)).unwrap();
        let hashes: Vec<_> = items
            .iter()
            .map(|w| tokens::block_hashes(&w.prompt, 16))
            .collect();
        // 1100 * 32 / 512 = 68.75 -> 69 tokens: 4 full blocks of 16, 2 trace blocks + 5.
        assert_eq!(items[0].prompt.len(), 69);
        assert_eq!(items[1].prompt.len(), 94);
        // Ids 0 and 1 are 64 tokens = 4 engine blocks, equal in both; id 2 vs 3 diverge.
        assert_eq!(hashes[0][..4], hashes[1][..4]);
        assert_ne!(items[0].prompt[64..69], items[1].prompt[64..69]);
        assert_ne!(hashes[0][0], hashes[2][0]);
        // The last line has one id for two blocks: its first block matches id 0.
        assert_eq!(hashes[3][..2], hashes[0][..2]);
        assert_ne!(hashes[3][2], hashes[0][2]);
        // Equal ids mean equal tokens, at any length.
        let full = parse(TRACE, &mooncake(512)).unwrap();
        assert_eq!(full[0].prompt.len(), 1100);
        assert_eq!(full[0].prompt[..1024], full[1].prompt[..1024]);
        assert_eq!(
            full[0].prompt[..1024],
            block_of(0, 512, VOCAB)
                .into_iter()
                .chain(block_of(1, 512, VOCAB))
                .collect::<Vec<_>>()[..]
        );
        assert!(full.iter().all(|w| w.prompt.iter().all(|&t| t < VOCAB)));
    }

    #[test]
    fn trace_times_lengths_and_limits_scale() {
        let mut o = mooncake(16);
        o.speedup = 2.0;
        let items = parse(TRACE, &o).unwrap();
        let at: Vec<f64> = items.iter().map(|w| w.arrival_s.unwrap()).collect();
        assert_eq!(at, [0.0, 0.25, 1.0, 1.0]);
        let out: Vec<u32> = items.iter().map(|w| w.max_tokens).collect();
        assert_eq!(out, [30, 1, 7, 7]);
        let lens: Vec<usize> = items.iter().map(|w| w.prompt.len()).collect();
        assert_eq!(lens, [35, 47, 19, 29]);

        o.max_requests = Some(3);
        o.max_output_tokens = Some(8);
        let items = parse(TRACE, &o).unwrap();
        assert_eq!(items.len(), 3);
        assert_eq!(items[0].max_tokens, 8);
        assert_eq!(items, parse(TRACE, &o).unwrap());

        let s = sessions(&items, Arrivals::Trace, 0).unwrap();
        assert_eq!(s.len(), 3);
        assert_eq!(s[1].due_s, [Some(0.25)]);
    }

    #[test]
    fn malformed_traces_name_the_line_and_field() {
        let o = mooncake(16);
        let msg = |t: &str| parse(t, &o).unwrap_err().to_string();
        let ok = r#"{"timestamp": 0, "input_length": 10, "output_length": 1, "hash_ids": [0]}"#;
        let m = msg(&format!(
            "{ok}\n{}\n",
            r#"{"timestamp": 0, "input_length": "x", "output_length": 1, "hash_ids": [0]}"#
        ));
        assert!(
            m.starts_with("t.jsonl line 2, field `input_length`:"),
            "{m}"
        );
        assert!(m.ends_with("expected u64 (column 36)"), "{m}");
        let m = msg(r#"{"timestamp": 0, "input_length": 10, "output_length": 1}"#);
        assert!(m.contains("line 1") && m.contains("hash_ids"), "{m}");
        let m =
            msg(r#"{"timestamp": 0, "input_length": 10, "output_length": 1, "hash_ids": [0, -1]}"#);
        assert!(m.contains("field `hash_ids[1]`"), "{m}");
        let m = msg(&format!("{ok}\n{ok}\nnot json\n"));
        assert!(m.starts_with("t.jsonl line 3:"), "{m}");
        let m = msg(r#"{"timestamp": -5, "input_length": 10, "output_length": 1, "hash_ids": []}"#);
        assert!(m.contains("field `timestamp`"), "{m}");
        let m = msg(r#"{"timestamp": 0, "input_length": 0, "output_length": 1, "hash_ids": []}"#);
        assert!(
            m.contains("field `input_length`: must be at least 1"),
            "{m}"
        );
        assert!(msg("\n\n").contains("no requests"));
        let missing = load_mooncake(Path::new("/nonexistent/trace.jsonl"), &o, VOCAB);
        assert!(matches!(missing, Err(WorkloadError::Io { .. })));
    }

    #[test]
    fn options_are_validated_with_their_flag() {
        let w = Workload::MultiTurn(MultiTurnOptions {
            conversations: 1,
            turns: 0,
            user_tokens: 1,
            answer_tokens: 0,
            max_tokens: 1,
        });
        assert_eq!(
            w.validate().unwrap_err().to_string(),
            "--turns: must be at least 1"
        );
        let w = Workload::Mooncake {
            trace: "t".into(),
            options: MooncakeOptions {
                speedup: 0.0,
                ..mooncake(16)
            },
        };
        assert!(w
            .validate()
            .unwrap_err()
            .to_string()
            .starts_with("--speedup"));
    }

    #[test]
    fn poisson_gaps_average_to_the_rate() {
        let t: Vec<f64> = poisson_times(100.0, 3).take(2001).collect();
        assert_eq!(t[0], 0.0);
        assert!(t.windows(2).all(|w| w[1] > w[0]));
        let mean_gap = t[2000] / 2000.0;
        assert!((mean_gap - 0.01).abs() < 0.001, "{mean_gap}");
    }
}
