//! Server-sent events for streaming responses: one `data: {json}` event per update,
//! `data: [DONE]` at the end, an optional usage chunk before it.
//!
//! This is the per-token path, so it avoids per-token allocation where it can: the JSON
//! around the text (id, object, created, model) is rendered once per request and copied in;
//! text is escaped straight into one growing buffer; updates that are already waiting are
//! written into the same frame, so a slow client costs fewer, larger writes rather than
//! more syscalls. The body stream owns the [`Generation`]: when hyper drops the body because
//! the client disconnected, the engine sequences are aborted.

use std::convert::Infallible;
use std::io::Write;

use axum::body::Body;
use axum::http::{header, StatusCode};
use axum::response::Response;
use bytes::{BufMut, Bytes, BytesMut};
use futures_util::FutureExt;
use serde::Serialize;

use crate::error::ApiError;
use crate::openai::{ChatTokenLogprob, ChatTopLogprob, CompletionLogprobs, Usage};
use crate::pipeline::{token_text, Endpoint, Generation, TokenLogprob, Update};

/// Frame size above which pending updates stop being batched into one write.
const MAX_FRAME: usize = 64 << 10;

/// Renders chunks for one streamed response.
pub(crate) struct ChunkWriter {
    endpoint: Endpoint,
    /// `data: {"id":..,"object":..,"created":..,"model":..` — the start of every chunk.
    head: Vec<u8>,
    buf: BytesMut,
}

impl ChunkWriter {
    pub fn new(endpoint: Endpoint, id: &str, created: u64, model: &str) -> Self {
        let object = match endpoint {
            Endpoint::Chat => "chat.completion.chunk",
            Endpoint::Completion => "text_completion",
        };
        let mut head = Vec::with_capacity(128);
        head.extend_from_slice(b"data: {\"id\":");
        json_into(&mut head, id);
        let _ = write!(
            head,
            ",\"object\":\"{object}\",\"created\":{created},\"model\":"
        );
        json_into(&mut head, model);
        ChunkWriter {
            endpoint,
            head,
            buf: BytesMut::with_capacity(1024),
        }
    }

    fn start_choice(&mut self, index: usize) {
        self.buf.extend_from_slice(&self.head);
        let _ = write!(
            (&mut self.buf).writer(),
            ",\"choices\":[{{\"index\":{index},"
        );
    }

    fn end_choice(&mut self, finish: Option<&str>) {
        match finish {
            None => self
                .buf
                .extend_from_slice(b",\"finish_reason\":null}]}\n\n"),
            Some(f) => {
                self.buf.extend_from_slice(b",\"finish_reason\":\"");
                self.buf.extend_from_slice(f.as_bytes());
                self.buf.extend_from_slice(b"\"}]}\n\n");
            }
        }
    }

    /// The opening chunk of a chat choice: the assistant role, no text yet.
    pub fn role(&mut self, index: usize) {
        self.start_choice(index);
        self.buf.extend_from_slice(
            b"\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"logprobs\":null",
        );
        self.end_choice(None);
    }

    pub fn update(&mut self, u: &Update, gen: &Generation) {
        self.start_choice(u.choice);
        match self.endpoint {
            Endpoint::Chat => {
                if u.text.is_empty() {
                    self.buf.extend_from_slice(b"\"delta\":{}");
                } else {
                    self.buf.extend_from_slice(b"\"delta\":{\"content\":");
                    json_into(&mut (&mut self.buf).writer(), &u.text);
                    self.buf.put_u8(b'}');
                }
                self.buf.extend_from_slice(b",\"logprobs\":");
                match &u.logprob {
                    None => self.buf.extend_from_slice(b"null"),
                    Some(lp) => {
                        let content = [chat_logprob(gen, lp)];
                        json_into(
                            &mut (&mut self.buf).writer(),
                            &ChatLogprobsRef { content: &content },
                        );
                    }
                }
            }
            Endpoint::Completion => {
                self.buf.extend_from_slice(b"\"text\":");
                json_into(&mut (&mut self.buf).writer(), &u.text);
                self.buf.extend_from_slice(b",\"logprobs\":");
                match &u.logprob {
                    None => self.buf.extend_from_slice(b"null"),
                    Some(lp) => {
                        let mut l = CompletionLogprobs::default();
                        completion_logprob(gen, lp, &mut l);
                        json_into(&mut (&mut self.buf).writer(), &l);
                    }
                }
            }
        }
        self.end_choice(u.finish);
    }

    pub fn usage(&mut self, usage: &Usage) {
        self.buf.extend_from_slice(&self.head);
        self.buf.extend_from_slice(b",\"choices\":[],\"usage\":");
        json_into(&mut (&mut self.buf).writer(), usage);
        self.buf.extend_from_slice(b"}\n\n");
    }

    pub fn error(&mut self, e: &ApiError) {
        self.buf.extend_from_slice(b"data: ");
        json_into(&mut (&mut self.buf).writer(), &e.body());
        self.buf.extend_from_slice(b"\n\n");
    }

    pub fn done(&mut self) {
        self.buf.extend_from_slice(b"data: [DONE]\n\n");
    }

    fn take(&mut self) -> Bytes {
        self.buf.split().freeze()
    }

    fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
}

#[derive(Serialize)]
struct ChatLogprobsRef<'a> {
    content: &'a [ChatTokenLogprob],
}

/// Serializes into a writer; serializing our own types into memory cannot fail.
fn json_into<W: Write, T: Serialize + ?Sized>(w: W, value: &T) {
    if let Err(e) = serde_json::to_writer(w, value) {
        tracing::error!("serializing a response chunk: {e}");
    }
}

pub(crate) fn chat_logprob(gen: &Generation, lp: &TokenLogprob) -> ChatTokenLogprob {
    let tok = gen.tokenizer();
    let token = token_text(tok, lp.token);
    ChatTokenLogprob {
        bytes: token.as_bytes().to_vec(),
        token,
        logprob: lp.logprob,
        top_logprobs: lp
            .top
            .iter()
            .map(|&(id, logprob)| {
                let token = token_text(tok, id);
                ChatTopLogprob {
                    bytes: token.as_bytes().to_vec(),
                    token,
                    logprob,
                }
            })
            .collect(),
    }
}

pub(crate) fn completion_logprob(
    gen: &Generation,
    lp: &TokenLogprob,
    out: &mut CompletionLogprobs,
) {
    let tok = gen.tokenizer();
    out.tokens.push(token_text(tok, lp.token));
    out.token_logprobs.push(lp.logprob);
    out.top_logprobs.push(
        lp.top
            .iter()
            .map(|&(id, logprob)| (token_text(tok, id), serde_json::Value::from(logprob)))
            .collect(),
    );
    out.text_offset.push(lp.text_offset);
}

enum Phase {
    Start,
    Body,
    Tail,
    Done,
}

struct SseState {
    gen: Generation,
    w: ChunkWriter,
    phase: Phase,
    include_usage: bool,
}

impl SseState {
    async fn next_frame(&mut self) -> Option<Bytes> {
        loop {
            match self.phase {
                Phase::Start => {
                    self.phase = Phase::Body;
                    if self.w.endpoint == Endpoint::Chat {
                        for i in 0..self.gen.num_choices() {
                            self.w.role(i);
                        }
                        return Some(self.w.take());
                    }
                }
                Phase::Body => {
                    let mut next = self.gen.next().await;
                    loop {
                        match next {
                            None => {
                                self.phase = Phase::Tail;
                                break;
                            }
                            Some(Err(e)) => {
                                self.w.error(&e);
                                self.w.done();
                                self.phase = Phase::Done;
                                break;
                            }
                            Some(Ok(u)) => self.w.update(&u, &self.gen),
                        }
                        if self.w.buf.len() >= MAX_FRAME {
                            break;
                        }
                        match self.gen.next().now_or_never() {
                            Some(n) => next = n,
                            None => break,
                        }
                    }
                    if !self.w.is_empty() {
                        return Some(self.w.take());
                    }
                }
                Phase::Tail => {
                    if self.include_usage {
                        let usage = self.gen.usage();
                        self.w.usage(&usage);
                    }
                    self.w.done();
                    self.gen.complete();
                    self.phase = Phase::Done;
                    return Some(self.w.take());
                }
                Phase::Done => return None,
            }
        }
    }
}

/// The streaming response for `gen`.
pub(crate) fn response(gen: Generation, w: ChunkWriter, include_usage: bool) -> Response {
    let state = SseState {
        gen,
        w,
        phase: Phase::Start,
        include_usage,
    };
    let body = futures_util::stream::unfold(state, |mut st| async move {
        let frame = st.next_frame().await?;
        Some((Ok::<Bytes, Infallible>(frame), st))
    });
    let mut resp = Response::new(Body::from_stream(body));
    *resp.status_mut() = StatusCode::OK;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/event-stream"),
    );
    h.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-cache"),
    );
    resp
}
