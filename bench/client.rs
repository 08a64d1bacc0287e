//! The aipod side of the side-by-side benchmark (`bench/run`): one workload
//! against a running `aipod-runtime`, driven by the aipod client library,
//! printed as one JSON object on stdout. `bench/compare.py` starts the
//! server, runs this per workload, and measures both processes.
//!
//! ```text
//! bench-client file  --target URL --func sha256 --path FILE [--level 1|none] [--upstream NAME]
//! bench-client stream --target URL --func sha256 --bytes N [--level 1]
//! bench-client small --target URL --n 2000 --concurrency 16 [--concurrent-n N] [--payload-bytes 1024]
//! bench-client many  --target URL --n 1000 --seconds 10 [--connections 1]
//! bench-client long  --target URL --seconds 5
//! bench-client relay --target HOST:PORT --listen 127.0.0.1:PORT --rate BYTES_PER_S
//! ```
//!
//! `relay` is a loopback link of limited bandwidth for the adaptive
//! compression runs: it forwards to `--target`, pacing the upload direction
//! to `--rate` bytes per second, until killed.

#![allow(clippy::print_stdout, missing_docs, reason = "a benchmark prints its numbers")]

use std::{
    collections::HashMap,
    io::Write,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use aipod::{Client, client::RetryPolicy, codec::Compression};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, ReadBuf};

const MIB: usize = 1 << 20;

fn flags() -> (String, HashMap<String, String>) {
    let mut it = std::env::args().skip(1);
    let workload = it.next().unwrap_or_default();
    let mut map = HashMap::new();
    while let Some(flag) = it.next() {
        let key = flag.trim_start_matches("--").to_owned();
        let value = it.next().unwrap_or_else(|| panic!("--{key} needs a value"));
        map.insert(key, value);
    }
    (workload, map)
}

fn get<T: std::str::FromStr>(flags: &HashMap<String, String>, key: &str, default: Option<T>) -> T {
    match flags.get(key) {
        Some(v) => v.parse().unwrap_or_else(|_| panic!("--{key}: bad value {v:?}")),
        None => default.unwrap_or_else(|| panic!("--{key} is required")),
    }
}

#[tokio::main]
async fn main() {
    let (workload, flags) = flags();
    if workload == "relay" {
        return relay(&flags).await;
    }
    let target: String = get(&flags, "target", None);
    let client = Client::connect(&target).await.expect("connect");
    // `--upstream NAME`: the `x-upstream` a router picks the backend by.
    let client = match flags.get("upstream") {
        Some(upstream) => client.with_upstream(upstream),
        None => client,
    };
    let mut out = match workload.as_str() {
        "file" => file(&client, &flags).await,
        "stream" => stream(&client, &flags).await,
        "small" => small(&client, &flags).await,
        "many" => many(&client, &flags).await,
        "long" => long(&client, &flags).await,
        other => panic!("unknown workload {other:?}: file, stream, small, many or long"),
    };
    // Its own peak RSS: a parent's wait4 rusage would count the parent's
    // RSS at fork time too.
    out["peak_rss_kib"] = json!(peak_rss_kib());
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{out}").expect("stdout");
}

/// Forwards connections on `--listen` to `--target`, the client-to-server
/// bytes of all of them together paced to `--rate` bytes per second.
async fn relay(flags: &HashMap<String, String>) {
    let target: String = get(flags, "target", None);
    let listen: String = get(flags, "listen", None);
    let rate: f64 = get(flags, "rate", None);
    let listener = tokio::net::TcpListener::bind(&listen).await.expect("bind the relay");
    let pace = Arc::new(tokio::sync::Mutex::new(tokio::time::Instant::now()));
    loop {
        let (inbound, _) = listener.accept().await.expect("accept");
        let _ = inbound.set_nodelay(true);
        let outbound = tokio::net::TcpStream::connect(&target).await.expect("connect the relay's target");
        let _ = outbound.set_nodelay(true);
        let (mut client_read, mut client_write) = inbound.into_split();
        let (mut server_read, mut server_write) = outbound.into_split();
        tokio::spawn(async move {
            let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
        });
        let pace = Arc::clone(&pace);
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut buf = vec![0u8; 64 << 10];
            while let Ok(n) = client_read.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                // The link is free again once these bytes would have passed;
                // time lost to the timer's millisecond ticks is made up (a
                // link idle for longer saves nothing up).
                let due = {
                    let mut next = pace.lock().await;
                    let now = tokio::time::Instant::now();
                    let floor = now.checked_sub(Duration::from_millis(20)).unwrap_or(now);
                    *next = (*next).max(floor) + Duration::from_secs_f64(n as f64 / rate);
                    *next
                };
                if due > tokio::time::Instant::now() + Duration::from_millis(1) {
                    tokio::time::sleep_until(due).await;
                }
                if server_write.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
            let _ = server_write.shutdown().await;
        });
    }
}

async fn file(client: &Client, flags: &HashMap<String, String>) -> Value {
    let func: String = get(flags, "func", None);
    let path: String = get(flags, "path", None);
    // `--level auto` (the client's default), `none`, or a zstd level.
    let level: String = get(flags, "level", Some("auto".to_owned()));
    let compression: Compression = level.parse().expect("--level: auto, none or a zstd level");
    let started = Instant::now();
    let out = client
        .call(&func)
        .file(&path)
        .compression(compression)
        .retry(RetryPolicy::none())
        .send()
        .await
        .unwrap_or_else(|e| panic!("{func}: {e}"));
    let wall = started.elapsed().as_secs_f64();
    json!({"wall_s": wall, "heartbeats": out.heartbeats, "result": out.json::<Value>().expect("result")})
}

async fn stream(client: &Client, flags: &HashMap<String, String>) -> Value {
    let func: String = get(flags, "func", None);
    let bytes: u64 = get(flags, "bytes", None);
    let level: String = get(flags, "level", Some("auto".to_owned()));
    let compression: Compression = level.parse().expect("--level: auto, none or a zstd level");
    let generator = Mixed::new(bytes);
    let digest = Arc::clone(&generator.digest);
    let started = Instant::now();
    let out = client
        .call(&func)
        .reader(generator)
        .compression(compression)
        .retry(RetryPolicy::none())
        .send()
        .await
        .unwrap_or_else(|e| panic!("{func}: {e}"));
    let wall = started.elapsed().as_secs_f64();
    let expected = digest.lock().expect("digest").clone();
    json!({"wall_s": wall, "heartbeats": out.heartbeats, "result": out.json::<Value>().expect("result"),
           "expected_sha256": expected})
}

async fn small(client: &Client, flags: &HashMap<String, String>) -> Value {
    let n: usize = get(flags, "n", Some(2000));
    // The concurrent phase runs ~5x faster: more calls give it as long a window.
    let concurrent_n: usize = get(flags, "concurrent-n", Some(n));
    let concurrency: usize = get(flags, "concurrency", Some(16));
    let payload = bytes::Bytes::from(vec![7u8; get(flags, "payload-bytes", Some(1024))]);
    let one = |i: usize| {
        let call = client.call("echo").kwarg("i", i).bytes(payload.clone()).retry(RetryPolicy::none());
        async move {
            let started = Instant::now();
            let out = call.send().await.expect("echo");
            let ok = out.json::<Value>().expect("json")["kwargs"]["i"] == i;
            (started.elapsed(), ok)
        }
    };
    for i in 0..20 {
        one(i).await; // warm-up: connection, allocator, page cache
    }
    let mut wrong = 0;
    let mut lat = Vec::with_capacity(n);
    let started = Instant::now();
    for i in 0..n {
        let (took, ok) = one(i).await;
        lat.push(took);
        wrong += usize::from(!ok);
    }
    let sequential = summary(lat, started.elapsed());

    let next = std::sync::atomic::AtomicUsize::new(0);
    let started = Instant::now();
    let tasks = (0..concurrency).map(|_| async {
        let mut lat = Vec::new();
        let mut wrong = 0;
        loop {
            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if i >= concurrent_n {
                return (lat, wrong);
            }
            let (took, ok) = one(i).await;
            lat.push(took);
            wrong += usize::from(!ok);
        }
    });
    let done = futures_join_all(tasks).await;
    let wall = started.elapsed();
    let mut lat = Vec::with_capacity(n);
    for (l, w) in done {
        lat.extend(l);
        wrong += w;
    }
    let mut concurrent = summary(lat, wall);
    concurrent["tasks"] = json!(concurrency);
    json!({"sequential": sequential, "concurrent": concurrent, "wrong_results": wrong})
}

async fn many(client: &Client, flags: &HashMap<String, String>) -> Value {
    let n: usize = get(flags, "n", Some(1000));
    let seconds: f64 = get(flags, "seconds", Some(10.0));
    // Calls spread over this many connections (HTTP/2 streams share each).
    let connections: usize = get(flags, "connections", Some(1));
    let target: String = get(flags, "target", None);
    let mut clients = vec![client.clone()];
    for _ in 1..connections {
        clients.push(Client::connect(&target).await.expect("connect"));
    }
    let started = Instant::now();
    // A task per call: a join over 10,000 futures would poll them all on
    // every wake-up, and the client would measure itself. The client's
    // default retries, as a user's: a burst past the server's bound on
    // streams without their first message is refused, retryably.
    let calls: Vec<_> = (0..n)
        .map(|i| {
            let call = clients[i % clients.len()].call("sleep").kwarg("seconds", seconds);
            tokio::spawn(async move { call.send().await })
        })
        .collect();
    let mut ok = 0;
    let mut retried = 0;
    let mut heartbeats = 0;
    let mut errors = Vec::new();
    for call in calls {
        match call.await.expect("call task") {
            Ok(out) => {
                heartbeats += out.heartbeats;
                retried += usize::from(out.attempts > 1);
                ok += usize::from(out.json::<Value>().expect("json")["slept"] == seconds);
            }
            Err(e) => errors.push(e.to_string()),
        }
    }
    let wall = started.elapsed().as_secs_f64();
    errors.truncate(3);
    json!({"n": n, "seconds": seconds, "connections": connections, "wall_s": wall, "ok": ok, "retried": retried,
           "heartbeats": heartbeats, "errors": errors})
}

async fn long(client: &Client, flags: &HashMap<String, String>) -> Value {
    let seconds: f64 = get(flags, "seconds", Some(5.0));
    let started = Instant::now();
    let out = client.call("sleep").kwarg("seconds", seconds).send().await.expect("sleep");
    let ok = out.json::<Value>().expect("json")["slept"] == seconds;
    json!({"seconds": seconds, "wall_s": started.elapsed().as_secs_f64(), "heartbeats": out.heartbeats, "result_ok": ok})
}

/// Runs futures concurrently on this task (no extra crate needed).
async fn futures_join_all<F: std::future::Future>(futures: impl IntoIterator<Item = F>) -> Vec<F::Output> {
    let mut set = Vec::new();
    for f in futures {
        set.push(Box::pin(f));
    }
    let mut outputs: Vec<Option<F::Output>> = set.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, out) in set.iter_mut().zip(outputs.iter_mut()) {
            if out.is_none() {
                match f.as_mut().poll(cx) {
                    Poll::Ready(v) => *out = Some(v),
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending { Poll::Pending } else { Poll::Ready(()) }
    })
    .await;
    outputs.into_iter().map(|o| o.expect("finished")).collect()
}

/// VmHWM of this process, in KiB.
fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn summary(mut lat: Vec<Duration>, wall: Duration) -> Value {
    lat.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let pct = |p: f64| ms(lat[((p / 100.0 * lat.len() as f64).ceil() as usize).clamp(1, lat.len()) - 1]);
    json!({
        "n": lat.len(),
        "wall_s": wall.as_secs_f64(),
        "calls_per_s": lat.len() as f64 / wall.as_secs_f64(),
        "p50_ms": pct(50.0),
        "p99_ms": pct(99.0),
        "max_ms": ms(lat[lat.len() - 1]),
    })
}

/// `len` bytes generated on the fly: 1 MiB blocks alternating pseudo-random
/// bytes and CSV-like log text (the same kind of data as the stored inputs),
/// hashed as they are read so the server's answer can be checked.
struct Mixed {
    left: u64,
    block: Vec<u8>,
    text: Vec<u8>,
    pos: usize,
    index: u64,
    rng: u64,
    hasher: Option<Sha256>,
    digest: Arc<std::sync::Mutex<String>>,
}

impl Mixed {
    fn new(len: u64) -> Self {
        let mut text = Vec::with_capacity(MIB + 128);
        let mut k = 0u64;
        while text.len() < MIB {
            k += 1;
            let _ = writeln!(
                text,
                "2026-11-26T{:02}:{:02}:{:02}Z,INFO,worker-{},GET,/api/v1/items/{},200,{},req-{k:010}",
                (k / 3600) % 24,
                (k / 60) % 60,
                k % 60,
                k % 8,
                k % 1000,
                k % 997
            );
        }
        text.truncate(MIB);
        Self {
            left: len,
            block: vec![0; MIB],
            text,
            pos: MIB,
            index: 0,
            rng: 0x9E37_79B9_7F4A_7C15,
            hasher: Some(Sha256::new()),
            digest: Arc::default(),
        }
    }

    fn refill(&mut self) {
        if self.index.is_multiple_of(2) {
            for word in self.block.chunks_exact_mut(8) {
                self.rng ^= self.rng << 13;
                self.rng ^= self.rng >> 7;
                self.rng ^= self.rng << 17;
                word.copy_from_slice(&self.rng.to_le_bytes());
            }
        } else {
            self.block.copy_from_slice(&self.text);
            // Vary the text per block so it is not one repeated MiB.
            self.block[..8].copy_from_slice(&self.index.to_le_bytes());
        }
        self.index += 1;
        self.pos = 0;
    }
}

impl AsyncRead for Mixed {
    fn poll_read(mut self: Pin<&mut Self>, _cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if this.left == 0 {
            if let Some(h) = this.hasher.take() {
                *this.digest.lock().expect("digest") = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
            }
            return Poll::Ready(Ok(()));
        }
        if this.pos == MIB {
            this.refill();
        }
        let n = (MIB - this.pos).min(buf.remaining()).min(usize::try_from(this.left).unwrap_or(usize::MAX));
        let chunk = &this.block[this.pos..this.pos + n];
        if let Some(h) = this.hasher.as_mut() {
            h.update(chunk);
        }
        buf.put_slice(chunk);
        this.pos += n;
        this.left -= n as u64;
        Poll::Ready(Ok(()))
    }
}
