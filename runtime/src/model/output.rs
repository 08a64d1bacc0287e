//! What a model may answer with besides its JSON: a result payload, in
//! memory or in a file it wrote to its call's output directory.

use std::{
    fmt, io,
    path::{Path, PathBuf},
    sync::Arc,
};

use bytes::Bytes;

use crate::model::spool::Entries;

/// A result payload.
#[derive(Clone, PartialEq, Eq)]
pub enum ResultPayload {
    /// A file inside the call's [`OutputDir`], or the call's input file
    /// itself ([`crate::Input::into_result`]).
    File(PathBuf),
    /// Bytes the model holds: sent from memory, nothing written to disk.
    /// For small results; a large one is better written to a file.
    Bytes(Bytes),
}

impl From<PathBuf> for ResultPayload {
    fn from(path: PathBuf) -> Self {
        Self::File(path)
    }
}

impl From<Bytes> for ResultPayload {
    fn from(bytes: Bytes) -> Self {
        Self::Bytes(bytes)
    }
}

impl From<Vec<u8>> for ResultPayload {
    fn from(bytes: Vec<u8>) -> Self {
        Self::Bytes(bytes.into())
    }
}

impl fmt::Debug for ResultPayload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::File(path) => f.debug_tuple("File").field(path).finish(),
            Self::Bytes(bytes) => write!(f, "Bytes({} bytes)", bytes.len()),
        }
    }
}

/// Where a model may write a result payload file. The directory does not
/// exist until the model creates it ([`OutputDir::create`]): most calls
/// write none, and a call that never asked for it costs no file-system call.
/// Removed with everything in it after the call.
pub struct OutputDir {
    entries: Arc<Entries>,
}

impl OutputDir {
    pub(crate) fn new(entries: Arc<Entries>) -> Self {
        Self { entries }
    }

    /// The directory's path (it may not exist yet).
    pub fn path(&self) -> &Path {
        self.entries.output()
    }

    /// Creates the directory if needed and returns its path.
    pub fn create(&self) -> io::Result<&Path> {
        let path = self.entries.output();
        std::fs::create_dir_all(path)?;
        Ok(path)
    }
}

impl fmt::Debug for OutputDir {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OutputDir").finish_non_exhaustive()
    }
}
