//! A small real model served by the aipod runtime as a library: a streaming
//! word count. `count` reads the payload in 1 MiB pieces (never whole; from
//! memory when the runtime kept a small payload there, else from the spool), reports its progress into the call's heartbeats, stops
//! when the call is cancelled, and answers with the totals and the most
//! frequent words; with `csv: true` it also returns every word's count as a
//! result payload file.
//!
//! Kwargs of `count`: `top` (1–1000, default 10), `csv` (default false).

use std::{collections::HashMap, fs::File, io::Write};

use aipod_runtime::{BoxFuture, ErrorCode, Kwargs, Model, ModelCall, ModelError, ModelOutput};
use serde_json::{Value, json};

/// How much of the input is read at a time.
const PIECE: usize = 1 << 20;

/// The word-count model.
#[derive(Debug, Default, Clone, Copy)]
pub struct WordCount;

impl Model for WordCount {
    fn functions(&self) -> Vec<String> {
        vec!["count".to_owned()]
    }

    fn call(&self, call: ModelCall) -> BoxFuture<Result<ModelOutput, ModelError>> {
        Box::pin(async move {
            let options = Options::from_kwargs(&call.kwargs)?;
            // Reading and counting are blocking work: off the async runtime.
            tokio::task::spawn_blocking(move || count(&call, options))
                .await
                .map_err(|e| ModelError::internal(format!("counting failed: {e}")))?
        })
    }
}

#[derive(Debug, Clone, Copy)]
struct Options {
    top: usize,
    csv: bool,
}

impl Options {
    fn from_kwargs(kwargs: &Kwargs) -> Result<Self, ModelError> {
        let top = match kwargs.get("top") {
            None => 10,
            Some(v) => v.as_u64().filter(|n| (1..=1000).contains(n)).ok_or_else(|| {
                ModelError::invalid_argument(format!("top must be a whole number from 1 to 1000, not {v}"))
            })? as usize,
        };
        let csv = match kwargs.get("csv") {
            None => false,
            Some(Value::Bool(b)) => *b,
            Some(v) => return Err(ModelError::invalid_argument(format!("csv must be true or false, not {v}"))),
        };
        if let Some(unknown) = kwargs.keys().find(|k| !matches!(k.as_str(), "top" | "csv")) {
            return Err(ModelError::invalid_argument(format!("count takes top and csv, not {unknown:?}")));
        }
        Ok(Self { top, csv })
    }
}

/// Counts words in the call's input, piece by piece.
fn count(call: &ModelCall, options: Options) -> Result<ModelOutput, ModelError> {
    let io = |what: &str, e: std::io::Error| ModelError::internal(format!("{what}: {e}"));
    let mut input = call.input.open().map_err(|e| io("opening the input", e))?;
    let mut counter = Counter::default();
    let mut piece = vec![0; PIECE];
    let mut read = 0_u64;
    loop {
        if call.cancel.is_cancelled() {
            return Err(ModelError::new(ErrorCode::Cancelled, format!("cancelled after {read} bytes")));
        }
        let n = input.read(&mut piece).map_err(|e| io("reading the input", e))?;
        if n == 0 {
            break;
        }
        counter.feed(&piece[..n]);
        read += n as u64;
        let fraction = if call.input_size == 0 { 1.0 } else { read as f32 / call.input_size as f32 };
        call.progress.report(Some(fraction), format!("{} words so far", counter.words));
    }
    counter.end_word();

    let mut ranked: Vec<(&String, &u64)> = counter.counts.iter().collect();
    ranked.sort_by(|a, b| b.1.cmp(a.1).then_with(|| a.0.cmp(b.0)));
    let top: Vec<Value> = ranked.iter().take(options.top).map(|(w, n)| json!([w, n])).collect();
    let result = json!({
        "bytes": read,
        "lines": counter.lines,
        "words": counter.words,
        "distinct": counter.counts.len(),
        "top": top,
    });
    if !options.csv {
        return Ok(ModelOutput::json(result));
    }
    let dir = call.output_dir.create().map_err(|e| io("creating the output directory", e))?;
    let path = dir.join("counts.csv");
    let mut out = std::io::BufWriter::new(File::create(&path).map_err(|e| io("creating counts.csv", e))?);
    writeln!(out, "word,count").map_err(|e| io("writing counts.csv", e))?;
    for (word, n) in &ranked {
        writeln!(out, "{word},{n}").map_err(|e| io("writing counts.csv", e))?;
    }
    out.flush().map_err(|e| io("writing counts.csv", e))?;
    Ok(ModelOutput::with_payload(result, path))
}

/// Word counting across piece boundaries: a word is a run of ASCII letters
/// and digits, compared in lower case.
#[derive(Debug, Default)]
struct Counter {
    counts: HashMap<String, u64>,
    /// The word being read, which may continue in the next piece.
    partial: Vec<u8>,
    words: u64,
    lines: u64,
}

impl Counter {
    fn feed(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if b.is_ascii_alphanumeric() {
                self.partial.push(b.to_ascii_lowercase());
            } else {
                self.end_word();
                if b == b'\n' {
                    self.lines += 1;
                }
            }
        }
    }

    fn end_word(&mut self) {
        if self.partial.is_empty() {
            return;
        }
        // Only ASCII alphanumerics were pushed: valid UTF-8.
        let word = String::from_utf8_lossy(&self.partial).into_owned();
        *self.counts.entry(word).or_insert(0) += 1;
        self.words += 1;
        self.partial.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_split_across_pieces_count_once() {
        let mut c = Counter::default();
        c.feed(b"The ca");
        c.feed(b"t sat.\nthe END");
        c.end_word();
        assert_eq!((c.words, c.lines, c.counts["the"], c.counts["cat"], c.counts["end"]), (5, 1, 2, 1, 1));
    }

    #[test]
    fn kwargs_are_checked() {
        let kw = |v: Value| v.as_object().cloned().unwrap_or_default();
        assert_eq!(Options::from_kwargs(&kw(json!({}))).map(|o| (o.top, o.csv)), Ok((10, false)));
        assert!(Options::from_kwargs(&kw(json!({"top": 0}))).is_err());
        assert!(Options::from_kwargs(&kw(json!({"csv": "yes"}))).is_err());
        assert!(Options::from_kwargs(&kw(json!({"tpo": 3}))).is_err());
    }
}
