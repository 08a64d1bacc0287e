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

use crate::{
    engine::event::{Event, Events},
    error::{Error, Result},
};

/// Streams the file at `path` (`size` bytes) to `events` as `Data` events.
pub(crate) async fn send_file(path: &Path, size: u64, encoding: Encoding, events: &Events) -> Result<()> {
    let file = File::open(path).map_err(|e| Error::spool_io("opening the result payload", e))?;
    send_payload(file, size, encoding, events).await
}

/// Streams `payload` (`size` bytes) to `events` as `Data` events.
pub(crate) async fn send_payload<R: Read + Send + 'static>(
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
