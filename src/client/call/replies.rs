//! The replies on the way in: heartbeats into progress, the result, and
//! the result payload written to its sink as it arrives.

use std::{
    io::{self, Write},
    path::PathBuf,
};

use bytes::Bytes;
use tokio_util::io::SyncIoBridge;

use super::{Output, Progress, ProgressFn};
use crate::{
    client::error::{CallError, ErrorKind},
    codec::{
        Encoding, StreamDecoder,
        bridge::{self, DecodeSink},
    },
    proto::{self, Phase, reply},
};

/// Follows the replies of one attempt.
#[derive(Default)]
pub(super) struct Replies {
    pub(super) progress: Option<ProgressFn>,
    pub(super) phase: Option<Phase>,
    pub(super) heartbeats: u64,
    pub(super) result: Option<(Bytes, Option<u64>)>,
    pub(super) sink: Option<Sink>,
}

impl Replies {
    pub(super) async fn on_reply(&mut self, kind: reply::Kind, output: &mut Option<Output>) -> Result<(), CallError> {
        match kind {
            reply::Kind::Heartbeat(h) => {
                self.heartbeats += 1;
                self.phase = Some(Phase::try_from(h.phase).unwrap_or(Phase::Unspecified));
                self.report(&Progress::Heartbeat(h));
            }
            reply::Kind::Result(r) => {
                if self.result.is_some() {
                    return Err(CallError::new(ErrorKind::Protocol, tonic::Code::Internal, "a second result"));
                }
                self.phase = Some(Phase::Sending);
                self.report(&Progress::Result { payload: r.payload_size });
                if let Some(size) = r.payload_size {
                    let encoding = proto::Encoding::codec(r.encoding).ok_or_else(|| {
                        CallError::new(
                            ErrorKind::Protocol,
                            tonic::Code::Internal,
                            format!("unknown result encoding {}", r.encoding),
                        )
                    })?;
                    let out = output.take().unwrap_or(Output::Discard);
                    self.sink = Some(Sink::start(out, encoding, size, self.progress.clone())?);
                }
                self.result = Some((r.json, r.payload_size));
            }
            reply::Kind::Data(bytes) => match &mut self.sink {
                Some(sink) => sink.push(bytes).await?,
                None => {
                    return Err(CallError::new(
                        ErrorKind::Protocol,
                        tonic::Code::Internal,
                        "result data without a result",
                    ));
                }
            },
        }
        Ok(())
    }

    pub(super) async fn finish(&mut self) -> Result<(Bytes, Option<u64>), CallError> {
        let Some(result) = self.result.clone() else {
            return Err(CallError::new(
                ErrorKind::Protocol,
                tonic::Code::Internal,
                "the server ended the call without a result",
            ));
        };
        if let Some(sink) = &mut self.sink {
            sink.finish().await?;
        }
        Ok(result)
    }

    pub(super) fn report(&self, p: &Progress) {
        if let Some(f) = &self.progress {
            f(p);
        }
    }
}

/// A result payload must have the size its result announced.
pub(super) fn check_result_size(decoded: u64, size: u64) -> Result<(), CallError> {
    if decoded == size {
        return Ok(());
    }
    Err(CallError::new(
        ErrorKind::Status,
        tonic::Code::DataLoss,
        format!("the result payload has {decoded} bytes, not the {size} announced"),
    ))
}

/// Decodes the result payload into the output as it arrives, through the
/// codec's bridge.
pub(super) struct Sink {
    pub(super) decode: Option<DecodeSink<Box<dyn Write + Send>>>,
    /// What completes the output once the payload is whole.
    pub(super) finish: Option<Finish>,
    pub(super) size: u64,
    pub(super) progress: Option<ProgressFn>,
    /// The output file, so a failed attempt can remove its `.part` file and
    /// a retry can write the same path again.
    pub(super) path: Option<PathBuf>,
    pub(super) done: Option<Output>,
}

impl Sink {
    pub(super) fn start(
        output: Output,
        encoding: Encoding,
        size: u64,
        progress: Option<ProgressFn>,
    ) -> Result<Self, CallError> {
        let path = match &output {
            Output::File(p) => Some(p.clone()),
            _ => None,
        };
        // A writer is bridged with SyncIoBridge, which must not run on the
        // async task: never in line.
        let inline = bridge::inline(Some(size)) && !matches!(output, Output::Writer(_));
        let (writer, finish): (Box<dyn Write + Send>, Finish) = match output {
            Output::Discard => (Box::new(io::sink()), Finish::Discard),
            Output::File(path) => {
                let part = part_path(&path);
                let file = std::fs::File::create(&part)
                    .map_err(|e| CallError::local(format!("cannot create {}: {e}", part.display())))?;
                (Box::new(file), Finish::Rename { part, path })
            }
            Output::Writer(w) => (Box::new(SyncIoBridge::new(w)), Finish::Writer),
        };
        let decoder =
            StreamDecoder::new(writer, encoding, size).map_err(|e| CallError::local(format!("zstd decoder: {e}")))?;
        Ok(Self {
            decode: Some(DecodeSink::new(decoder, inline)),
            finish: Some(finish),
            size,
            progress,
            path,
            done: None,
        })
    }

    pub(super) async fn push(&mut self, chunk: Bytes) -> Result<(), CallError> {
        let Some(decode) = &mut self.decode else { return Ok(()) };
        if !decode.push(chunk).await {
            // The decoder stopped: finishing says why.
            return self.finish().await;
        }
        if let Some(f) = &self.progress {
            f(&Progress::Received { bytes: decode.decoded(), total: Some(self.size) });
        }
        Ok(())
    }

    pub(super) async fn finish(&mut self) -> Result<(), CallError> {
        let (Some(decode), Some(finish)) = (self.decode.take(), self.finish.take()) else { return Ok(()) };
        let size = self.size;
        let completed = decode
            .finish(move |mut writer, decoded| {
                check_result_size(decoded, size)?;
                writer.flush().map_err(|e| CallError::local(format!("writing the result payload: {e}")))?;
                drop(writer);
                finish.complete()
            })
            .await
            .map_err(|e| CallError::local(format!("result payload: {e}")))
            .and_then(|r| r);
        match completed {
            Ok(output) => {
                self.done = Some(output);
                if let Some(f) = &self.progress {
                    f(&Progress::Received { bytes: size, total: Some(size) });
                }
                Ok(())
            }
            Err(e) => {
                self.remove_part();
                Err(e)
            }
        }
    }

    pub(super) fn remove_part(&self) {
        if let Some(path) = &self.path {
            let _ = std::fs::remove_file(part_path(path));
        }
    }

    /// What a later attempt writes to.
    pub(super) fn into_output(mut self) -> Output {
        if self.done.is_none() {
            // Unfinished: stop decoding and leave no partial file.
            self.decode = None;
            self.remove_part();
        }
        self.done.take().or_else(|| self.path.take().map(Output::File)).unwrap_or(Output::Discard)
    }
}

pub(super) enum Finish {
    Discard,
    Rename { part: PathBuf, path: PathBuf },
    Writer,
}

impl Finish {
    /// Completes the output and hands back what a retry would reuse.
    pub(super) fn complete(self) -> Result<Output, CallError> {
        match self {
            Self::Discard | Self::Writer => Ok(Output::Discard),
            Self::Rename { part, path } => {
                std::fs::rename(&part, &path).map_err(|e| {
                    CallError::local(format!("cannot move {} to {}: {e}", part.display(), path.display()))
                })?;
                Ok(Output::File(path))
            }
        }
    }
}

pub(super) fn part_path(path: &std::path::Path) -> PathBuf {
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".part");
    path.with_file_name(name)
}
