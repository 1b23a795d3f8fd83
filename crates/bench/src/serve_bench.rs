//! `switchyard bench serve`: a streaming OpenAI load generator against a local server,
//! modelled on vLLM's `benchmark_serving.py` — a bounded set of streamed requests from a
//! [`Workload`] (synthetic prompts, multi-turn conversations or a replayed Mooncake trace),
//! sent closed-loop (a fixed number in flight), open-loop (Poisson arrivals) or at the
//! trace's own times, reporting throughput, TTFT / inter-token / end-to-end latency
//! percentiles, goodput under TTFT and inter-token SLOs, and the server's prefix-cache hit
//! rate. Open-loop runs also report how late each request left against its schedule, so a
//! generator that cannot keep up is visible rather than silently lowering the load.
//!
//! It can also start `switchyard serve` itself (`--spawn`) or watch a server by PID, and
//! then charges the server's CPU time to its threads by name: the engine thread and its
//! compute pool against everything else, which is the frontend's cost per request and per
//! streamed token. Per-thread time comes from `/proc/<pid>/task/*/schedstat` (the
//! scheduler's nanosecond run time) where the kernel has it; utime + stime from `stat` is
//! also kept, but it is counted in 10 ms ticks, too coarse for short runs.
//!
//! Targets only 127.0.0.1: it is a measuring tool, not a load tester for other machines.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use engine::core::StepTimes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde_json::{json, Value};

use crate::workload::{self, Arrivals, Session, WorkItem, Workload};

/// Which OpenAI route the requests go to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Endpoint {
    /// `/v1/chat/completions` with a text prompt (its token count is approximate).
    Chat,
    /// `/v1/completions` with the prompt as token ids (its length is exact).
    Completions,
}

/// Where the server comes from.
#[derive(Clone, Debug)]
pub enum Target {
    /// A server already listening at this URL; `pid`, when given, is watched for CPU.
    Url { url: String, pid: Option<u32> },
    /// Start `bin serve --host 127.0.0.1 --port 0 <args>` and stop it at the end.
    Spawn { bin: PathBuf, args: Vec<String> },
}

#[derive(Clone, Debug)]
pub struct ServeBenchOptions {
    pub target: Target,
    /// Served model name (default: the first of `GET /v1/models`).
    pub model: Option<String>,
    pub endpoint: Endpoint,
    pub workload: Workload,
    pub load: Arrivals,
    /// Prompt token ids are drawn from `[0, vocab)`.
    pub vocab: u32,
    /// Seeds the prompts and the Poisson arrivals.
    pub seed: u64,
    pub slo: Slo,
    /// Bound on each request, from sending it to its last byte.
    pub timeout: Duration,
}

/// Latency targets for goodput; a target left out is always met.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Slo {
    /// Time to first token.
    pub ttft_ms: Option<f64>,
    /// The longest gap between two streamed token chunks of a request. The maximum rather
    /// than the mean, because a reader notices the one stall (a preemption, a long prefill
    /// batched in) that a mean would average away.
    pub itl_ms: Option<f64>,
}

/// Completed requests that met every SLO, as a rate and a fraction.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Goodput {
    pub slo_ttft_ms: Option<f64>,
    pub slo_itl_ms: Option<f64>,
    /// Requests that completed within both SLOs.
    pub met: usize,
    /// `met` over all requests sent (a failed request misses its SLOs).
    pub fraction: f64,
    pub requests_per_s: f64,
    /// Output tokens of the requests that met the SLOs, per second.
    pub output_tokens_per_s: f64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Dist {
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl Dist {
    fn of(mut v: Vec<f64>) -> Dist {
        if v.is_empty() {
            return Dist::default();
        }
        v.sort_by(f64::total_cmp);
        // Nearest rank: the smallest value with at least p of the samples at or below it.
        let pct = |p: f64| v[((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
        Dist {
            mean: v.iter().sum::<f64>() / v.len() as f64,
            p50: pct(0.50),
            p90: pct(0.90),
            p99: pct(0.99),
            max: v[v.len() - 1],
        }
    }
}

/// CPU seconds of one server thread over the measured window.
#[derive(Clone, Debug, Serialize)]
pub struct ThreadCpu {
    pub tid: u32,
    pub name: String,
    pub role: &'static str,
    pub cpu_s: f64,
    /// utime + stime (tick-sampled).
    pub stat_s: f64,
}

/// The server's CPU over the measured window, split by thread role.
#[derive(Clone, Debug, Serialize)]
pub struct ServerCpu {
    pub pid: u32,
    /// Where `*_s` come from: `schedstat` (exact run time) or `stat` (tick-sampled).
    pub source: &'static str,
    /// The engine thread and its compute pool: forward passes and scheduling.
    pub engine_s: f64,
    /// The HTTP runtime's workers (`switchyard-http`).
    pub http_s: f64,
    /// Every other thread (the main thread, blocking helpers).
    pub other_s: f64,
    /// `http_s + other_s`: everything that is not the engine.
    pub frontend_s: f64,
    /// The frontend's utime + stime, for comparison with `frontend_s`.
    pub frontend_stat_s: f64,
    pub frontend_us_per_request: f64,
    pub frontend_us_per_output_token: f64,
    pub engine_us_per_output_token: f64,
    /// Engine steps in the window (from `/admin/stats`) and wall time per step.
    pub engine_steps: u64,
    pub engine_step_ms: f64,
    pub threads: Vec<ThreadCpu>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ServeBenchReport {
    pub url: String,
    pub model: String,
    pub endpoint: Endpoint,
    /// What was sent: `kind` (`synthetic`, `multi_turn`, `mooncake`) and its options.
    pub workload: Workload,
    pub load: Arrivals,
    pub vocab: u32,
    pub seed: u64,
    /// Requests in the workload (all turns of all conversations, or the trace lines taken).
    pub requests: usize,
    pub completed: usize,
    pub failed: usize,
    /// Failures by kind: `status 429`, `timeout`, `connect`, `io`, `stream error`, ...
    pub errors: BTreeMap<String, usize>,
    pub duration_s: f64,
    pub requests_per_s: f64,
    pub output_tokens_per_s: f64,
    pub total_prompt_tokens: u64,
    pub total_output_tokens: u64,
    pub total_cached_tokens: u64,
    /// `total_cached_tokens / total_prompt_tokens`: the share of prompt tokens the server
    /// found in its prefix cache (`usage.prompt_tokens_details.cached_tokens`).
    pub prefix_hit_rate: f64,
    /// Output tokens of each completed request, as the server's usage reports them.
    pub output_tokens_min: u64,
    pub output_tokens_max: u64,
    pub ttft_ms: Dist,
    /// Gaps between streamed chunks (a chunk written with others counts as arriving at once).
    pub itl_ms: Dist,
    /// Per request: (end-to-end - TTFT) / (output tokens - 1).
    pub tpot_ms: Dist,
    pub e2e_ms: Dist,
    /// Per request: its longest gap between streamed chunks (what the ITL SLO checks).
    pub request_max_itl_ms: Dist,
    pub goodput: Goodput,
    /// Open loop (rate, trace): how much later than intended each request was sent. The
    /// intended time is its arrival time, or its conversation's previous turn's end if
    /// that is later. A p99 beyond a few ms means the generator itself was saturated.
    pub arrival_lag_ms: Option<Dist>,
    /// This load generator's own CPU seconds (it shares the machine with the server).
    pub client_cpu_s: f64,
    pub server_cpu: Option<ServerCpu>,
    /// The engines' own step durations over the run (from `/admin/stats`), to compare
    /// with the inter-token latency the client saw: what the serving path adds on top.
    pub engine_step_ms: Option<StepTimeSummary>,
    /// Server side: how long each token waited between the engine loop and the frontend.
    pub token_delivery_ms: Option<DeliverySummary>,
}

/// How long tokens waited between the engine loop and the HTTP response (the frontend's
/// `switchyard_token_delivery_seconds`), in ms. Each value is the upper edge of a
/// Prometheus bucket (10 µs, 25 µs, 50 µs, 100 µs, 250 µs, ... 1 s), so read them as
/// "at most".
#[derive(Clone, Debug, Serialize)]
pub struct DeliverySummary {
    pub tokens: u64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
}

/// Quantiles of engine step time, read from the engines' histograms (each value is the
/// upper edge of its bucket, at most 9% above the true value).
#[derive(Clone, Debug, Serialize)]
pub struct StepTimeSummary {
    pub steps: u64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl StepTimeSummary {
    fn of(h: &StepTimes) -> Option<Self> {
        let ms = |q: f64| h.quantile(q).map(|d| d.as_secs_f64() * 1e3);
        Some(StepTimeSummary {
            steps: h.count(),
            p50: ms(0.5)?,
            p90: ms(0.9)?,
            p99: ms(0.99)?,
            max: ms(1.0)?,
        })
    }
}

pub fn run(opts: &ServeBenchOptions) -> Result<ServeBenchReport> {
    validate(opts)?;
    // Read the trace and plan the sends before any server starts, so a bad file fails fast.
    let items = opts.workload.build(opts.vocab, opts.seed)?;
    let sessions = workload::sessions(&items, opts.load, opts.seed)?;
    // One thread is enough to drive the load and keeps the client's share of a small
    // machine low.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let (server, url, pid) = match &opts.target {
        Target::Url { url, pid } => (None, url.clone(), *pid),
        Target::Spawn { bin, args } => {
            let s = SpawnedServer::start(bin, args, opts.timeout.max(Duration::from_secs(60)))?;
            let (url, pid) = (s.url.clone(), Some(s.pid()));
            (Some(s), url, pid)
        }
    };
    let result = rt.block_on(run_load(opts, &items, sessions, &url, pid));
    if let Some(s) = server {
        s.stop()?;
    }
    result
}

fn validate(opts: &ServeBenchOptions) -> Result<()> {
    opts.workload.validate()?;
    match opts.load {
        Arrivals::Concurrency(0) => bail!("--concurrency must be at least 1"),
        Arrivals::Rate(r) if !(r > 0.0 && r.is_finite()) => bail!("--rate must be positive"),
        _ => {}
    }
    for (flag, slo) in [
        ("--slo-ttft-ms", opts.slo.ttft_ms),
        ("--slo-itl-ms", opts.slo.itl_ms),
    ] {
        if slo.is_some_and(|v| !(v > 0.0 && v.is_finite())) {
            bail!("{flag} must be positive");
        }
    }
    if let Target::Url { url, .. } = &opts.target {
        Addr::parse(url)?;
    }
    Ok(())
}

/// `host:port` of a loopback URL.
#[derive(Clone, Debug)]
struct Addr {
    authority: String,
}

impl Addr {
    fn parse(url: &str) -> Result<Addr> {
        let rest = url
            .strip_prefix("http://")
            .with_context(|| format!("--url {url:?}: only http:// URLs are supported"))?;
        let authority = rest.split('/').next().unwrap_or_default();
        let (host, port) = authority
            .rsplit_once(':')
            .with_context(|| format!("--url {url:?}: give the port, e.g. http://127.0.0.1:8000"))?;
        if !matches!(host, "127.0.0.1" | "localhost") {
            bail!("--url {url:?}: only 127.0.0.1 can be targeted");
        }
        let port: u16 = port
            .parse()
            .with_context(|| format!("--url {url:?}: bad port"))?;
        Ok(Addr {
            authority: format!("127.0.0.1:{port}"),
        })
    }
}

/// One keep-alive HTTP/1.1 connection.
struct Conn {
    send: SendRequest<Full<Bytes>>,
}

impl Conn {
    async fn open(addr: &Addr) -> Result<Conn, Failure> {
        let tcp = tokio::net::TcpStream::connect(&addr.authority)
            .await
            .map_err(|_| Failure::Connect)?;
        let _ = tcp.set_nodelay(true);
        let (send, conn) = http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|_| Failure::Connect)?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Conn { send })
    }

    fn request(addr: &Addr, method: &str, path: &str, body: Bytes) -> hyper::Request<Full<Bytes>> {
        hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", &addr.authority)
            .header("content-type", "application/json")
            .body(Full::new(body))
            .expect("a well-formed request")
    }
}

/// A small pool so open-loop requests reuse connections like a real client would.
#[derive(Clone)]
struct Pool {
    addr: Addr,
    idle: Arc<Mutex<Vec<Conn>>>,
}

impl Pool {
    async fn get(&self) -> Result<Conn, Failure> {
        loop {
            let c = self.idle.lock().expect("pool lock").pop();
            match c {
                Some(mut c) => {
                    if c.send.ready().await.is_ok() {
                        return Ok(c);
                    }
                }
                None => return Conn::open(&self.addr).await,
            }
        }
    }

    fn put(&self, c: Conn) {
        self.idle.lock().expect("pool lock").push(c);
    }
}

/// Simple JSON GET, for `/v1/models` and `/admin/stats`.
async fn get_json(addr: &Addr, path: &str) -> Result<Value> {
    let body = get_body(addr, path).await?;
    serde_json::from_slice(&body).with_context(|| format!("GET {path}: not JSON"))
}

async fn get_body(addr: &Addr, path: &str) -> Result<Bytes> {
    let mut c = Conn::open(addr)
        .await
        .map_err(|_| anyhow::anyhow!("cannot connect to {}", addr.authority))?;
    let resp = c
        .send
        .send_request(Conn::request(addr, "GET", path, Bytes::new()))
        .await
        .with_context(|| format!("GET {path}"))?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    if !status.is_success() {
        bail!(
            "GET {path}: {status}: {}",
            String::from_utf8_lossy(&body).trim()
        );
    }
    Ok(body)
}

const DELIVERY_METRIC: &str = "switchyard_token_delivery_seconds_bucket";

/// The token-delivery histogram of `/metrics` as (upper edge in seconds, cumulative
/// count) pairs, `+Inf` last; `None` if the server has no such metric.
async fn token_delivery(addr: &Addr) -> Option<Vec<(f64, u64)>> {
    let body = get_body(addr, "/metrics").await.ok()?;
    let text = String::from_utf8_lossy(&body);
    let buckets: Vec<(f64, u64)> = text
        .lines()
        .filter_map(|l| l.strip_prefix(DELIVERY_METRIC))
        .filter_map(|l| {
            let (labels, count) = l.rsplit_once(' ')?;
            let le = labels.split("le=\"").nth(1)?.split('"').next()?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, count.trim().parse().ok()?))
        })
        .collect();
    (!buckets.is_empty()).then_some(buckets)
}

/// Quantiles of the tokens observed between two scrapes of the same cumulative histogram.
fn delivery_summary(before: &[(f64, u64)], after: &[(f64, u64)]) -> Option<DeliverySummary> {
    let window: Vec<(f64, u64)> = after
        .iter()
        .map(|&(le, a)| {
            let b = before.iter().find(|(l, _)| *l == le).map_or(0, |x| x.1);
            (le, a.saturating_sub(b))
        })
        .collect();
    let total = window.last()?.1;
    if total == 0 {
        return None;
    }
    let q = |q: f64| {
        let rank = ((q * total as f64).ceil() as u64).max(1);
        window
            .iter()
            .find(|(_, c)| *c >= rank)
            .map_or(f64::INFINITY, |(le, _)| le * 1e3)
    };
    Some(DeliverySummary {
        tokens: total,
        p50: q(0.5),
        p90: q(0.9),
        p99: q(0.99),
        p999: q(0.999),
    })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Failure {
    Status(u16),
    Connect,
    Io,
    Timeout,
    StreamError,
    Incomplete,
}

impl Failure {
    fn label(self) -> String {
        match self {
            Failure::Status(s) => format!("status {s}"),
            Failure::Connect => "connect".into(),
            Failure::Io => "io".into(),
            Failure::Timeout => "timeout".into(),
            Failure::StreamError => "stream error".into(),
            Failure::Incomplete => "incomplete stream".into(),
        }
    }
}

#[derive(Debug, Default)]
struct Outcome {
    ttft: f64,
    e2e: f64,
    /// Gaps between token chunks, in ms.
    itl: Vec<f64>,
    prompt_tokens: u64,
    output_tokens: u64,
    cached_tokens: u64,
}

/// Builds the request bodies up front, so prompt generation costs nothing during the run.
fn bodies(items: &[WorkItem], endpoint: Endpoint, model: &str) -> Vec<Bytes> {
    items
        .iter()
        .map(|item| {
            let mut body = json!({
                "model": model,
                "max_tokens": item.max_tokens,
                "ignore_eos": true,
                "stream": true,
                "stream_options": {"include_usage": true},
            });
            match endpoint {
                Endpoint::Completions => body["prompt"] = json!(item.prompt),
                Endpoint::Chat => {
                    let text = item
                        .prompt
                        .iter()
                        .map(|&t| word(t))
                        .collect::<Vec<_>>()
                        .join(" ");
                    body["messages"] = json!([{"role": "user", "content": text}]);
                }
            }
            Bytes::from(body.to_string())
        })
        .collect()
}

/// A word per token id for chat prompts: ordinary words so the text tokenizes to roughly
/// one token each.
fn word(t: u32) -> &'static str {
    const WORDS: [&str; 32] = [
        "the", "of", "and", "to", "in", "is", "was", "for", "on", "with", "as", "by", "at", "from",
        "that", "this", "it", "be", "are", "or", "an", "not", "have", "one", "all", "time", "out",
        "up", "new", "more", "about", "first",
    ];
    WORDS[t as usize % WORDS.len()]
}

/// Sends one streamed request and times its chunks.
async fn one_request(
    conn: &mut Conn,
    addr: &Addr,
    path: &str,
    body: Bytes,
) -> Result<Outcome, Failure> {
    let start = Instant::now();
    conn.send.ready().await.map_err(|_| Failure::Io)?;
    let resp = conn
        .send
        .send_request(Conn::request(addr, "POST", path, body))
        .await
        .map_err(|_| Failure::Io)?;
    let status = resp.status().as_u16();
    let mut body = resp.into_body();
    if status != 200 {
        // Read the error body so the connection can be reused.
        let _ = (&mut body).collect().await;
        return Err(Failure::Status(status));
    }
    let mut sse = SseParser::default();
    let mut times: Vec<f64> = Vec::with_capacity(256);
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|_| Failure::Io)?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        let t = start.elapsed().as_secs_f64();
        sse.feed(&data, |ev| match ev {
            Event::Token => times.push(t),
        })?;
    }
    if !sse.done {
        return Err(Failure::Incomplete);
    }
    let e2e = start.elapsed().as_secs_f64();
    let ttft = times.first().copied().unwrap_or(e2e);
    let itl = times.windows(2).map(|w| (w[1] - w[0]) * 1e3).collect();
    let usage = sse.usage.unwrap_or_default();
    Ok(Outcome {
        ttft,
        e2e,
        itl,
        prompt_tokens: usage.0,
        output_tokens: if sse.usage.is_some() {
            usage.1
        } else {
            times.len() as u64
        },
        cached_tokens: usage.2,
    })
}

enum Event {
    Token,
}

/// Splits an SSE body into `data:` events. Chunks are classified by substring, not parsed:
/// only the usage chunk is parsed, so the client stays cheap next to the server it measures.
/// (A JSON string cannot contain an unescaped `"`, so the markers cannot appear in text.)
#[derive(Default)]
struct SseParser {
    buf: Vec<u8>,
    done: bool,
    /// (prompt, completion, cached) tokens.
    usage: Option<(u64, u64, u64)>,
}

impl SseParser {
    fn feed(&mut self, data: &[u8], mut on: impl FnMut(Event)) -> Result<(), Failure> {
        self.buf.extend_from_slice(data);
        let mut start = 0;
        while let Some(end) = find(&self.buf[start..], b"\n\n") {
            let ev = &self.buf[start..start + end];
            start += end + 2;
            let Some(payload) = ev.strip_prefix(b"data: ") else {
                continue;
            };
            if payload == b"[DONE]" {
                self.done = true;
            } else if payload.starts_with(b"{\"error\"") {
                return Err(Failure::StreamError);
            } else if find(payload, b"\"usage\":{").is_some() {
                let v: Value = serde_json::from_slice(payload).map_err(|_| Failure::Io)?;
                let u = &v["usage"];
                self.usage = Some((
                    u["prompt_tokens"].as_u64().unwrap_or(0),
                    u["completion_tokens"].as_u64().unwrap_or(0),
                    u["prompt_tokens_details"]["cached_tokens"]
                        .as_u64()
                        .unwrap_or(0),
                ));
            } else if find(payload, b"\"role\":\"assistant\"").is_none() {
                on(Event::Token);
            }
        }
        self.buf.drain(..start);
        Ok(())
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// What happened to one request: its outcome, and how late it left (open loop only).
struct Record {
    result: Result<Outcome, Failure>,
    lag_s: Option<f64>,
}

type Results = Arc<Mutex<Vec<Record>>>;

/// What every session task shares.
#[derive(Clone)]
struct Runner {
    pool: Pool,
    path: &'static str,
    bodies: Arc<Vec<Bytes>>,
    results: Results,
    timeout: Duration,
    start: Instant,
}

impl Runner {
    /// Sends a session's requests in order, each at the later of its due time and the end
    /// of the one before.
    async fn session(&self, s: &Session) {
        let mut prev_end: Option<Instant> = None;
        for (&i, due) in s.items.iter().zip(&s.due_s) {
            let lag_s = match due {
                Some(t) => {
                    let due = self.start + Duration::from_secs_f64(*t);
                    tokio::time::sleep_until(due.into()).await;
                    let intended = prev_end.map_or(due, |p| p.max(due));
                    Some(intended.elapsed().as_secs_f64())
                }
                None => None,
            };
            let result = send(&self.pool, self.path, self.bodies[i].clone(), self.timeout).await;
            prev_end = Some(Instant::now());
            self.results
                .lock()
                .expect("results lock")
                .push(Record { result, lag_s });
        }
    }
}

async fn run_load(
    opts: &ServeBenchOptions,
    items: &[WorkItem],
    sessions: Vec<Session>,
    url: &str,
    pid: Option<u32>,
) -> Result<ServeBenchReport> {
    let addr = Addr::parse(url)?;
    let model = match &opts.model {
        Some(m) => m.clone(),
        None => get_json(&addr, "/v1/models").await?["data"][0]["id"]
            .as_str()
            .context("GET /v1/models lists no model")?
            .to_string(),
    };
    let path = match opts.endpoint {
        Endpoint::Chat => "/v1/chat/completions",
        Endpoint::Completions => "/v1/completions",
    };
    let sessions = Arc::new(sessions);
    let bodies = Arc::new(bodies(items, opts.endpoint, &model));

    let engine_before = engine_stats(&addr).await;
    let delivery_before = token_delivery(&addr).await;
    let cpu_before = pid.map(thread_cpu);
    let client_before = self_cpu_s();
    let start = Instant::now();
    let runner = Runner {
        pool: Pool {
            addr: addr.clone(),
            idle: Arc::default(),
        },
        path,
        bodies,
        results: Arc::new(Mutex::new(Vec::with_capacity(items.len()))),
        timeout: opts.timeout,
        start,
    };
    match opts.load {
        Arrivals::Concurrency(c) => {
            let next = Arc::new(AtomicUsize::new(0));
            let mut workers = Vec::new();
            for _ in 0..c.min(sessions.len()) {
                let (next, sessions, runner) = (next.clone(), sessions.clone(), runner.clone());
                workers.push(tokio::spawn(async move {
                    // Bounded: each pass takes a distinct session index.
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(s) = sessions.get(i) else { break };
                        runner.session(s).await;
                    }
                }));
            }
            for w in workers {
                w.await.context("a load worker panicked")?;
            }
        }
        Arrivals::Rate(_) | Arrivals::Trace => {
            // Sessions are in start order; each starts as its own task at its time.
            let mut tasks = Vec::with_capacity(sessions.len());
            for i in 0..sessions.len() {
                if let Some(t) = sessions[i].due_s[0] {
                    tokio::time::sleep_until((start + Duration::from_secs_f64(t)).into()).await;
                }
                let (sessions, runner) = (sessions.clone(), runner.clone());
                tasks.push(tokio::spawn(
                    async move { runner.session(&sessions[i]).await },
                ));
            }
            for t in tasks {
                t.await.context("a request task panicked")?;
            }
        }
    }
    let duration = start.elapsed().as_secs_f64();
    let client_cpu_s = self_cpu_s() - client_before;
    let cpu_after = pid.map(thread_cpu);
    let engine_after = engine_stats(&addr).await;
    let delivery_after = token_delivery(&addr).await;
    let engine_window = match (&engine_before, &engine_after) {
        (Some(b), Some(a)) => Some((a.0.saturating_sub(b.0), a.1.since(&b.1))),
        _ => None,
    };

    let records = std::mem::take(&mut *runner.results.lock().expect("results lock"));
    let mut errors = BTreeMap::new();
    let mut ok = Vec::new();
    let mut lags = Vec::new();
    for r in records {
        lags.extend(r.lag_s.map(|l| l * 1e3));
        match r.result {
            Ok(o) => ok.push(o),
            Err(f) => *errors.entry(f.label()).or_insert(0) += 1,
        }
    }
    let total_output: u64 = ok.iter().map(|o| o.output_tokens).sum();
    let server_cpu = match (pid, cpu_before, cpu_after) {
        (Some(pid), Some(Ok(b)), Some(Ok(a))) => {
            let steps = engine_window.as_ref().map_or(0, |w| w.0);
            Some(cpu_split(
                pid,
                &b,
                &a,
                ok.len(),
                total_output,
                steps,
                duration,
            ))
        }
        (Some(_), Some(Err(e)), _) | (Some(_), _, Some(Err(e))) => {
            return Err(e.context("reading the server's CPU time"))
        }
        _ => None,
    };
    let total_prompt: u64 = ok.iter().map(|o| o.prompt_tokens).sum();
    let total_cached: u64 = ok.iter().map(|o| o.cached_tokens).sum();
    Ok(ServeBenchReport {
        url: url.to_string(),
        model,
        endpoint: opts.endpoint,
        workload: opts.workload.clone(),
        load: opts.load,
        vocab: opts.vocab,
        seed: opts.seed,
        requests: items.len(),
        completed: ok.len(),
        failed: items.len() - ok.len(),
        errors,
        duration_s: duration,
        requests_per_s: ok.len() as f64 / duration,
        output_tokens_per_s: total_output as f64 / duration,
        total_prompt_tokens: total_prompt,
        total_output_tokens: total_output,
        total_cached_tokens: total_cached,
        prefix_hit_rate: if total_prompt > 0 {
            total_cached as f64 / total_prompt as f64
        } else {
            0.0
        },
        output_tokens_min: ok.iter().map(|o| o.output_tokens).min().unwrap_or(0),
        output_tokens_max: ok.iter().map(|o| o.output_tokens).max().unwrap_or(0),
        ttft_ms: Dist::of(ok.iter().map(|o| o.ttft * 1e3).collect()),
        itl_ms: Dist::of(ok.iter().flat_map(|o| o.itl.iter().copied()).collect()),
        tpot_ms: Dist::of(
            ok.iter()
                .filter(|o| o.output_tokens > 1)
                .map(|o| (o.e2e - o.ttft) * 1e3 / (o.output_tokens - 1) as f64)
                .collect(),
        ),
        e2e_ms: Dist::of(ok.iter().map(|o| o.e2e * 1e3).collect()),
        request_max_itl_ms: Dist::of(ok.iter().map(Outcome::max_itl_ms).collect()),
        goodput: goodput(&ok, items.len(), opts.slo, duration),
        arrival_lag_ms: match opts.load {
            Arrivals::Concurrency(_) => None,
            Arrivals::Rate(_) | Arrivals::Trace => Some(Dist::of(lags)),
        },
        client_cpu_s,
        server_cpu,
        engine_step_ms: engine_window.and_then(|w| StepTimeSummary::of(&w.1)),
        token_delivery_ms: match (&delivery_before, &delivery_after) {
            (Some(b), Some(a)) => delivery_summary(b, a),
            _ => None,
        },
    })
}

impl Outcome {
    fn max_itl_ms(&self) -> f64 {
        self.itl.iter().copied().fold(0.0, f64::max)
    }

    fn meets(&self, slo: Slo) -> bool {
        slo.ttft_ms.is_none_or(|t| self.ttft * 1e3 <= t)
            && slo.itl_ms.is_none_or(|t| self.max_itl_ms() <= t)
    }
}

/// Goodput of `ok` (the completed requests) out of `sent`, over `duration` seconds.
fn goodput(ok: &[Outcome], sent: usize, slo: Slo, duration: f64) -> Goodput {
    let good: Vec<&Outcome> = ok.iter().filter(|o| o.meets(slo)).collect();
    let per_s = |x: f64| if duration > 0.0 { x / duration } else { 0.0 };
    Goodput {
        slo_ttft_ms: slo.ttft_ms,
        slo_itl_ms: slo.itl_ms,
        met: good.len(),
        fraction: if sent > 0 {
            good.len() as f64 / sent as f64
        } else {
            0.0
        },
        requests_per_s: per_s(good.len() as f64),
        output_tokens_per_s: per_s(good.iter().map(|o| o.output_tokens).sum::<u64>() as f64),
    }
}

/// One request on a pooled connection, bounded by `timeout`.
async fn send(pool: &Pool, path: &str, body: Bytes, timeout: Duration) -> Result<Outcome, Failure> {
    let work = async {
        let mut conn = pool.get().await?;
        let r = one_request(&mut conn, &pool.addr, path, body).await;
        if r.is_ok() || matches!(r, Err(Failure::Status(_))) {
            pool.put(conn);
        }
        r
    };
    tokio::time::timeout(timeout, work)
        .await
        .unwrap_or(Err(Failure::Timeout))
}

/// Engine steps so far and their durations, from `/admin/stats` (None if the server has
/// no such route).
async fn engine_stats(addr: &Addr) -> Option<(u64, StepTimes)> {
    let mut stats = get_json(addr, "/admin/stats").await.ok()?;
    let steps = stats["steps"].as_u64()?;
    let times = serde_json::from_value(stats["step_time_us"].take()).unwrap_or_default();
    Some((steps, times))
}

/// A thread's role, from its name (Linux keeps the first 15 bytes).
fn role(name: &str) -> &'static str {
    // "switchyard-engine" and the compute pool's "switchyard-kernel-N".
    if name.starts_with("switchyard-engi") || name.starts_with("switchyard-kern") {
        "engine"
    } else if name.starts_with("switchyard-http") {
        "http"
    } else {
        "other"
    }
}

/// One thread's name and CPU seconds: utime + stime, and schedstat's run time if present.
#[derive(Clone, Debug)]
struct Sample {
    name: String,
    stat_s: f64,
    sched_s: Option<f64>,
}

type Snapshot = BTreeMap<u32, Sample>;

/// CPU time of every thread of `pid`, from `/proc/<pid>/task/*/{stat,schedstat}`.
fn thread_cpu(pid: u32) -> Result<Snapshot> {
    let tick = clock_ticks();
    let mut out = BTreeMap::new();
    let dir = format!("/proc/{pid}/task");
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {dir}"))? {
        let entry = entry?;
        let Ok(tid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        // A thread can exit between listing and reading.
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let sched_s = std::fs::read_to_string(entry.path().join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
            .map(|ns| ns as f64 / 1e9);
        if let Some((name, ticks)) = parse_stat(&stat) {
            let stat_s = ticks as f64 / tick;
            out.insert(
                tid,
                Sample {
                    name,
                    stat_s,
                    sched_s,
                },
            );
        }
    }
    Ok(out)
}

/// (comm, utime + stime in ticks) from a `/proc/.../stat` line. The name sits in
/// parentheses and may itself contain spaces or parentheses, so split at the last `)`.
fn parse_stat(stat: &str) -> Option<(String, u64)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let name = stat.get(open + 1..close)?.to_string();
    // Fields after the name start at field 3 (state); utime and stime are fields 14 and 15.
    let mut rest = stat.get(close + 1..)?.split_whitespace().skip(11);
    let utime: u64 = rest.next()?.parse().ok()?;
    let stime: u64 = rest.next()?.parse().ok()?;
    Some((name, utime + stime))
}

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// This process's CPU seconds (all threads).
fn self_cpu_s() -> f64 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| parse_stat(&s))
        .map_or(0.0, |(_, t)| t as f64 / clock_ticks())
}

fn cpu_split(
    pid: u32,
    before: &Snapshot,
    after: &Snapshot,
    requests: usize,
    output_tokens: u64,
    steps: u64,
    duration: f64,
) -> ServerCpu {
    let exact = after.values().all(|s| s.sched_s.is_some());
    let mut threads: Vec<ThreadCpu> = after
        .iter()
        .map(|(&tid, a)| {
            let b = before.get(&tid);
            let stat_s = a.stat_s - b.map_or(0.0, |b| b.stat_s);
            let sched_s = a.sched_s.unwrap_or(0.0) - b.and_then(|b| b.sched_s).unwrap_or(0.0);
            ThreadCpu {
                tid,
                name: a.name.clone(),
                role: role(&a.name),
                cpu_s: if exact { sched_s } else { stat_s },
                stat_s,
            }
        })
        .collect();
    threads.sort_by(|a, b| b.cpu_s.total_cmp(&a.cpu_s));
    let sum = |r: &str| {
        threads
            .iter()
            .filter(|t| t.role == r)
            .map(|t| t.cpu_s)
            .sum::<f64>()
    };
    let (engine_s, http_s, other_s) = (sum("engine"), sum("http"), sum("other"));
    let frontend_s = http_s + other_s;
    let frontend_stat_s = threads
        .iter()
        .filter(|t| t.role != "engine")
        .map(|t| t.stat_s)
        .sum();
    let per = |s: f64, n: f64| if n > 0.0 { s * 1e6 / n } else { 0.0 };
    ServerCpu {
        pid,
        source: if exact { "schedstat" } else { "stat" },
        engine_s,
        http_s,
        other_s,
        frontend_s,
        frontend_stat_s,
        frontend_us_per_request: per(frontend_s, requests as f64),
        frontend_us_per_output_token: per(frontend_s, output_tokens as f64),
        engine_us_per_output_token: per(engine_s, output_tokens as f64),
        engine_steps: steps,
        engine_step_ms: if steps > 0 {
            duration * 1e3 / steps as f64
        } else {
            0.0
        },
        threads,
    }
}

/// A `switchyard serve` this benchmark started; stopped (by PID) when dropped.
struct SpawnedServer {
    child: Option<Child>,
    url: String,
    log: Arc<Mutex<Vec<String>>>,
}

impl SpawnedServer {
    fn start(bin: &PathBuf, args: &[String], ready_within: Duration) -> Result<SpawnedServer> {
        let mut child = Command::new(bin)
            .args(["serve", "--host", "127.0.0.1", "--port", "0"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {} serve", bin.display()))?;
        let stderr = child.stderr.take().context("no stderr pipe")?;
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = Arc::clone(&log);
        // Keeps draining the log so the server never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("switchyard ready") {
                    let _ = tx.send(line.clone());
                }
                sink.lock().expect("log lock").push(line);
            }
        });
        let mut server = SpawnedServer {
            child: Some(child),
            url: String::new(),
            log,
        };
        let ready = rx.recv_timeout(ready_within).map_err(|_| {
            anyhow::anyhow!(
                "the server printed no ready line within {ready_within:?}; its log:\n{}",
                server.log()
            )
        })?;
        let url = ready
            .split_whitespace()
            .find(|w| w.starts_with("http://"))
            .context("the ready line has no URL")?;
        server.url = url.trim_end_matches(['/', ',', ')']).to_string();
        Ok(server)
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    fn log(&self) -> String {
        self.log.lock().expect("log lock").join("\n")
    }

    /// SIGTERM, then a bounded wait for a clean exit.
    fn stop(mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait()? {
                if !status.success() {
                    bail!("the server exited with {status}; its log:\n{}", self.log());
                }
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        bail!("the server did not stop within 30 s of SIGTERM")
    }
}

impl Drop for SpawnedServer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn print_table(r: &ServeBenchReport) {
    let load = match r.load {
        Arrivals::Concurrency(c) => format!("concurrency {c}"),
        Arrivals::Rate(x) => format!("rate {x}/s"),
        Arrivals::Trace => "trace arrival times".to_string(),
    };
    let workload = match &r.workload {
        Workload::Synthetic(w) => format!(
            "synthetic, prompt {} tokens, max {} tokens{}",
            w.prompt_tokens,
            w.max_tokens,
            if w.prefix_groups > 0 {
                format!(", {} groups sharing {} tokens", w.prefix_groups, w.prefix_tokens)
            } else {
                String::new()
            }
        ),
        Workload::MultiTurn(w) => format!(
            "multi-turn, {} conversations x {} turns, {} user + {} answer tokens a turn, max {} tokens",
            w.conversations, w.turns, w.user_tokens, w.answer_tokens, w.max_tokens
        ),
        Workload::Mooncake { trace, options: o } => format!(
            "mooncake {}, {} tokens a block, speedup {}{}",
            trace.display(),
            o.block_tokens,
            o.speedup,
            o.max_output_tokens
                .map(|m| format!(", output capped at {m}"))
                .unwrap_or_default()
        ),
    };
    println!(
        "model: {}  endpoint: {:?}  {load}  workload: {workload}",
        r.model, r.endpoint
    );
    println!(
        "{} of {} requests completed in {:.2} s: {:.2} requests/s, {:.1} output tokens/s",
        r.completed, r.requests, r.duration_s, r.requests_per_s, r.output_tokens_per_s
    );
    println!(
        "tokens: {} prompt ({} cached, prefix hit rate {:.1}%), {} output ({}..{} per request)",
        r.total_prompt_tokens,
        r.total_cached_tokens,
        r.prefix_hit_rate * 100.0,
        r.total_output_tokens,
        r.output_tokens_min,
        r.output_tokens_max
    );
    for (kind, n) in &r.errors {
        println!("errors: {n} x {kind}");
    }
    println!();
    println!("| latency (ms) | mean | p50 | p90 | p99 | max |");
    println!("|---|---:|---:|---:|---:|---:|");
    for (name, d) in [
        ("TTFT", &r.ttft_ms),
        ("inter-token", &r.itl_ms),
        ("per output token", &r.tpot_ms),
        ("end-to-end", &r.e2e_ms),
        ("longest gap per request", &r.request_max_itl_ms),
    ]
    .into_iter()
    .chain(r.arrival_lag_ms.as_ref().map(|d| ("send lag", d)))
    {
        println!(
            "| {name} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
            d.mean, d.p50, d.p90, d.p99, d.max
        );
    }
    if let Some(st) = &r.engine_step_ms {
        println!(
            "| engine step (server side, {} steps) | | {:.2} | {:.2} | {:.2} | {:.2} |",
            st.steps, st.p50, st.p90, st.p99, st.max
        );
    }
    if let Some(d) = &r.token_delivery_ms {
        println!(
            "| token wait, engine → HTTP (server side, {} tokens; p99.9 in the max column) | | ≤ {} | ≤ {} | ≤ {} | ≤ {} |",
            d.tokens, d.p50, d.p90, d.p99, d.p999
        );
    }
    let g = &r.goodput;
    let slo = |v: Option<f64>| v.map_or("any".to_string(), |v| format!("<= {v} ms"));
    println!();
    println!(
        "goodput (TTFT {}, longest gap {}): {} of {} requests ({:.1}%), {:.2} requests/s, {:.1} output tokens/s",
        slo(g.slo_ttft_ms),
        slo(g.slo_itl_ms),
        g.met,
        r.requests,
        g.fraction * 100.0,
        g.requests_per_s,
        g.output_tokens_per_s
    );
    if let Some(c) = &r.server_cpu {
        println!();
        println!(
            "server CPU (pid {}, {}): engine {:.3} s, http {:.3} s, other {:.3} s (utime+stime of http+other: {:.3} s); client {:.3} s",
            c.pid, c.source, c.engine_s, c.http_s, c.other_s, c.frontend_stat_s, r.client_cpu_s
        );
        println!(
            "frontend: {:.1} µs per output token, {:.0} µs per request; engine: {:.1} µs per output token, {} steps, {:.2} ms per step",
            c.frontend_us_per_output_token,
            c.frontend_us_per_request,
            c.engine_us_per_output_token,
            c.engine_steps,
            c.engine_step_ms
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let d = Dist::of((1..=100).map(f64::from).collect());
        assert_eq!((d.p50, d.p90, d.p99, d.max), (50.0, 90.0, 99.0, 100.0));
        assert_eq!(Dist::of(vec![]).p99, 0.0);
    }

    #[test]
    fn stat_lines_with_odd_names_parse() {
        let line = "42 (switchyard-http) S 1 2 3 4 5 6 7 8 9 10 250 30 0 0 20 0 1";
        assert_eq!(parse_stat(line), Some(("switchyard-http".into(), 280)));
        let odd = "7 (a) b (c) R 1 2 3 4 5 6 7 8 9 10 1 2 0";
        assert_eq!(parse_stat(odd), Some(("a) b (c".into(), 3)));
        assert_eq!(role("switchyard-engi"), "engine");
        assert_eq!(role("switchyard-kern"), "engine");
        assert_eq!(role("switchyard"), "other");
    }

    #[test]
    fn sse_events_split_across_reads() {
        let mut p = SseParser::default();
        let mut tokens = 0;
        let role = "data: {\"id\":\"x\",\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n";
        let tok =
            "data: {\"id\":\"x\",\"choices\":[{\"delta\":{\"content\":\"usage\\\":{\"}}]}\n\n";
        let usage = "data: {\"id\":\"x\",\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2,\"prompt_tokens_details\":{\"cached_tokens\":1}}}\n\ndata: [DONE]\n\n";
        let all = format!("{role}{tok}{tok}{usage}");
        for piece in all.as_bytes().chunks(7) {
            p.feed(piece, |_| tokens += 1).unwrap();
        }
        assert_eq!(tokens, 2);
        assert!(p.done);
        assert_eq!(p.usage, Some((3, 2, 1)));
    }

    #[test]
    fn only_loopback_urls() {
        assert!(Addr::parse("http://127.0.0.1:8000").is_ok());
        assert!(Addr::parse("http://localhost:8000/v1").is_ok());
        assert!(Addr::parse("http://10.0.0.1:8000").is_err());
        assert!(Addr::parse("https://127.0.0.1:8000").is_err());
    }

    #[test]
    fn bodies_carry_each_items_prompt_and_length() {
        let items = vec![
            WorkItem {
                arrival_s: None,
                prompt: vec![3, 1, 4],
                max_tokens: 7,
                conversation: None,
            },
            WorkItem {
                arrival_s: Some(1.0),
                prompt: vec![1, 5],
                max_tokens: 2,
                conversation: Some((0, 1)),
            },
        ];
        let b: Vec<Value> = bodies(&items, Endpoint::Completions, "m")
            .iter()
            .map(|b| serde_json::from_slice(b).unwrap())
            .collect();
        assert_eq!(b[0]["prompt"], json!([3, 1, 4]));
        assert_eq!(b[0]["max_tokens"], 7);
        assert_eq!(b[1]["max_tokens"], 2);
        assert_eq!(b[1]["stream_options"]["include_usage"], true);
        let chat: Value = serde_json::from_slice(&bodies(&items, Endpoint::Chat, "m")[1]).unwrap();
        assert_eq!(chat["messages"][0]["content"], "of is");
    }

    fn outcome(ttft_ms: f64, gaps_ms: &[f64], output_tokens: u64) -> Outcome {
        Outcome {
            ttft: ttft_ms / 1e3,
            itl: gaps_ms.to_vec(),
            output_tokens,
            ..Outcome::default()
        }
    }

    #[test]
    fn goodput_counts_requests_within_both_slos() {
        let ok = [
            outcome(50.0, &[10.0, 12.0], 3), // meets both
            outcome(250.0, &[10.0], 2),      // TTFT too slow
            outcome(80.0, &[10.0, 45.0], 3), // one gap too long
            outcome(100.0, &[], 1),          // exactly at the TTFT limit, no gaps
        ];
        let slo = Slo {
            ttft_ms: Some(100.0),
            itl_ms: Some(40.0),
        };
        // Five sent: one failed, so 2 of 5 met the SLOs.
        let g = goodput(&ok, 5, slo, 2.0);
        assert_eq!(g.met, 2);
        assert_eq!(g.fraction, 0.4);
        assert_eq!(g.requests_per_s, 1.0);
        assert_eq!(g.output_tokens_per_s, 2.0);
        assert_eq!((g.slo_ttft_ms, g.slo_itl_ms), (Some(100.0), Some(40.0)));
        // Only a TTFT target: the long gap no longer matters.
        let g = goodput(
            &ok,
            5,
            Slo {
                itl_ms: None,
                ..slo
            },
            2.0,
        );
        assert_eq!(g.met, 3);
        // No targets: goodput is the completed throughput.
        let g = goodput(&ok, 4, Slo::default(), 1.0);
        assert_eq!((g.met, g.fraction, g.output_tokens_per_s), (4, 1.0, 9.0));
    }
}
