//! Sending a result payload: read from memory or the call's output
//! directory and encoded through the codec's async bridge (in line when
//! small, else on a blocking thread), each chunk waiting for room in the
//! bounded reply channel, so a slow client never makes the server buffer
//! the file.

use std::{fs::File, io::Read, path::Path};

use aipod::{
    codec::{DEFAULT_ZSTD_LEVEL, Encoding, bridge::EncodedStream},
    contract::CHUNK_SIZE,
};
use bytes::Bytes;

use crate::{
    engine::event::{Event, Events},
    error::{Error, Result},
};

/// Streams the file at `path` (`size` bytes) to `events` as `Data` events.
pub(crate) async fn send_file(path: &Path, size: u64, encoding: Encoding, events: &Events) -> Result<()> {
    let file = File::open(path).map_err(|e| Error::spool_io("opening the result payload", e))?;
    send_payload(file, size, encoding, events).await
}

/// Sends `bytes`, a result payload in memory, to `events` as `Data`
/// events. Uncompressed bytes that fit one chunk go as they are, in one
/// event: no encoder, no copy (a small call's echo, a short answer).
pub(crate) async fn send_bytes(bytes: Bytes, encoding: Encoding, events: &Events) -> Result<()> {
    if encoding == Encoding::Identity && bytes.len() <= CHUNK_SIZE {
        if !bytes.is_empty() {
            events.send(Ok(Event::Data(bytes))).await.map_err(|_| Error::Cancelled)?;
        }
        return Ok(());
    }
    let size = bytes.len() as u64;
    send_payload(std::io::Cursor::new(bytes), size, encoding, events).await
}

/// Streams `payload` (`size` bytes) to `events` as `Data` events.
async fn send_payload<R: Read + Send + 'static>(
    payload: R,
    size: u64,
    encoding: Encoding,
    events: &Events,
) -> Result<()> {
    let mut chunks = EncodedStream::new(payload, encoding, DEFAULT_ZSTD_LEVEL, CHUNK_SIZE, Some(size));
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.map_err(|e| Error::spool_io("reading the result payload", e))?;
        events.send(Ok(Event::Data(chunk))).await.map_err(|_| Error::Cancelled)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Everything `send_bytes` sends, as the data events' bytes.
    async fn sent(bytes: Bytes, encoding: Encoding) -> Vec<Bytes> {
        use tokio_stream::StreamExt as _;
        let (tx, mut rx) = crate::engine::event::channel();
        send_bytes(bytes, encoding, &tx).await.expect("sent");
        drop(tx);
        let mut chunks = Vec::new();
        while let Some(event) = rx.next().await {
            match event.expect("no failure") {
                Event::Data(chunk) => chunks.push(chunk),
                other => panic!("only data, got {other:?}"),
            }
        }
        chunks
    }

    #[tokio::test]
    async fn uncompressed_bytes_within_a_chunk_go_as_they_are_in_one_event() {
        let bytes = Bytes::from(vec![7u8; 1024]);
        let chunks = sent(bytes.clone(), Encoding::Identity).await;
        assert_eq!(chunks.len(), 1);
        assert_eq!(chunks[0].as_ptr(), bytes.as_ptr(), "the model's bytes themselves, not an encoder's copy");
        assert!(sent(Bytes::new(), Encoding::Identity).await.is_empty(), "nothing to send");
    }

    #[tokio::test]
    async fn compressed_or_larger_bytes_go_through_the_encoder() {
        let bytes = Bytes::from(vec![7u8; 1024]);
        let chunks = sent(bytes.clone(), Encoding::Zstd).await;
        assert_eq!(chunks.len(), 1);
        assert_eq!(chunks[0][..4], [0x28, 0xb5, 0x2f, 0xfd], "a zstd frame");
        let big = Bytes::from(vec![1u8; CHUNK_SIZE + 1]);
        let chunks = sent(big.clone(), Encoding::Identity).await;
        assert_eq!(chunks.iter().map(Bytes::len).collect::<Vec<_>>(), [CHUNK_SIZE, 1]);
        assert_ne!(chunks[0].as_ptr(), big.as_ptr(), "chunked by the encoder");
    }
}
