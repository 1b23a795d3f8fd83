//! Helpers for tests that run the real `switchyard serve` binary: a tiny synthetic model in
//! a temp dir, a server guard that kills its process on drop, and a minimal blocking
//! HTTP/1.1 client (raw sockets, so tests can also send malformed requests and hang up
//! mid-stream).

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_switchyard");

/// Writes the tiny f32 model into `dir`.
pub fn synth_tiny(dir: &Path) {
    let out = Command::new(BIN)
        .args([
            "model", "synth", "--size", "tiny", "--dtype", "f32", "--out",
        ])
        .arg(dir)
        .output()
        .expect("running switchyard model synth");
    assert!(
        out.status.success(),
        "synth failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A running `switchyard serve`; killed (by PID) when dropped.
pub struct Server {
    child: Option<Child>,
    pub addr: String,
    log: Arc<Mutex<Vec<String>>>,
    _dir: tempfile::TempDir,
}

impl Server {
    /// Starts a server on a free port with a fresh tiny model and `extra` flags, and waits
    /// for its ready line.
    pub fn start(extra: &[&str]) -> Server {
        let dir = tempfile::tempdir().expect("temp dir");
        let model = dir.path().join("tiny");
        synth_tiny(&model);
        let mut child = Command::new(BIN)
            .arg("serve")
            .arg("--model")
            .arg(&model)
            .args(["--port", "0", "--kv-cache-mb", "16", "--threads", "1"])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting switchyard serve");
        let stderr = child.stderr.take().expect("piped stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = Arc::clone(&log);
        // Keeps draining stderr after the ready line so the server never blocks on it.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("switchyard ready") {
                    let _ = tx.send(line.clone());
                }
                sink.lock().unwrap().push(line);
            }
        });
        let mut server = Server {
            child: Some(child),
            addr: String::new(),
            log,
            _dir: dir,
        };
        let ready = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(line) => line,
            Err(_) => panic!("no ready line; log:\n{}", server.log()),
        };
        let url = ready
            .split_whitespace()
            .find_map(|w| w.strip_prefix("http://"))
            .expect("the ready line has a URL");
        server.addr = url.trim_end_matches(['/', ',', ')']).to_string();
        server
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Sends SIGTERM and waits (bounded) for the exit status.
    pub fn terminate(&mut self, within: Duration) -> ExitStatus {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .expect("running kill");
        assert!(status.success());
        let child = self.child.as_mut().expect("running");
        let deadline = Instant::now() + within;
        loop {
            if let Some(s) = child.try_wait().expect("waiting for the server") {
                self.child = None;
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "the server did not exit within {within:?}; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn get(&self, path: &str) -> Response {
        request(&self.addr, "GET", path, None)
    }

    pub fn post(&self, path: &str, body: &Value) -> Response {
        request(&self.addr, "POST", path, Some(body.to_string().as_bytes()))
    }

    /// Engine stats from `/admin/stats`.
    pub fn stats(&self) -> Value {
        let r = self.get("/admin/stats");
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()
    }

    /// Waits until the engine holds no sequences and no KV blocks.
    pub fn wait_idle(&self, within: Duration) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let s = self.stats();
            let idle = s["running"] == 0
                && s["waiting"] == 0
                && s["pending"] == 0
                && s["blocks_used"] == 0;
            if idle {
                return s;
            }
            assert!(Instant::now() < deadline, "engine not idle: {s}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The value of an unlabelled sample in `/metrics`.
    pub fn metric(&self, name: &str) -> f64 {
        let text = self.get("/metrics").text();
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no metric {name} in:\n{text}"))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

fn connect(addr: &str) -> TcpStream {
    let s = TcpStream::connect(addr).expect("connecting to the server");
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s
}

fn write_request(s: &mut TcpStream, method: &str, path: &str, body: Option<&[u8]>) {
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n");
    if let Some(b) = body {
        head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).unwrap();
    if let Some(b) = body {
        s.write_all(b).unwrap();
    }
}

/// Reads the status line and headers.
fn read_head(r: &mut impl BufRead) -> (u16, Vec<(String, String)>) {
    let mut line = String::new();
    r.read_line(&mut line).expect("status line");
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {line:?}"));
    let mut headers = Vec::new();
    loop {
        line.clear();
        r.read_line(&mut line).expect("header line");
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    (status, headers)
}

fn is_chunked(headers: &[(String, String)]) -> bool {
    headers.iter().any(|(k, v)| {
        k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
    })
}

/// One request on a fresh connection; the whole response.
pub fn request(addr: &str, method: &str, path: &str, body: Option<&[u8]>) -> Response {
    raw_request(addr, method, path, body)
}

pub fn raw_request(addr: &str, method: &str, path: &str, body: Option<&[u8]>) -> Response {
    let mut s = connect(addr);
    write_request(&mut s, method, path, body);
    let mut r = BufReader::new(s);
    let (status, headers) = read_head(&mut r);
    let mut body = Vec::new();
    if is_chunked(&headers) {
        Chunked::new(r).read_to_end(&mut body).unwrap();
    } else {
        r.read_to_end(&mut body).unwrap();
    }
    Response {
        status,
        headers,
        body,
    }
}

/// Decodes `Transfer-Encoding: chunked`.
pub struct Chunked<R> {
    inner: R,
    left: usize,
    done: bool,
}

impl<R: BufRead> Chunked<R> {
    pub fn new(inner: R) -> Self {
        Chunked {
            inner,
            left: 0,
            done: false,
        }
    }
}

impl<R: BufRead> Read for Chunked<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.done {
            return Ok(0);
        }
        if self.left == 0 {
            let mut line = String::new();
            self.inner.read_line(&mut line)?;
            let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|e| std::io::Error::other(format!("chunk size {line:?}: {e}")))?;
            if size == 0 {
                self.done = true;
                return Ok(0);
            }
            self.left = size;
        }
        let want = buf.len().min(self.left);
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        self.left -= n;
        if self.left == 0 {
            let mut crlf = [0u8; 2];
            self.inner.read_exact(&mut crlf)?;
        }
        Ok(n)
    }
}

/// A streaming (SSE) response being read event by event.
pub struct EventStream {
    pub status: u16,
    reader: BufReader<Chunked<BufReader<TcpStream>>>,
}

impl EventStream {
    pub fn open(addr: &str, path: &str, body: &Value) -> EventStream {
        let mut s = connect(addr);
        write_request(&mut s, "POST", path, Some(body.to_string().as_bytes()));
        let mut r = BufReader::new(s);
        let (status, headers) = read_head(&mut r);
        assert!(
            is_chunked(&headers),
            "status {status}: not a chunked stream"
        );
        EventStream {
            status,
            reader: BufReader::new(Chunked::new(r)),
        }
    }

    /// The next `data:` payload; `None` at the end of the body.
    pub fn next_data(&mut self) -> Option<String> {
        let mut line = String::new();
        loop {
            line.clear();
            if self.reader.read_line(&mut line).ok()? == 0 {
                return None;
            }
            if let Some(d) = line.trim_end().strip_prefix("data: ") {
                return Some(d.to_string());
            }
        }
    }

    /// Every remaining payload up to and including `[DONE]`.
    pub fn collect(mut self) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(d) = self.next_data() {
            let done = d == "[DONE]";
            out.push(d);
            if done {
                break;
            }
        }
        out
    }
}

/// Summary of a streamed completion or chat completion.
#[derive(Debug, Default)]
pub struct Streamed {
    pub text: String,
    pub finish_reason: Option<String>,
    pub usage: Option<Value>,
    pub chunks: usize,
    pub done: bool,
}

pub fn summarize(events: &[String]) -> Streamed {
    let mut s = Streamed::default();
    for e in events {
        if e == "[DONE]" {
            s.done = true;
            continue;
        }
        let v: Value = serde_json::from_str(e).unwrap_or_else(|err| panic!("{err}: {e}"));
        assert!(v.get("error").is_none(), "stream error: {v}");
        s.chunks += 1;
        if !v["usage"].is_null() {
            s.usage = Some(v["usage"].clone());
        }
        for c in v["choices"].as_array().unwrap() {
            if let Some(t) = c["text"].as_str() {
                s.text.push_str(t);
            }
            if let Some(t) = c["delta"]["content"].as_str() {
                s.text.push_str(t);
            }
            if let Some(f) = c["finish_reason"].as_str() {
                s.finish_reason = Some(f.to_string());
            }
        }
    }
    s
}
