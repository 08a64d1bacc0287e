//! A call's input as the model sees it: the decoded payload, held in memory
//! when it is small (no spool file, no file-system call) or spooled to a
//! file when it is large — with a file path made on demand for models that
//! need one.

use std::{
    fmt,
    fs::File,
    io::{self, Read},
    path::Path,
    sync::Arc,
};

use bytes::Bytes;

use crate::{model::output::ResultPayload, model::spool::Entries};

/// The call's decoded payload.
///
/// Small payloads (a declared size up to 256 KiB, within the server's
/// `--memory-payload-budget`) arrive in memory: [`Input::in_memory`] gives
/// them without a copy, and [`Input::path`] writes them to the spool only
/// when a model asks for a path. Larger payloads, retained calls and calls
/// whose client did not declare a size are spooled to a file as they arrive.
/// [`Input::open`] and [`Input::read`] work either way.
pub struct Input {
    held: Held,
    entries: Arc<Entries>,
}

enum Held {
    Memory(Bytes),
    File,
}

impl Input {
    /// The payload: `memory` when it arrived in memory (empty when there
    /// was none, or when the function's tap consumed it), else `None`: it
    /// is in the call's input file.
    pub(crate) fn new(memory: Option<Bytes>, entries: Arc<Entries>) -> Self {
        Self { held: memory.map_or(Held::File, Held::Memory), entries }
    }

    /// The payload's bytes when the runtime holds them in memory; `None`
    /// when it is on disk (use [`Input::open`] or [`Input::path`]).
    pub fn in_memory(&self) -> Option<&Bytes> {
        match &self.held {
            Held::Memory(bytes) => Some(bytes),
            Held::File => None,
        }
    }

    /// A reader over the payload, from memory or from its file.
    pub fn open(&self) -> io::Result<Box<dyn Read + Send>> {
        match &self.held {
            Held::Memory(bytes) => Ok(Box::new(io::Cursor::new(bytes.clone()))),
            Held::File => Ok(Box::new(File::open(self.entries.input())?)),
        }
    }

    /// The whole payload as bytes: without a copy when it is in memory, read
    /// from its file (blocking) when not — only for payloads known to be
    /// small enough to hold whole.
    pub fn read(&self) -> io::Result<Bytes> {
        match &self.held {
            Held::Memory(bytes) => Ok(bytes.clone()),
            Held::File => std::fs::read(self.entries.input()).map(Bytes::from),
        }
    }

    /// A path to the payload on disk, for models that need a file. A payload
    /// held in memory is written to the spool on the first ask (a blocking
    /// write of at most 256 KiB). The file is removed when the call ends;
    /// asking after that is an error.
    pub fn path(&self) -> io::Result<&Path> {
        if let Held::Memory(bytes) = &self.held {
            self.entries.materialise_input(bytes)?;
        }
        Ok(self.entries.input())
    }

    /// The payload as a result payload — `echo` sends its input back: the
    /// same bytes or the same file, nothing copied.
    pub fn into_result(self) -> ResultPayload {
        match self.held {
            Held::Memory(bytes) => ResultPayload::Bytes(bytes),
            Held::File => ResultPayload::File(self.entries.input().to_owned()),
        }
    }
}

impl fmt::Debug for Input {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.held {
            Held::Memory(bytes) => f.debug_struct("Input").field("in_memory", &bytes.len()).finish(),
            Held::File => f.debug_struct("Input").field("file", &self.entries.input()).finish(),
        }
    }
}
