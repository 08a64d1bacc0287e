//! Entry points for the fuzz targets (`fuzz/`, cargo feature `fuzzing`):
//! the runtime's handling of untrusted input, driven without a server.
//! Each checks the invariants the server relies on and panics when one
//! breaks; `bench/fuzz` runs them.

use aipod::{
    codec::{Encoding, StreamDecoder},
    proto,
};
use prost::Message as _;

use crate::{
    server::service::header::{self, HeaderLimits},
    versions::exec::protocol::FromWorker,
};

/// The longest error message the runtime may build from client input.
const MESSAGE_BOUND: usize = 4096;

/// A call's header frame and metadata: the first byte says which metadata
/// is present, the rest is the protobuf `Header`.
pub fn header(data: &[u8]) {
    let Some((&flags, rest)) = data.split_first() else { return };
    let (meta, proto_bytes) = rest.split_at(rest.len().min(usize::from(flags >> 2)));
    let meta = String::from_utf8_lossy(meta);
    let meta_func = (flags & 1 == 1).then_some(meta.as_ref());
    let meta_call_id = (flags & 2 == 2).then_some(meta.as_ref());
    let Ok(mut header) = proto::Header::decode(proto_bytes) else { return };
    let limits = HeaderLimits { max_kwargs_bytes: 64 << 10, max_payload_bytes: 1 << 30 };
    match header::request(meta_func, meta_call_id, &mut header, limits) {
        Ok(request) => {
            assert!(request.call_id.len() <= 128, "call id over its limit");
            assert!(!request.func.is_empty(), "a function is always named");
            assert!(request.payload.declared.is_none_or(|d| d <= limits.max_payload_bytes));
        }
        Err(e) => assert!(e.to_string().len() <= MESSAGE_BOUND, "error message echoes too much input"),
    }
}

/// One line from an `exec:` worker.
pub fn worker_line(data: &[u8]) {
    if let Err(e) = FromWorker::parse(data) {
        assert!(e.len() <= MESSAGE_BOUND, "error message echoes too much of the line");
    }
}

/// An uploaded zstd payload, cut into chunks by its first byte, decoded
/// with the server's window cap (8 MiB) against a 1 MiB size limit.
pub fn zstd_payload(data: &[u8]) {
    const LIMIT: u64 = 1 << 20;
    let Some((&chunk, stream)) = data.split_first() else { return };
    let chunk = usize::from(chunk).max(1);
    let Ok(decoder) = StreamDecoder::new(Sink::default(), Encoding::Zstd, LIMIT) else { return };
    let Ok(mut decoder) = decoder.with_window_log_max(23) else { return };
    for piece in stream.chunks(chunk) {
        if decoder.write_chunk(piece).is_err() {
            return;
        }
        assert!(decoder.decoded() <= LIMIT, "decoded past the limit");
    }
    if let Ok((sink, n)) = decoder.finish() {
        assert!(n <= LIMIT && sink.0 == n, "the decoder's count is what it wrote");
    }
}

/// Counts what is written, keeps nothing.
#[derive(Debug, Default)]
struct Sink(u64);

impl std::io::Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;

    /// The seeds `bench/fuzz` starts from, and inputs fuzzing found, run as
    /// ordinary tests.
    #[test]
    fn seeds_and_findings_hold() {
        let mut frame = Vec::new();
        proto::Header { func: "x".repeat(100_000), ..Default::default() }.encode(&mut frame).expect("encode");
        header(&[&[0u8][..], &frame].concat());
        header(&[1u8, b'f']);
        worker_line(&[b'{'; 10_000]);
        // Found by fuzzing: serde's error quoted a 5 KB string value whole.
        worker_line(format!("\"t{}\"", "2".repeat(5000)).as_bytes());
        worker_line(br#"{"type":"result","id":"c"}"#);
        let mut z = Vec::new();
        zstd::stream::copy_encode(&b"hello"[..], &mut z, 3).expect("zstd");
        zstd_payload(&[&[3u8][..], &z].concat());
        let _ = Sink::default().write(b"");
    }
}
