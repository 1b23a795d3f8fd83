//! Streaming text out of generated tokens. [`IncrementalDetokenizer`] turns token ids, fed
//! one at a time, into text increments. For byte-level tokenizers (see [`TokenBytes`]) it
//! appends each token's bytes and emits the complete UTF-8 characters, holding back an
//! incomplete one. For other tokenizers it uses the prefix-offset / read-offset technique of
//! TGI and vLLM: decode a small window twice (with and without the newest tokens) and emit
//! the difference, holding back while the window ends in an incomplete UTF-8 character
//! (shown by decoders as U+FFFD). [`StopMatcher`] then cuts the stream at stop strings,
//! holding back text that might be the start of one.

use std::sync::Arc;

use crate::token_bytes::TokenBytes;
use crate::tokenizer::{Tokenizer, TokenizerError};

/// Prompt tokens kept as left context so decoders that depend on it (leading-space rules)
/// render the first generated token the way they would inside the full text.
const PROMPT_CONTEXT: usize = 5;

/// Ids older than this many before the read offset are dropped from the window.
const COMPACT_AFTER: usize = 1024;

/// Anything that turns ids into text.
pub trait Decode {
    fn decode_ids(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, TokenizerError>;

    /// Per-token bytes when decoding is their plain concatenation (then
    /// `decode_ids(ids)` is the lossy UTF-8 of the bytes of `ids` back to back).
    fn token_bytes(&self) -> Option<&TokenBytes> {
        None
    }
}

impl Decode for Tokenizer {
    fn decode_ids(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, TokenizerError> {
        self.decode(ids, skip_special_tokens)
    }

    fn token_bytes(&self) -> Option<&TokenBytes> {
        Tokenizer::token_bytes(self)
    }
}

impl<D: Decode + ?Sized> Decode for &D {
    fn decode_ids(&self, ids: &[u32], skip: bool) -> Result<String, TokenizerError> {
        (**self).decode_ids(ids, skip)
    }

    fn token_bytes(&self) -> Option<&TokenBytes> {
        (**self).token_bytes()
    }
}

impl<D: Decode + ?Sized> Decode for Arc<D> {
    fn decode_ids(&self, ids: &[u32], skip: bool) -> Result<String, TokenizerError> {
        (**self).decode_ids(ids, skip)
    }

    fn token_bytes(&self) -> Option<&TokenBytes> {
        (**self).token_bytes()
    }
}

/// Per-sequence detokenizer state.
#[derive(Debug)]
pub struct IncrementalDetokenizer<D> {
    decoder: D,
    skip_special_tokens: bool,
    /// Byte mode (the decoder has [`TokenBytes`]): bytes not emitted yet, at most the
    /// start of one UTF-8 character between calls.
    pending: Vec<u8>,
    /// Window mode: the ids; everything before `prefix_offset` has been dropped or is
    /// irrelevant.
    ids: Vec<u32>,
    /// Start of the decoding window.
    prefix_offset: usize,
    /// End of what has been emitted.
    read_offset: usize,
    /// `decode(ids[prefix_offset..read_offset])`, cached between steps.
    prefix_text: Option<String>,
}

impl<D: Decode> IncrementalDetokenizer<D> {
    pub fn new(decoder: D, skip_special_tokens: bool) -> Self {
        Self::with_prompt(decoder, &[], skip_special_tokens)
    }

    /// Starts after `prompt`, using its last few tokens as context (they are not emitted).
    pub fn with_prompt(decoder: D, prompt: &[u32], skip_special_tokens: bool) -> Self {
        // Byte-level decoding needs no left context.
        let context = match decoder.token_bytes() {
            Some(_) => &[],
            None => &prompt[prompt.len().saturating_sub(PROMPT_CONTEXT)..],
        };
        IncrementalDetokenizer {
            decoder,
            skip_special_tokens,
            pending: Vec::new(),
            ids: context.to_vec(),
            prefix_offset: 0,
            read_offset: context.len(),
            prefix_text: None,
        }
    }

    /// Adds one token; returns the text it completes (possibly empty).
    pub fn push(&mut self, id: u32) -> Result<String, TokenizerError> {
        if let Some(table) = self.decoder.token_bytes() {
            self.pending
                .extend_from_slice(table.get(id, self.skip_special_tokens));
            return Ok(self.emit_bytes(false));
        }
        self.ids.push(id);
        self.emit(false)
    }

    /// Flushes whatever is held back (an incomplete character comes out as U+FFFD).
    pub fn finish(&mut self) -> Result<String, TokenizerError> {
        if self.decoder.token_bytes().is_some() {
            return Ok(self.emit_bytes(true));
        }
        self.emit(true)
    }

    /// The complete characters of `pending`, as `String::from_utf8_lossy` would render
    /// them (one U+FFFD per invalid sequence); an incomplete character at the end is kept
    /// for the next token unless `force`.
    fn emit_bytes(&mut self, force: bool) -> String {
        let mut out = String::new();
        let mut rest = self.pending.as_slice();
        loop {
            match std::str::from_utf8(rest) {
                Ok(s) => {
                    out.push_str(s);
                    rest = &[];
                    break;
                }
                Err(e) => {
                    let (valid, tail) = rest.split_at(e.valid_up_to());
                    // `valid_up_to` marks the end of a valid prefix.
                    out.push_str(std::str::from_utf8(valid).unwrap_or_default());
                    match e.error_len() {
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            rest = &tail[bad..];
                        }
                        None if force => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            rest = &[];
                            break;
                        }
                        None => {
                            rest = tail;
                            break;
                        }
                    }
                }
            }
        }
        let keep = rest.len();
        let len = self.pending.len();
        self.pending.copy_within(len - keep.., 0);
        self.pending.truncate(keep);
        out
    }

    fn emit(&mut self, force: bool) -> Result<String, TokenizerError> {
        let prefix_text = match self.prefix_text.take() {
            Some(t) => t,
            None => self.decode(self.prefix_offset, self.read_offset)?,
        };
        let full = self.decode(self.prefix_offset, self.ids.len())?;
        let complete = !full.ends_with('\u{FFFD}');
        if full.len() <= prefix_text.len() || !(complete || force) {
            self.prefix_text = Some(prefix_text);
            return Ok(String::new());
        }
        let new_text = match full.get(prefix_text.len()..) {
            Some(tail) if full.starts_with(&prefix_text) => tail.to_string(),
            // A decoder whose output is not prefix-stable (e.g. one that cleans up spaces):
            // emit from where the two texts diverge.
            _ => {
                let common = full
                    .char_indices()
                    .zip(prefix_text.chars())
                    .find(|((_, a), b)| a != b)
                    .map_or(prefix_text.len().min(full.len()), |((i, _), _)| i);
                full[common..].to_string()
            }
        };
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        self.compact();
        Ok(new_text)
    }

    fn decode(&self, from: usize, to: usize) -> Result<String, TokenizerError> {
        if from >= to {
            return Ok(String::new());
        }
        self.decoder
            .decode_ids(&self.ids[from..to], self.skip_special_tokens)
    }

    fn compact(&mut self) {
        if self.prefix_offset > COMPACT_AFTER {
            self.ids.drain(..self.prefix_offset);
            self.read_offset -= self.prefix_offset;
            self.prefix_offset = 0;
        }
    }
}

/// Result of feeding text to a [`StopMatcher`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StopOutput {
    /// Text that can be sent to the client now.
    pub text: String,
    /// Index (into the matcher's stop list) of the stop string that ended the stream.
    pub stopped: Option<usize>,
}

/// Cuts a text stream at the first occurrence of any stop string. The stop string itself
/// is not emitted (unless asked), and text that could be the beginning of a stop string is
/// held back until the next increment settles it.
#[derive(Clone, Debug)]
pub struct StopMatcher {
    stops: Vec<String>,
    include_stop: bool,
    pending: String,
    done: bool,
}

impl StopMatcher {
    /// Empty stop strings are ignored (they would match before any text).
    pub fn new(stops: impl IntoIterator<Item = impl Into<String>>) -> Self {
        StopMatcher {
            stops: stops.into_iter().map(Into::into).collect(),
            include_stop: false,
            pending: String::new(),
            done: false,
        }
    }

    /// Emit the matched stop string too (vLLM's `include_stop_str_in_output`).
    pub fn include_stop_in_output(mut self, yes: bool) -> Self {
        self.include_stop = yes;
        self
    }

    pub fn is_stopped(&self) -> bool {
        self.done
    }

    /// Feeds the next text increment. After a stop, everything is swallowed.
    pub fn push(&mut self, text: &str) -> StopOutput {
        if self.done {
            return StopOutput::default();
        }
        self.pending.push_str(text);
        let earliest = self
            .stops
            .iter()
            .enumerate()
            .filter(|(_, s)| !s.is_empty())
            .filter_map(|(i, s)| self.pending.find(s.as_str()).map(|at| (at, i)))
            .min();
        if let Some((at, i)) = earliest {
            let end = if self.include_stop {
                at + self.stops[i].len()
            } else {
                at
            };
            self.pending.truncate(end);
            self.done = true;
            return StopOutput {
                text: std::mem::take(&mut self.pending),
                stopped: Some(i),
            };
        }
        let hold = self.partial_match_start();
        let rest = self.pending.split_off(hold);
        StopOutput {
            text: std::mem::replace(&mut self.pending, rest),
            stopped: None,
        }
    }

    /// Releases held-back text when the stream ends for another reason.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }

    /// Start of the longest suffix of `pending` that is a proper prefix of a stop string.
    fn partial_match_start(&self) -> usize {
        let longest = self.stops.iter().map(String::len).max().unwrap_or(0);
        let earliest = self.pending.len().saturating_sub(longest.saturating_sub(1));
        self.pending
            .char_indices()
            .map(|(i, _)| i)
            .filter(|&i| i >= earliest)
            .find(|&i| {
                let tail = &self.pending[i..];
                self.stops
                    .iter()
                    .any(|s| s.len() > tail.len() && s.starts_with(tail))
            })
            .unwrap_or(self.pending.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each id is one byte (ids >= 256 are specials rendering as `<N>`), decoded lossily
    /// the way byte-level decoders do it.
    struct Bytes;

    impl Decode for Bytes {
        fn decode_ids(&self, ids: &[u32], skip: bool) -> Result<String, TokenizerError> {
            let mut out = Vec::new();
            for &id in ids {
                match u8::try_from(id) {
                    Ok(b) => out.push(b),
                    Err(_) if skip => {}
                    Err(_) => out.extend(format!("<{id}>").bytes()),
                }
            }
            Ok(String::from_utf8_lossy(&out).into_owned())
        }
    }

    fn ids(s: &str) -> Vec<u32> {
        s.bytes().map(u32::from).collect()
    }

    fn stream(d: &mut IncrementalDetokenizer<Bytes>, ids: &[u32]) -> Vec<String> {
        let mut parts: Vec<String> = ids.iter().map(|&i| d.push(i).unwrap()).collect();
        parts.push(d.finish().unwrap());
        parts
    }

    #[test]
    fn multibyte_characters_are_never_split() {
        let text = "a é 日本 🚀!";
        let mut d = IncrementalDetokenizer::new(Bytes, false);
        let parts = stream(&mut d, &ids(text));
        assert_eq!(parts.concat(), text);
        assert!(parts.iter().all(|p| !p.contains('\u{FFFD}')));
        // The rocket's four bytes come out as one increment, on its last byte.
        let rocket = parts.iter().position(|p| p == "🚀").unwrap();
        assert!(parts[rocket - 3..rocket].iter().all(String::is_empty));
    }

    #[test]
    fn prompt_context_is_not_emitted() {
        let prompt = ids("The prompt é");
        let mut d = IncrementalDetokenizer::with_prompt(Bytes, &prompt, false);
        assert_eq!(stream(&mut d, &ids(" and more")).concat(), " and more");
    }

    #[test]
    fn special_tokens_can_be_skipped() {
        let mut d = IncrementalDetokenizer::new(Bytes, true);
        let mut input = ids("hi");
        input.push(300);
        input.extend(ids("!"));
        assert_eq!(stream(&mut d, &input).concat(), "hi!");
        let mut d = IncrementalDetokenizer::new(Bytes, false);
        assert_eq!(stream(&mut d, &input).concat(), "hi<300>!");
    }

    #[test]
    fn finish_flushes_an_incomplete_character() {
        let mut d = IncrementalDetokenizer::new(Bytes, false);
        let bytes = "é".as_bytes();
        assert_eq!(d.push(u32::from(bytes[0])).unwrap(), "");
        assert_eq!(d.finish().unwrap(), "\u{FFFD}");
        assert_eq!(d.finish().unwrap(), "");
    }

    #[test]
    fn long_streams_compact_and_stay_correct() {
        let text = "ü".repeat(3000);
        let mut d = IncrementalDetokenizer::new(Bytes, false);
        assert_eq!(stream(&mut d, &ids(&text)).concat(), text);
        assert!(d.ids.len() < 2 * COMPACT_AFTER);
    }

    fn run_stops(stops: &[&str], pieces: &[&str]) -> (String, Option<usize>) {
        let mut m = StopMatcher::new(stops.iter().copied());
        let mut out = String::new();
        for p in pieces {
            let o = m.push(p);
            out.push_str(&o.text);
            if o.stopped.is_some() {
                return (out, o.stopped);
            }
        }
        out.push_str(&m.finish());
        (out, None)
    }

    #[test]
    fn stop_string_spanning_increments() {
        assert_eq!(
            run_stops(&["STOP"], &["Hello S", "T", "OP world"]),
            ("Hello ".to_string(), Some(0))
        );
        // A false start is released once it stops matching.
        let mut m = StopMatcher::new(["STOP"]);
        assert_eq!(m.push("a ST").text, "a ");
        assert_eq!(m.push("ART").text, "START");
    }

    #[test]
    fn earliest_stop_wins_and_multibyte_is_respected() {
        assert_eq!(
            run_stops(&["world", "lo w"], &["hello world"]),
            ("hel".to_string(), Some(1))
        );
        // A stop made of a multi-byte character held across increments.
        assert_eq!(
            run_stops(&["éé"], &["caf", "é", "é!"]),
            ("caf".to_string(), Some(0))
        );
        assert_eq!(
            run_stops(&["éé"], &["café", " ok"]),
            ("café ok".into(), None)
        );
    }

    #[test]
    fn include_stop_and_after_stop() {
        let mut m = StopMatcher::new(["</s>"]).include_stop_in_output(true);
        assert_eq!(m.push("ok</").text, "ok");
        let o = m.push("s>tail");
        assert_eq!(
            o,
            StopOutput {
                text: "</s>".into(),
                stopped: Some(0)
            }
        );
        assert!(m.is_stopped());
        assert_eq!(m.push("more"), StopOutput::default());
    }

    #[test]
    fn empty_and_no_stops_pass_through() {
        assert_eq!(run_stops(&[""], &["a", "b"]), ("ab".into(), None));
        assert_eq!(run_stops(&[], &["a", "b"]), ("ab".into(), None));
    }

    #[test]
    fn detokenizer_and_stop_matcher_compose() {
        // "日" is three byte tokens; the stop is "本" which spans tokens of the next char.
        let mut d = IncrementalDetokenizer::new(Bytes, false);
        let mut m = StopMatcher::new(["本"]);
        let mut out = String::new();
        let mut stopped = None;
        for id in ids("日本語") {
            let o = m.push(&d.push(id).unwrap());
            out.push_str(&o.text);
            if o.stopped.is_some() {
                stopped = o.stopped;
                break;
            }
        }
        assert_eq!((out.as_str(), stopped), ("日", Some(0)));
    }
}
