//! The payload on the way out: its source, read and encoded as it is sent.

use std::{
    io::{self, Read},
    path::PathBuf,
};

use bytes::Bytes;
use tokio::{io::AsyncRead, sync::mpsc, task::JoinHandle};
use tokio_util::io::SyncIoBridge;

use super::{Payload, Progress, ProgressFn};
use crate::{
    client::error::{CallError, ErrorKind},
    codec::{
        AUTO_SMALL_MAX, Compression, DEFAULT_ZSTD_LEVEL, Encoding,
        bridge::{EncodedStream, INLINE_MAX},
    },
    contract,
    proto::{Frame, frame},
};

/// An upload not started yet: what to send, where, and how.
pub(super) struct Upload {
    pub(super) source: Source,
    pub(super) tx: mpsc::Sender<Frame>,
    pub(super) encoding: Encoding,
    pub(super) compression: Compression,
    pub(super) total: Option<u64>,
}

impl Upload {
    /// Checks the offset a resuming server holds against the payload.
    pub(super) fn resume_at(self, offset: u64) -> Result<Self, CallError> {
        match self.total {
            Some(total) if offset > total => Err(CallError::new(
                ErrorKind::Protocol,
                tonic::Code::Internal,
                format!("the server holds {offset} bytes of a {total}-byte payload"),
            )),
            _ => Ok(self),
        }
    }

    /// Whether the whole payload fits the request channel beside the
    /// header — none, or bytes in memory that encode to one chunk: then it
    /// is queued before the call starts, with no task of its own (a small
    /// call's cost is mostly such hand-offs).
    pub(super) fn fits_in_line(&self) -> bool {
        match &self.source {
            Source::None => true,
            Source::Bytes(b) => b.len() as u64 <= INLINE_MAX,
            Source::File(_) | Source::Reader(_) => false,
        }
    }

    /// Encodes and queues a payload that [`Upload::fits_in_line`], then
    /// half-closes.
    pub(super) async fn send_in_line(self, progress: Option<ProgressFn>) -> Result<(), CallError> {
        let compression = self.compression_from(0);
        self.source.upload(self.tx, compression, self.total, 0, progress)?.await
    }

    /// Reads, encodes and sends the payload from uncompressed byte
    /// `offset`, then half-closes.
    pub(super) fn spawn(self, offset: u64, progress: Option<ProgressFn>) -> JoinHandle<Result<(), CallError>> {
        let compression = self.compression_from(offset);
        match self.source.upload(self.tx, compression, self.total, offset, progress) {
            Ok(sending) => tokio::spawn(sending),
            Err(e) => tokio::spawn(async move { Err(e) }),
        }
    }

    /// The compression of the payload from `offset` on.
    pub(super) fn compression_from(&self, offset: u64) -> Compression {
        // The header named the encoding: every piece keeps to it.
        match (self.encoding, self.compression) {
            (Encoding::Identity, _) => Compression::Off,
            (Encoding::Zstd, Compression::Auto) if self.total.is_some_and(|t| t - offset.min(t) <= AUTO_SMALL_MAX) => {
                Compression::Level(DEFAULT_ZSTD_LEVEL)
            }
            (Encoding::Zstd, c) => c,
        }
    }
}

/// The payload of one attempt.
pub(super) enum Source {
    None,
    File(PathBuf),
    Bytes(Bytes),
    Reader(Box<dyn AsyncRead + Send + Unpin>),
}

impl Source {
    /// This attempt's payload: files and bytes again, a reader once.
    pub(super) fn of(payload: &mut Payload) -> Self {
        match payload {
            Payload::None => Self::None,
            Payload::File(p) => Self::File(p.clone()),
            Payload::Bytes(b) => Self::Bytes(b.clone()),
            Payload::Reader(r) => Self::Reader(std::mem::replace(r, Box::new(tokio::io::empty()))),
        }
    }

    pub(super) fn size(&self) -> Result<Option<u64>, CallError> {
        Ok(match self {
            Self::None => Some(0),
            Self::Bytes(b) => Some(b.len() as u64),
            Self::File(p) => Some(
                std::fs::metadata(p).map_err(|e| CallError::local(format!("cannot read {}: {e}", p.display())))?.len(),
            ),
            Self::Reader(_) => None,
        })
    }

    /// What reads, encodes and sends the payload from uncompressed byte
    /// `offset` (through the codec's bridge: in line when small, else on a
    /// blocking thread), then half-closes by dropping `tx`.
    pub(super) fn upload(
        self,
        tx: mpsc::Sender<Frame>,
        compression: Compression,
        total: Option<u64>,
        offset: u64,
        progress: Option<ProgressFn>,
    ) -> Result<impl Future<Output = Result<(), CallError>> + Send + 'static, CallError> {
        let fail = |message: String| Err(CallError::local(message));
        let reader: Box<dyn Read + Send> = match self {
            Self::None => Box::new(io::empty()),
            Self::Bytes(b) => {
                let from = usize::try_from(offset).unwrap_or(usize::MAX).min(b.len());
                Box::new(io::Cursor::new(b.slice(from..)))
            }
            Self::File(p) => {
                let opened = std::fs::File::open(&p).and_then(|mut f| {
                    io::Seek::seek(&mut f, io::SeekFrom::Start(offset))?;
                    Ok(f)
                });
                match opened {
                    Ok(f) => Box::new(f),
                    Err(e) => return fail(format!("cannot open {}: {e}", p.display())),
                }
            }
            Self::Reader(_) if offset > 0 => return fail("a stream payload cannot be resumed".to_owned()),
            // Never in line: its size is unknown, so the bridge runs it on a
            // blocking thread, where SyncIoBridge may block.
            Self::Reader(r) => Box::new(SyncIoBridge::new(r)),
        };
        let rest = total.map(|t| t.saturating_sub(offset));
        Ok(async move {
            let mut chunks = EncodedStream::compressed(reader, compression, contract::CHUNK_SIZE, rest);
            while let Some(chunk) = chunks.next().await {
                let chunk = chunk.map_err(|e| CallError::local(format!("reading the payload failed: {e}")))?;
                if tx.send(Frame { kind: Some(frame::Kind::Data(chunk)) }).await.is_err() {
                    return Ok(()); // the server answered before the end: its answer says why
                }
                if let Some(f) = &progress {
                    f(&Progress::Sent { bytes: offset + chunks.bytes_read(), total });
                }
            }
            Ok(())
        })
    }
}
