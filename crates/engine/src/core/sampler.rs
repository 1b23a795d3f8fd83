//! Token sampling on CPU logits, one [`SamplerState`] per sequence, with vLLM v1's
//! semantics and order: penalties (repetition over prompt and output, presence and
//! frequency over output), then temperature, then `min_p` and `top_k`, then `top_p` over
//! the survivors renormalised, then a draw. Temperature 0 is greedy: the argmax of the
//! penalised logits, lowest token id on ties. The hot path is a few vectorisable passes
//! over the vocabulary (with a polynomial `exp`) and an inverse-CDF draw over chunk sums;
//! nothing sorts the vocabulary: `top_k` keeps a heap of k values, `top_p` draws by
//! rejection against the nucleus test (FlashInfer's pivot idea). Reported logprobs are the
//! model's own (`log_softmax` of the raw logits, before penalties and temperature), as in
//! OpenAI's API and vLLM's default.

use std::cell::RefCell;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// Most alternatives a request may ask for per token (OpenAI's and vLLM's default cap).
pub const MAX_LOGPROBS: u32 = 20;

/// Temperatures below this are treated as greedy, as in vLLM: dividing by them would only
/// turn the distribution into an argmax with extra rounding.
const GREEDY_TEMPERATURE: f32 = 1e-5;

/// Tokens per chunk of the inverse-CDF draw: the draw walks chunk sums, then one chunk.
const CHUNK: usize = 256;

/// Lanes of the vectorisable loops: 8 independent accumulators let the compiler use SIMD
/// without reassociating a float sum it must keep in order.
const LANES: usize = 8;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// 0 is greedy.
    pub temperature: f32,
    /// Keep the `top_k` most likely tokens (ties with the last one included); 0 is off.
    pub top_k: u32,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p`;
    /// 1 is off.
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` times the most likely one; 0 is off.
    pub min_p: f32,
    /// OpenAI semantics over generated tokens: subtracted once from the logit of every
    /// token generated so far.
    pub presence_penalty: f32,
    /// OpenAI semantics over generated tokens: subtracted once per occurrence.
    pub frequency_penalty: f32,
    /// Hugging Face semantics over prompt and generated tokens: positive logits are
    /// divided by it, negative ones multiplied; 1 is off.
    pub repetition_penalty: f32,
    /// Seed of this sequence's generator; `None` draws one at random.
    pub seed: Option<u64>,
    /// `Some(n)`: report the sampled token's logprob and the `n` most likely alternatives.
    pub logprobs: Option<u32>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            seed: None,
            logprobs: None,
        }
    }
}

/// A sampling parameter out of range; the caller sent a bad request (HTTP 400).
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum SamplingError {
    #[error("{field} must be {expected}, got {got}")]
    OutOfRange {
        field: &'static str,
        expected: &'static str,
        got: f32,
    },
    #[error("logprobs must be at most {max}, got {got}")]
    TooManyLogprobs { got: u32, max: u32 },
}

impl SamplingError {
    /// The offending field, for the `param` of an OpenAI-style error body.
    pub fn field(&self) -> &'static str {
        match self {
            SamplingError::OutOfRange { field, .. } => field,
            SamplingError::TooManyLogprobs { .. } => "logprobs",
        }
    }
}

impl SamplingParams {
    /// Checks every field against the ranges OpenAI and vLLM accept.
    pub fn validate(&self) -> Result<(), SamplingError> {
        let check = |field, ok: bool, expected, got| {
            if ok {
                Ok(())
            } else {
                Err(SamplingError::OutOfRange {
                    field,
                    expected,
                    got,
                })
            }
        };
        let t = self.temperature;
        check(
            "temperature",
            t.is_finite() && t >= 0.0,
            "finite and >= 0",
            t,
        )?;
        let p = self.top_p;
        check("top_p", p > 0.0 && p <= 1.0, "in (0, 1]", p)?;
        let p = self.min_p;
        check("min_p", (0.0..=1.0).contains(&p), "in [0, 1]", p)?;
        let p = self.presence_penalty;
        check(
            "presence_penalty",
            (-2.0..=2.0).contains(&p),
            "in [-2, 2]",
            p,
        )?;
        let p = self.frequency_penalty;
        check(
            "frequency_penalty",
            (-2.0..=2.0).contains(&p),
            "in [-2, 2]",
            p,
        )?;
        let p = self.repetition_penalty;
        check(
            "repetition_penalty",
            p.is_finite() && p > 0.0,
            "finite and > 0",
            p,
        )?;
        match self.logprobs {
            Some(n) if n > MAX_LOGPROBS => Err(SamplingError::TooManyLogprobs {
                got: n,
                max: MAX_LOGPROBS,
            }),
            _ => Ok(()),
        }
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature < GREEDY_TEMPERATURE || self.top_k == 1
    }
}

/// One sampled token.
#[derive(Clone, Debug, PartialEq)]
pub struct Sampled {
    pub token: u32,
    /// The model's log-probability of `token` (raw logits, before penalties and
    /// temperature); NaN when the request asked for no logprobs.
    pub logprob: f32,
    /// The most likely tokens with their raw log-probabilities, most likely first (lowest
    /// id first on ties); empty when the request asked for no logprobs.
    pub top_logprobs: Vec<(u32, f32)>,
}

#[derive(Clone, Copy, Debug, Default)]
struct Seen {
    in_prompt: bool,
    generated: u32,
}

/// Per-sequence sampling state: the random generator and the token counts the penalties
/// need. Pass the same [`SamplingParams`] to every call that [`new`](Self::new) got.
#[derive(Clone, Debug)]
pub struct SamplerState {
    rng: ChaCha8Rng,
    /// Prompt tokens (only when the repetition penalty is on) and generated tokens.
    seen: HashMap<u32, Seen>,
}

thread_local! {
    /// Vocabulary-sized buffers, per thread rather than per sequence: a thousand waiting
    /// sequences should not each hold half a megabyte of scratch.
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// Buffers reused from one token to the next.
#[derive(Default)]
struct Scratch {
    /// Raw logits, kept for the sampled token's logprob.
    raw: Vec<f32>,
    /// The `top_k` largest logits seen so far, smallest on top.
    heap: BinaryHeap<Reverse<TotalF32>>,
    /// Values for a `top_k` selection too large for the heap.
    select: Vec<f32>,
    /// Weight per [`CHUNK`] of the vocabulary, for the draw.
    chunk_sums: Vec<f32>,
    /// `(weight, token)` pairs for the sorted `top_p` fallback.
    candidates: Vec<(f32, u32)>,
}

/// An `f32` ordered by `total_cmp`, for the heap.
#[derive(Clone, Copy, PartialEq)]
struct TotalF32(f32);

impl Eq for TotalF32 {}

impl PartialOrd for TotalF32 {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for TotalF32 {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}

impl SamplerState {
    pub fn new(params: &SamplingParams, prompt: &[u32]) -> Self {
        let seed = params.seed.unwrap_or_else(rand::random);
        let mut seen: HashMap<u32, Seen> = HashMap::new();
        if params.repetition_penalty != 1.0 {
            for &t in prompt {
                seen.entry(t).or_default().in_prompt = true;
            }
        }
        SamplerState {
            rng: ChaCha8Rng::seed_from_u64(seed),
            seen,
        }
    }

    /// One uniform draw in `[0, 1)` from this sequence's generator, for sampling on a
    /// device (the same stream the host sampler draws from, so seeds stay per request).
    pub fn next_uniform(&mut self) -> f64 {
        uniform(&mut self.rng)
    }

    /// Records a token the sequence accepted, for the penalties. Kept apart from
    /// [`sample`](Self::sample) so that a draft token that is later rejected (speculative
    /// decoding) leaves no trace.
    pub fn record(&mut self, token: u32) {
        self.seen.entry(token).or_default().generated += 1;
    }

    /// Samples the next token from one row of logits, using `logits` as scratch space.
    /// NaN logits count as impossible and +inf ones as the largest finite value; a row
    /// with no possible token yields token 0.
    pub fn sample(&mut self, params: &SamplingParams, logits: &mut [f32]) -> Sampled {
        SCRATCH.with_borrow_mut(|scratch| self.sample_with(scratch, params, logits))
    }

    fn sample_with(
        &mut self,
        scratch: &mut Scratch,
        params: &SamplingParams,
        logits: &mut [f32],
    ) -> Sampled {
        if logits.is_empty() {
            debug_assert!(false, "sample() needs at least one logit");
            return Sampled {
                token: 0,
                logprob: f32::NEG_INFINITY,
                top_logprobs: Vec::new(),
            };
        }
        let mut max = sanitize_and_max(logits);
        let raw = params.logprobs.map(|n| {
            scratch.raw.clear();
            scratch.raw.extend_from_slice(logits);
            LogSoftmax::new(logits, max, n as usize)
        });
        if self.apply_penalties(params, logits) {
            max = max_of(logits);
        }
        let token = if params.is_greedy() {
            // The first maximum: the lowest id wins ties.
            logits.iter().position(|&x| x == max).unwrap_or(0) as u32
        } else {
            self.draw(scratch, params, logits, max)
        };
        match raw {
            Some(ls) => Sampled {
                token,
                logprob: ls.logprob(scratch.raw[token as usize]),
                top_logprobs: ls.top,
            },
            None => Sampled {
                token,
                logprob: f32::NAN,
                top_logprobs: Vec::new(),
            },
        }
    }

    /// Applies the penalties in place; false if none is on.
    fn apply_penalties(&self, params: &SamplingParams, logits: &mut [f32]) -> bool {
        let rep = params.repetition_penalty;
        let (presence, frequency) = (params.presence_penalty, params.frequency_penalty);
        if rep == 1.0 && presence == 0.0 && frequency == 0.0 {
            return false;
        }
        for (&token, seen) in &self.seen {
            let Some(x) = logits.get_mut(token as usize) else {
                continue;
            };
            if rep != 1.0 {
                *x = if *x > 0.0 { *x / rep } else { *x * rep };
            }
            if seen.generated > 0 {
                *x -= presence + frequency * seen.generated as f32;
            }
            *x = sanitize(*x);
        }
        true
    }

    /// Draws from the tempered, filtered distribution by inverse CDF; `max` is the largest
    /// logit.
    fn draw(
        &mut self,
        scratch: &mut Scratch,
        params: &SamplingParams,
        logits: &mut [f32],
        max: f32,
    ) -> u32 {
        if max == f32::NEG_INFINITY {
            return 0;
        }
        let kth = scratch.top_k_threshold(params.top_k as usize, logits);
        // Weights relative to the most likely token, whose weight is exactly 1, so min_p
        // compares against the weight itself.
        let inv_t = 1.0 / params.temperature;
        let min_w = params.min_p;
        for x in logits.iter_mut() {
            *x = weight(*x, max, inv_t, kth, min_w);
        }
        let total = sum_chunks(logits, &mut scratch.chunk_sums);
        if params.top_p < 1.0 {
            return self.draw_top_p(scratch, params.top_p as f64 * total, logits, total);
        }
        let target = uniform(&mut self.rng) * total;
        pick(logits, &scratch.chunk_sums, target)
    }

    /// Draws from the nucleus: the most likely tokens whose weight reaches `nucleus_mass`,
    /// ties with the last one included. A token belongs to it exactly when the tokens more
    /// likely than it weigh less than `nucleus_mass`, so this draws from what is left,
    /// keeps the token if it passes that test, and otherwise drops it and everything as
    /// unlikely (none of which can be in the nucleus) and draws again. Accepted draws are
    /// distributed exactly as draws from the renormalised nucleus; each round is two
    /// vectorised passes, and the rounds shrink what is left like quickselect's do. A
    /// sort of the nucleus candidates bounds the unlucky case.
    fn draw_top_p(
        &mut self,
        scratch: &mut Scratch,
        nucleus_mass: f64,
        weights: &mut [f32],
        total: f64,
    ) -> u32 {
        const MAX_ROUNDS: usize = 16;
        let mut total = total;
        for _ in 0..MAX_ROUNDS {
            let target = uniform(&mut self.rng) * total;
            let token = pick(weights, &scratch.chunk_sums, target);
            let pivot = weights[token as usize];
            if mass_above(weights, pivot) < nucleus_mass {
                return token;
            }
            for w in weights.iter_mut() {
                if *w <= pivot {
                    *w = 0.0;
                }
            }
            total = sum_chunks(weights, &mut scratch.chunk_sums);
        }
        scratch.cut_to_nucleus(nucleus_mass, weights);
        let total = sum_chunks(weights, &mut scratch.chunk_sums);
        let target = uniform(&mut self.rng) * total;
        pick(weights, &scratch.chunk_sums, target)
    }
}

impl Scratch {
    /// Zeroes the weights outside the nucleus by sorting the candidates.
    fn cut_to_nucleus(&mut self, nucleus_mass: f64, weights: &mut [f32]) {
        let candidates = &mut self.candidates;
        candidates.clear();
        candidates.extend(
            weights
                .iter()
                .enumerate()
                .filter(|(_, &w)| w > 0.0)
                .map(|(i, &w)| (w, i as u32)),
        );
        candidates.sort_unstable_by(|a, b| b.0.total_cmp(&a.0));
        let mut cum = 0.0;
        let mut cutoff = candidates.last().map_or(0.0, |c| c.0);
        for &(w, _) in candidates.iter() {
            cum += w as f64;
            if cum >= nucleus_mass {
                cutoff = w;
                break;
            }
        }
        for w in weights.iter_mut() {
            if *w < cutoff {
                *w = 0.0;
            }
        }
    }

    /// The `k`-th largest logit, or -inf when `top_k` is off or keeps everything.
    fn top_k_threshold(&mut self, k: usize, logits: &[f32]) -> f32 {
        // A selection over a copy of the row costs O(vocab) whatever k is; the heap's
        // O(log k) replacements, rare after the first few thousand tokens, win for the
        // small k that requests use.
        const HEAP_MAX_K: usize = 2048;
        if k == 0 || k >= logits.len() {
            return f32::NEG_INFINITY;
        }
        if k > HEAP_MAX_K {
            let select = &mut self.select;
            select.clear();
            select.extend_from_slice(logits);
            let (_, kth, _) = select.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
            return *kth;
        }
        let heap = &mut self.heap;
        heap.clear();
        heap.extend(logits[..k].iter().map(|&x| Reverse(TotalF32(x))));
        let smallest = |heap: &BinaryHeap<Reverse<TotalF32>>| {
            heap.peek().map_or(f32::NEG_INFINITY, |r| r.0 .0)
        };
        let start = smallest(heap);
        scan_above(&logits[k..], start, |_, x| {
            if let Some(mut top) = heap.peek_mut() {
                *top = Reverse(TotalF32(x));
            }
            smallest(heap)
        })
    }
}

/// The raw distribution's normaliser and its most likely tokens.
struct LogSoftmax {
    max: f32,
    ln_sum: f32,
    top: Vec<(u32, f32)>,
}

impl LogSoftmax {
    fn new(logits: &[f32], max: f32, n: usize) -> Self {
        let mut sum = 0f64;
        if max > f32::NEG_INFINITY {
            for chunk in logits.chunks(CHUNK) {
                sum += lane_sum(chunk, |x| exp_nonpositive(x - max)) as f64;
            }
        }
        let mut ls = LogSoftmax {
            max,
            ln_sum: sum.ln() as f32,
            top: Vec::new(),
        };
        ls.top = top_n(logits, n.min(logits.len()))
            .into_iter()
            .map(|(t, x)| (t, ls.logprob(x)))
            .collect();
        ls
    }

    fn logprob(&self, x: f32) -> f32 {
        if self.max == f32::NEG_INFINITY {
            return f32::NEG_INFINITY;
        }
        (x - self.max) - self.ln_sum
    }
}

/// The `n` largest logits with their ids, largest first, lowest id first on ties.
fn top_n(logits: &[f32], n: usize) -> Vec<(u32, f32)> {
    if n == 0 {
        return Vec::new();
    }
    let mut top: Vec<(u32, f32)> = logits[..n]
        .iter()
        .enumerate()
        .map(|(i, &x)| (i as u32, x))
        .collect();
    // Stable: equal values keep id order.
    top.sort_by(|a, b| b.1.total_cmp(&a.1));
    let smallest = top[n - 1].1;
    // Strictly above the smallest kept: on ties the earlier (lower) id stays.
    scan_above(&logits[n..], smallest, |i, x| {
        let pos = top.partition_point(|e| e.1 >= x);
        top.insert(pos, ((n + i) as u32, x));
        top.truncate(n);
        top[n - 1].1
    });
    top
}

/// Calls `f(index, x)` for each `x` above a threshold, in order; `f` returns the new
/// threshold, which never decreases. Checks [`LANES`] values at a time, branch-free, so
/// a scan that rarely finds anything runs at vector speed. Returns the final threshold.
fn scan_above(xs: &[f32], mut threshold: f32, mut f: impl FnMut(usize, f32) -> f32) -> f32 {
    let mut lanes = xs.chunks_exact(LANES);
    let mut base = 0;
    for lane in &mut lanes {
        if lane.iter().fold(false, |any, &x| any | (x > threshold)) {
            for (j, &x) in lane.iter().enumerate() {
                if x > threshold {
                    threshold = f(base + j, x);
                }
            }
        }
        base += LANES;
    }
    for (j, &x) in lanes.remainder().iter().enumerate() {
        if x > threshold {
            threshold = f(base + j, x);
        }
    }
    threshold
}

/// NaN is impossible; +inf is clamped so that subtracting the maximum stays defined.
#[inline(always)]
fn sanitize(x: f32) -> f32 {
    if x.is_nan() {
        f32::NEG_INFINITY
    } else {
        x.min(f32::MAX)
    }
}

/// Sanitises every logit in place and returns the largest.
fn sanitize_and_max(xs: &mut [f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut lanes = xs.chunks_exact_mut(LANES);
    for lane in &mut lanes {
        for (a, x) in acc.iter_mut().zip(lane) {
            *x = sanitize(*x);
            *a = if *x > *a { *x } else { *a };
        }
    }
    let mut max = f32::NEG_INFINITY;
    for x in lanes.into_remainder() {
        *x = sanitize(*x);
        max = if *x > max { *x } else { max };
    }
    acc.iter().fold(max, |m, &a| if a > m { a } else { m })
}

/// The largest of sanitised values (no NaN).
fn max_of(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut lanes = xs.chunks_exact(LANES);
    for lane in &mut lanes {
        for (a, &x) in acc.iter_mut().zip(lane) {
            *a = if x > *a { x } else { *a };
        }
    }
    let max = lanes
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m });
    acc.iter().fold(max, |m, &a| if a > m { a } else { m })
}

#[inline(always)]
fn weight(x: f32, max: f32, inv_t: f32, kth: f32, min_w: f32) -> f32 {
    let w = exp_nonpositive((x - max) * inv_t);
    if x >= kth && w >= min_w {
        w
    } else {
        0.0
    }
}

/// Total weight strictly above `pivot`.
fn mass_above(weights: &[f32], pivot: f32) -> f64 {
    weights
        .chunks(CHUNK)
        .map(|c| lane_sum(c, |w| if w > pivot { w } else { 0.0 }) as f64)
        .sum()
}

/// Sums `weights` per [`CHUNK`] into `chunk_sums` and returns the total.
fn sum_chunks(weights: &[f32], chunk_sums: &mut Vec<f32>) -> f64 {
    chunk_sums.clear();
    let mut total = 0f64;
    for chunk in weights.chunks(CHUNK) {
        let s = lane_sum(chunk, |w| w);
        chunk_sums.push(s);
        total += s as f64;
    }
    total
}

/// Sum of `f` over `xs` in [`LANES`] independent accumulators.
#[inline(always)]
fn lane_sum(xs: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; LANES];
    let mut lanes = xs.chunks_exact(LANES);
    for lane in &mut lanes {
        for (a, &x) in acc.iter_mut().zip(lane) {
            *a += f(x);
        }
    }
    let rest: f32 = lanes.remainder().iter().map(|&x| f(x)).sum();
    acc.iter().sum::<f32>() + rest
}

/// The token where the cumulative weight first exceeds `target`. Rounding can leave the
/// walk short of `target` by an ulp; it then settles on the last token with weight.
fn pick(weights: &[f32], chunk_sums: &[f32], target: f64) -> u32 {
    let mut cum = 0f64;
    let mut chosen = None;
    for (c, &s) in chunk_sums.iter().enumerate() {
        if s > 0.0 {
            chosen = Some((c, cum));
            if cum + s as f64 > target {
                break;
            }
        }
        cum += s as f64;
    }
    let Some((c, before)) = chosen else {
        return 0;
    };
    let start = c * CHUNK;
    let chunk = &weights[start..(start + CHUNK).min(weights.len())];
    let mut cum = before;
    let mut last = 0;
    for (j, &w) in chunk.iter().enumerate() {
        if w > 0.0 {
            cum += w as f64;
            last = j;
            if cum > target {
                break;
            }
        }
    }
    (start + last) as u32
}

/// Uniform in [0, 1) from the top 53 bits.
fn uniform(rng: &mut ChaCha8Rng) -> f64 {
    (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// `exp(x)` for `x <= 0` (including -inf), within 2 ulp of `f32::exp`, written so that
/// the compiler can vectorise it: libm's `expf` is a call per element and would dominate
/// the sampler at vocabulary sizes of 128k. Results below 2^-126 flush to 0, harmless
/// for weights relative to a maximum of 1. Cephes' range reduction and polynomial.
#[inline(always)]
fn exp_nonpositive(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so that n * LN2_HI is exact.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding 1.5 * 2^23 rounds to an integer held in the low mantissa bits, which gives
    // both the rounded float and the integer without a libm call or a float-to-int cast.
    const ROUND: f32 = 12_582_912.0;
    let clamped = x.max(-87.0);
    let shifted = clamped * LOG2E + ROUND;
    let n = shifted - ROUND;
    let n_int = shifted.to_bits() as i32 - ROUND.to_bits() as i32;
    let r = clamped - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    let scale = f32::from_bits(((n_int + 127) << 23) as u32);
    // A mask rather than a branch, which would keep the loop from vectorising.
    let keep = ((x >= -87.0) as u32).wrapping_neg();
    f32::from_bits((e * scale).to_bits() & keep)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32) -> SamplingParams {
        SamplingParams {
            temperature,
            seed: Some(7),
            ..SamplingParams::default()
        }
    }

    fn sample(p: &SamplingParams, logits: &[f32]) -> Sampled {
        SamplerState::new(p, &[]).sample(p, &mut logits.to_vec())
    }

    /// Draw frequencies over `n` samples from one state.
    fn frequencies(p: &SamplingParams, logits: &[f32], n: usize) -> Vec<f64> {
        let mut state = SamplerState::new(p, &[]);
        let mut counts = vec![0usize; logits.len()];
        for _ in 0..n {
            counts[state.sample(p, &mut logits.to_vec()).token as usize] += 1;
        }
        counts.iter().map(|&c| c as f64 / n as f64).collect()
    }

    /// Pearson's chi-square statistic of observed frequencies against `expected`.
    fn chi_square(freq: &[f64], expected: &[f64], n: usize) -> f64 {
        freq.iter()
            .zip(expected)
            .map(|(&f, &e)| {
                assert!(e > 0.0 || f == 0.0, "sampled an impossible token");
                if e > 0.0 {
                    n as f64 * (f - e).powi(2) / e
                } else {
                    0.0
                }
            })
            .sum()
    }

    fn ln(ps: &[f64]) -> Vec<f32> {
        ps.iter().map(|p| p.ln() as f32).collect()
    }

    /// A pseudo-random logit row with a long tail, like a language model's.
    fn random_logits(vocab: usize, seed: u64) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..vocab)
            .map(|_| (uniform(&mut rng) as f32 - 0.5) * 20.0)
            .collect()
    }

    const P4: [f64; 4] = [0.5, 0.3, 0.15, 0.05];
    // Chi-square, 3 degrees of freedom, p = 0.001.
    const CHI2_3DF: f64 = 16.27;

    #[test]
    fn greedy_is_argmax_lowest_id_on_ties() {
        let p = params(0.0);
        assert_eq!(sample(&p, &[0.1, 3.0, -1.0, 3.0]).token, 1);
        assert_eq!(sample(&p, &[-5.0, -2.0, -2.0]).token, 1);
        // Tiny temperatures are greedy too.
        assert_eq!(sample(&params(1e-7), &[0.0, 1.0, 1.0]).token, 1);
    }

    #[test]
    fn non_finite_logits_do_not_panic() {
        for p in [params(0.0), params(1.0)] {
            assert_eq!(sample(&p, &[f32::NAN, 1.0, f32::NAN]).token, 1);
            assert_eq!(sample(&p, &[1.0, f32::INFINITY, 5.0]).token, 1);
            assert_eq!(sample(&p, &[f32::NAN, f32::NAN]).token, 0);
            assert_eq!(sample(&p, &[f32::NEG_INFINITY; 3]).token, 0);
        }
        let p = SamplingParams {
            logprobs: Some(2),
            top_p: 0.5,
            ..params(1.0)
        };
        let s = sample(&p, &[f32::INFINITY, f32::INFINITY, f32::NAN]);
        assert!(s.token < 2);
        assert!((s.logprob - 0.5f32.ln()).abs() < 1e-6, "{}", s.logprob);
    }

    #[test]
    fn temperature_shapes_the_distribution() {
        let n = 20_000;
        let freq = frequencies(&params(1.0), &ln(&P4), n);
        let chi = chi_square(&freq, &P4, n);
        assert!(chi < CHI2_3DF, "T=1: chi2 {chi}, freq {freq:?}");

        // T = 2 takes the square root of the probabilities before renormalising.
        let sqrt: Vec<f64> = P4.iter().map(|p| p.sqrt()).collect();
        let z: f64 = sqrt.iter().sum();
        let expected: Vec<f64> = sqrt.iter().map(|s| s / z).collect();
        let freq = frequencies(&params(2.0), &ln(&P4), n);
        let chi = chi_square(&freq, &expected, n);
        assert!(chi < CHI2_3DF, "T=2: chi2 {chi}, freq {freq:?}");
    }

    #[test]
    fn large_vocab_draws_follow_the_softmax() {
        // Many chunks, so the chunked walk is exercised; a few tokens carry most mass.
        let mut logits = vec![-30.0f32; 20_000];
        let hot = [(3usize, 0.4f64), (9_000, 0.35), (19_999, 0.25)];
        for &(i, p) in &hot {
            logits[i] = p.ln() as f32;
        }
        let n = 5_000;
        let freq = frequencies(&params(1.0), &logits, n);
        let obs: Vec<f64> = hot.iter().map(|&(i, _)| freq[i]).collect();
        let exp: Vec<f64> = hot.iter().map(|&(_, p)| p).collect();
        // The cold tail holds ~1e-8 of the mass; ignore it.
        let chi = chi_square(&obs, &exp, n);
        assert!(chi < 13.8, "chi2 {chi}, freq {obs:?}");
    }

    #[test]
    fn top_k_one_and_tiny_top_p_are_greedy() {
        for seed in 0..20 {
            let logits = random_logits(5000, seed);
            let greedy = sample(&params(0.0), &logits).token;
            let k1 = SamplingParams {
                top_k: 1,
                ..params(1.5)
            };
            let p0 = SamplingParams {
                top_p: 1e-6,
                ..params(1.5)
            };
            assert_eq!(sample(&k1, &logits).token, greedy);
            assert_eq!(sample(&p0, &logits).token, greedy);
        }
    }

    #[test]
    fn top_k_keeps_the_k_most_likely_renormalised() {
        let p = SamplingParams {
            top_k: 2,
            ..params(1.0)
        };
        let n = 10_000;
        let freq = frequencies(&p, &ln(&P4), n);
        let chi = chi_square(&freq, &[0.625, 0.375, 0.0, 0.0], n);
        assert!(chi < 10.8, "chi2 {chi}, freq {freq:?}");
    }

    #[test]
    fn top_p_keeps_the_nucleus() {
        // 0.5 < 0.6 <= 0.5 + 0.3: the nucleus is the first two tokens.
        let p = SamplingParams {
            top_p: 0.6,
            ..params(1.0)
        };
        let n = 10_000;
        let freq = frequencies(&p, &ln(&P4), n);
        let chi = chi_square(&freq, &[0.625, 0.375, 0.0, 0.0], n);
        assert!(chi < 10.8, "chi2 {chi}, freq {freq:?}");
        // Over a large vocabulary, every draw lies inside the nucleus.
        let logits = random_logits(50_000, 3);
        let mut probs: Vec<(f64, usize)> = logits
            .iter()
            .enumerate()
            .map(|(i, &x)| ((x as f64).exp(), i))
            .collect();
        let z: f64 = probs.iter().map(|p| p.0).sum();
        probs.sort_by(|a, b| b.0.total_cmp(&a.0));
        let mut cum = 0.0;
        let nucleus: std::collections::HashSet<usize> = probs
            .iter()
            .take_while(|&&(p, _)| {
                let inside = cum < 0.9;
                cum += p / z;
                inside
            })
            .map(|&(_, i)| i)
            .collect();
        let p = SamplingParams {
            top_p: 0.9,
            ..params(1.0)
        };
        let mut state = SamplerState::new(&p, &[]);
        for _ in 0..500 {
            let t = state.sample(&p, &mut logits.clone()).token as usize;
            assert!(nucleus.contains(&t), "token {t} outside the nucleus");
        }
    }

    #[test]
    fn top_p_keeps_ties_with_the_last_token() {
        // Any one token reaches 0.3, and its two equals come along.
        let p = SamplingParams {
            top_p: 0.3,
            ..params(1.0)
        };
        let n = 9_000;
        let freq = frequencies(&p, &[1.0, 1.0, 1.0, 0.0], n);
        let third = 1.0 / 3.0;
        let chi = chi_square(&freq, &[third, third, third, 0.0], n);
        assert!(chi < 13.8, "chi2 {chi}, freq {freq:?}");
    }

    #[test]
    fn sorted_nucleus_fallback_agrees() {
        let mut s = Scratch::default();
        let mut w = vec![0.05, 0.5, 0.15, 0.3, 0.0];
        s.cut_to_nucleus(0.6, &mut w);
        assert_eq!(w, vec![0.0, 0.5, 0.0, 0.3, 0.0]);
        let mut w = vec![0.2, 1.0, 0.2, 0.2];
        s.cut_to_nucleus(1.1, &mut w);
        assert_eq!(w, vec![0.2, 1.0, 0.2, 0.2]);
    }

    #[test]
    fn top_k_threshold_is_the_kth_largest() {
        let mut s = Scratch::default();
        let mut logits = random_logits(6_000, 4);
        // Ties around the cut.
        logits[10] = 9.5;
        logits[20] = 9.5;
        let mut sorted = logits.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        // Both the heap and the selection path.
        for k in [1, 2, 3, 50, 2048, 2049, 5_999] {
            assert_eq!(s.top_k_threshold(k, &logits), sorted[k - 1], "k = {k}");
        }
        assert_eq!(s.top_k_threshold(0, &logits), f32::NEG_INFINITY);
        assert_eq!(s.top_k_threshold(6_000, &logits), f32::NEG_INFINITY);
    }

    #[test]
    fn min_p_drops_unlikely_tokens() {
        // Keeps p >= 0.25 * 0.5: the first three tokens.
        let p = SamplingParams {
            min_p: 0.25,
            ..params(1.0)
        };
        let n = 10_000;
        let freq = frequencies(&p, &ln(&P4), n);
        let expected = [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0];
        let chi = chi_square(&freq, &expected, n);
        assert!(chi < 13.8, "chi2 {chi}, freq {freq:?}");
    }

    #[test]
    fn repetition_penalty_covers_prompt_and_output() {
        let p = SamplingParams {
            repetition_penalty: 1.2,
            ..params(0.0)
        };
        // Token 1 is in the prompt: 2.0 / 1.2 < 1.9.
        let mut s = SamplerState::new(&p, &[1, 5]);
        assert_eq!(s.sample(&p, &mut [1.9, 2.0]).token, 0);
        // Negative logits are multiplied: -1.0 * 1.2 < -1.1.
        assert_eq!(s.sample(&p, &mut [-1.1, -1.0]).token, 0);
        // Generated tokens count too.
        s.record(0);
        assert_eq!(s.sample(&p, &mut [2.0, 1.9, 1.8]).token, 2);
        // Off, the prompt is not even recorded.
        let off = params(0.0);
        let mut s = SamplerState::new(&off, &[1]);
        assert!(s.seen.is_empty());
        assert_eq!(s.sample(&off, &mut [1.9, 2.0]).token, 1);
    }

    #[test]
    fn presence_and_frequency_penalties_cover_output_only() {
        let presence = SamplingParams {
            presence_penalty: 0.5,
            repetition_penalty: 1.0,
            ..params(0.0)
        };
        let mut s = SamplerState::new(&presence, &[0]);
        // Prompt tokens are not penalised.
        assert_eq!(s.sample(&presence, &mut [1.0, 0.8]).token, 0);
        s.record(0);
        assert_eq!(s.sample(&presence, &mut [1.0, 0.8]).token, 1);
        s.record(0);
        // Presence does not grow with the count.
        assert_eq!(s.sample(&presence, &mut [1.0, 0.45]).token, 0);

        let frequency = SamplingParams {
            frequency_penalty: 0.3,
            ..params(0.0)
        };
        let mut s = SamplerState::new(&frequency, &[]);
        s.record(0);
        assert_eq!(s.sample(&frequency, &mut [1.0, 0.65]).token, 0);
        s.record(0);
        assert_eq!(s.sample(&frequency, &mut [1.0, 0.65]).token, 1);
        // Negative values encourage repetition.
        let encourage = SamplingParams {
            presence_penalty: -1.0,
            ..params(0.0)
        };
        let mut s = SamplerState::new(&encourage, &[]);
        s.record(1);
        assert_eq!(s.sample(&encourage, &mut [1.0, 0.5]).token, 1);
        // Ids beyond the row are ignored.
        s.record(99);
        assert_eq!(s.sample(&encourage, &mut [1.0, 0.5]).token, 1);
    }

    #[test]
    fn same_seed_same_tokens() {
        let logits = random_logits(32_000, 1);
        let run = |seed: u64| {
            let p = SamplingParams {
                seed: Some(seed),
                top_p: 0.95,
                temperature: 0.8,
                ..SamplingParams::default()
            };
            let mut s = SamplerState::new(&p, &[]);
            (0..50)
                .map(|_| s.sample(&p, &mut logits.clone()).token)
                .collect::<Vec<_>>()
        };
        assert_eq!(run(42), run(42));
        assert_ne!(run(42), run(43));
    }

    #[test]
    fn logprobs_are_the_raw_log_softmax() {
        let logits = [2.0f32, 1.0, 3.0, 3.0, -1.0];
        let z: f64 = logits.iter().map(|&x| (x as f64).exp()).sum();
        let want = |i: usize| ((logits[i] as f64).exp() / z).ln() as f32;
        let p = SamplingParams {
            logprobs: Some(5),
            temperature: 0.0,
            presence_penalty: 2.0,
            ..params(0.0)
        };
        let mut s = SamplerState::new(&p, &[]);
        s.record(2);
        let out = s.sample(&p, &mut logits.to_vec());
        // The penalty moves the choice but not the reported logprob.
        assert_eq!(out.token, 3);
        assert!((out.logprob - want(3)).abs() < 1e-5);
        let ids: Vec<u32> = out.top_logprobs.iter().map(|t| t.0).collect();
        assert_eq!(ids, vec![2, 3, 0, 1, 4]);
        for &(t, lp) in &out.top_logprobs {
            assert!((lp - want(t as usize)).abs() < 1e-5, "token {t}: {lp}");
        }
        let total: f64 = out.top_logprobs.iter().map(|t| (t.1 as f64).exp()).sum();
        assert!((total - 1.0).abs() < 1e-5, "{total}");

        // n = 0 still reports the sampled token; temperature does not change logprobs.
        let p = SamplingParams {
            logprobs: Some(0),
            ..params(5.0)
        };
        let out = sample(&p, &logits);
        assert!(out.top_logprobs.is_empty());
        assert!((out.logprob - want(out.token as usize)).abs() < 1e-5);
        // Not asked: nothing computed.
        let out = sample(&params(1.0), &logits);
        assert!(out.logprob.is_nan() && out.top_logprobs.is_empty());
    }

    #[test]
    fn top_logprobs_over_a_large_vocab_are_sorted() {
        let logits = random_logits(128_256, 9);
        let p = SamplingParams {
            logprobs: Some(MAX_LOGPROBS),
            ..params(1.0)
        };
        let out = sample(&p, &logits);
        assert_eq!(out.top_logprobs.len(), MAX_LOGPROBS as usize);
        assert!(out.top_logprobs.windows(2).all(|w| w[0].1 >= w[1].1));
        let best = sample(&params(0.0), &logits).token;
        assert_eq!(out.top_logprobs[0].0, best);
        assert!(out.logprob <= out.top_logprobs[0].1);
    }

    #[test]
    fn validate_names_the_field() {
        let bad = [
            (
                SamplingParams {
                    top_p: 1.5,
                    ..Default::default()
                },
                "top_p must be in (0, 1], got 1.5",
            ),
            (
                SamplingParams {
                    top_p: 0.0,
                    ..Default::default()
                },
                "top_p must be in (0, 1], got 0",
            ),
            (
                SamplingParams {
                    temperature: -0.5,
                    ..Default::default()
                },
                "temperature must be finite and >= 0, got -0.5",
            ),
            (
                SamplingParams {
                    temperature: f32::NAN,
                    ..Default::default()
                },
                "temperature must be finite and >= 0, got NaN",
            ),
            (
                SamplingParams {
                    min_p: 1.1,
                    ..Default::default()
                },
                "min_p must be in [0, 1], got 1.1",
            ),
            (
                SamplingParams {
                    presence_penalty: 2.5,
                    ..Default::default()
                },
                "presence_penalty must be in [-2, 2], got 2.5",
            ),
            (
                SamplingParams {
                    frequency_penalty: -3.0,
                    ..Default::default()
                },
                "frequency_penalty must be in [-2, 2], got -3",
            ),
            (
                SamplingParams {
                    repetition_penalty: 0.0,
                    ..Default::default()
                },
                "repetition_penalty must be finite and > 0, got 0",
            ),
            (
                SamplingParams {
                    logprobs: Some(21),
                    ..Default::default()
                },
                "logprobs must be at most 20, got 21",
            ),
        ];
        for (p, msg) in bad {
            let err = p.validate().expect_err(msg);
            assert_eq!(err.to_string(), msg);
            assert!(msg.starts_with(err.field()));
        }
        assert_eq!(SamplingParams::default().validate(), Ok(()));
        let ok = SamplingParams {
            temperature: 0.0,
            top_k: 50,
            top_p: 1.0,
            min_p: 1.0,
            presence_penalty: -2.0,
            frequency_penalty: 2.0,
            repetition_penalty: 0.5,
            seed: Some(1),
            logprobs: Some(20),
        };
        assert_eq!(ok.validate(), Ok(()));
    }

    #[test]
    fn missing_fields_take_defaults() {
        let p: SamplingParams =
            serde_json::from_str(r#"{"temperature": 0.5, "seed": 3}"#).expect("valid JSON");
        assert_eq!(
            p,
            SamplingParams {
                temperature: 0.5,
                seed: Some(3),
                ..SamplingParams::default()
            }
        );
    }

    #[test]
    fn fast_exp_matches_std() {
        let mut x = 0.0f32;
        while x > -87.0 {
            let (got, want) = (exp_nonpositive(x), x.exp());
            assert!(
                (got - want).abs() <= 2.5e-7 * want,
                "exp({x}) = {got}, want {want}"
            );
            x -= 0.001_37;
        }
        assert_eq!(exp_nonpositive(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_nonpositive(-100.0), 0.0);
        assert_eq!(exp_nonpositive(0.0), 1.0);
    }
}
