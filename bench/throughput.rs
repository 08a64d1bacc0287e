//! Throughput and memory of the runtime: streams a 1 GiB file of alternating
//! 1 MiB blocks of random bytes and log-like text to the release
//! `aipod-runtime` over loopback with the aipod client library (zstd level 1,
//! 1 MiB chunks), to `sha256`
//! (hashed while it streams) and to `discard` (the transport's ceiling).
//! Prints MB/s per run and the median, and the server's and client's peak RSS.
//!
//! `cargo bench -p aipod-runtime --bench throughput [-- --mib N --reps N]`
//! Inputs are generated once into `$AIPOD_BENCH_DIR` (default
//! `<tmp>/aipod-bench`).

#![allow(clippy::print_stdout, clippy::print_stderr, missing_docs, reason = "a benchmark prints its numbers")]

use std::{
    fs::File,
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use aipod::{Client, client::RetryPolicy};
use sha2::{Digest, Sha256};

struct Args {
    mib: u64,
    reps: usize,
    level: i32,
}

fn args() -> Args {
    let mut a = Args { mib: 1024, reps: 3, level: 1 };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().and_then(|v| v.parse::<u64>().ok()).expect("flag needs a number");
        match flag.as_str() {
            "--mib" => a.mib = value(),
            "--reps" => a.reps = value() as usize,
            "--level" => a.level = value() as i32,
            "--bench" => {}
            other => panic!("unknown flag {other}; use --mib N --reps N --level N"),
        }
    }
    a
}

/// Writes the mixed input once; returns its path and sha256.
fn input(mib: u64) -> (PathBuf, String) {
    let dir =
        std::env::var_os("AIPOD_BENCH_DIR").map_or_else(|| std::env::temp_dir().join("aipod-bench"), PathBuf::from);
    std::fs::create_dir_all(&dir).expect("bench dir");
    let path = dir.join(format!("mixed-{mib}m.bin"));
    let hash_path = path.with_extension("sha256");
    if let (true, Ok(hash)) = (path.exists(), std::fs::read_to_string(&hash_path)) {
        return (path, hash.trim().to_owned());
    }
    eprintln!("generating {} ({mib} MiB)…", path.display());
    let mut file = std::io::BufWriter::new(File::create(&path).expect("create input"));
    let mut hasher = Sha256::new();
    let mut rng: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut block = vec![0u8; 1 << 20];
    for i in 0..mib {
        if i % 2 == 0 {
            for word in block.chunks_mut(8) {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                word.copy_from_slice(&rng.to_le_bytes());
            }
        } else {
            let mut line = 0u64;
            let mut text = Vec::with_capacity(block.len() + 128);
            while text.len() < block.len() {
                line += 1;
                writeln!(
                    text,
                    "2026-11-26T16:{:02}:{:02}Z,INFO,user={},model=v1,latency_ms={},status=ok",
                    line % 60,
                    (line * 7) % 60,
                    (i * 31 + line) % 10_000,
                    (line * 13) % 500
                )
                .expect("format");
            }
            let n = block.len();
            block.copy_from_slice(&text[..n]);
        }
        hasher.update(&block);
        file.write_all(&block).expect("write input");
    }
    file.flush().expect("flush");
    let hash: String = hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
    std::fs::write(&hash_path, &hash).expect("write hash");
    (path, hash)
}

fn peak_rss_kib(pid: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

async fn upload(client: &Client, func: &str, path: &Path, level: i32) -> (Duration, serde_json::Value) {
    let started = Instant::now();
    let out = client
        .call(func)
        .file(path)
        .zstd_level(Some(level))
        .retry(RetryPolicy::none())
        .send()
        .await
        .unwrap_or_else(|e| panic!("{func}: {e}"));
    (started.elapsed(), out.json().expect("result JSON"))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main]
async fn main() {
    let args = args();
    let (path, expected) = input(args.mib);
    let size = std::fs::metadata(&path).expect("input").len();
    let spool = tempfile::tempdir().expect("spool");
    let mut server = Command::new(env!("CARGO_BIN_EXE_aipod-runtime"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
            "--log",
            "warn,aipod_runtime::server=info",
            "--spool-dir",
        ])
        .arg(spool.path())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start aipod-runtime");
    let addr = BufReader::new(server.stderr.take().expect("stderr"))
        .lines()
        .map_while(Result::ok)
        .find_map(|l| {
            let v: serde_json::Value = serde_json::from_str(&l).ok()?;
            (v["message"] == "aipod-runtime listening").then(|| v["addr"].as_str().map(str::to_owned))?
        })
        .expect("runtime address");
    let pid = server.id().to_string();
    let client = Client::connect(&addr).await.expect("client");

    println!(
        "aipod throughput: {} MiB mixed input, zstd level {}, {} runs each, {} cores",
        args.mib,
        args.level,
        args.reps,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    for func in ["sha256", "discard"] {
        let mut rates = Vec::new();
        for rep in 0..args.reps {
            let (elapsed, result) = upload(&client, func, &path, args.level).await;
            assert_eq!(result["size"], size, "{func}: {result}");
            if func == "sha256" {
                assert_eq!(result["sha256"], expected.as_str(), "hash mismatch");
            }
            let rate = size as f64 / elapsed.as_secs_f64() / 1e6;
            println!("  {func:<8} run {}: {:>7.3} s  {:>7.0} MB/s", rep + 1, elapsed.as_secs_f64(), rate);
            rates.push(rate);
        }
        println!("{func:<8} median {:>7.0} MB/s", median(rates));
    }
    println!("server peak RSS {:>6.1} MiB", peak_rss_kib(&pid) as f64 / 1024.0);
    println!("client peak RSS {:>6.1} MiB", peak_rss_kib("self") as f64 / 1024.0);
    let _ = Command::new("kill").args(["-s", "TERM", &pid]).status();
    let _ = server.wait();
}
