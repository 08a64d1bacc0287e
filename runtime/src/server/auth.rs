//! Bearer-token authentication: `--auth-token-file` lists the accepted
//! tokens, one a line, each optionally limited to some functions. Checked
//! before a call's header is read (no function-name oracle), compared in
//! constant time by their SHA-256 digests, re-read when the file changes
//! (a mounted Secret rotates), and never logged.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    sync::Arc,
};

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::{
    error::{Error, Result},
    server::reload::{Reloading, read_credential},
};

/// One accepted token: its digest and the functions it may call (`None`:
/// all).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    digest: [u8; 32],
    functions: Option<BTreeSet<String>>,
}

/// Who a call authenticated as: the functions it may call, and a name for
/// its token (a digest, never the token) that owns its retained calls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Identity {
    functions: Option<BTreeSet<String>>,
    owner: std::sync::Arc<str>,
}

impl Identity {
    /// Whether this identity may call `func`.
    pub(crate) fn may_call(&self, func: &str) -> bool {
        self.functions.as_ref().is_none_or(|f| f.contains(func))
    }

    /// The owner key of this token's retained calls.
    pub(crate) fn owner(&self) -> std::sync::Arc<str> {
        std::sync::Arc::clone(&self.owner)
    }
}

/// The accepted tokens, as last read from the file.
#[derive(Debug)]
pub(crate) struct Auth {
    path: PathBuf,
    entries: Arc<Reloading<Vec<Entry>>>,
}

impl Auth {
    /// Reads the token file; a missing, unreadable, empty or malformed file
    /// is a start-up error naming the line (never the token).
    pub(crate) fn load(path: &Path) -> Result<Self> {
        let entries = Reloading::load("auth tokens", vec![path.to_owned()], || read(path))?;
        Ok(Self { path: path.to_owned(), entries: Arc::new(entries) })
    }

    /// The identity of `authorization` (the metadata's value), or
    /// UNAUTHENTICATED. Every token is compared, in constant time, whatever
    /// matches.
    pub(crate) fn check(&self, authorization: Option<&[u8]>) -> Result<Identity> {
        let presented = authorization.and_then(bearer).ok_or_else(unauthenticated)?;
        let digest: [u8; 32] = Sha256::digest(presented).into();
        let entries = self.entries.get();
        let mut found = None;
        for entry in entries.iter() {
            if constant_time_eq(&entry.digest, &digest) && found.is_none() {
                let owner = entry.digest.iter().map(|b| format!("{b:02x}")).collect::<String>();
                found = Some(Identity { functions: entry.functions.clone(), owner: format!("token:{owner}").into() });
            }
        }
        found.ok_or_else(unauthenticated)
    }

    /// Re-reads the file every second when its modification time or size
    /// changed, failing closed ([`reread`]): an emptied or deleted file
    /// revokes every token.
    pub(crate) async fn watch(self: Arc<Self>) {
        let path = self.path.clone();
        Arc::clone(&self.entries).watch(move || reread(&path)).await;
    }
}

fn unauthenticated() -> Error {
    Error::Unauthenticated
}

/// The token of an `authorization: Bearer TOKEN` value.
fn bearer(value: &[u8]) -> Option<&[u8]> {
    let rest = value.strip_prefix(b"Bearer ").or_else(|| value.strip_prefix(b"bearer "))?;
    let token = rest.trim_ascii();
    (!token.is_empty()).then_some(token)
}

/// Digest equality in constant time (`subtle`, which rustls uses too).
fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    bool::from(a.ct_eq(b))
}

/// Parses the token file at start-up: `TOKEN [FUNC,FUNC…]` per line, `#`
/// comments. An empty or malformed file is an error naming the line.
fn read(path: &Path) -> Result<Vec<Entry>> {
    let config = |m: String| Error::Config(format!("--auth-token-file {}: {m}", path.display()));
    let text = read_text(path)?;
    let entries = parse(&text).map_err(config)?;
    if entries.is_empty() {
        return Err(config("no tokens (one a line: TOKEN [FUNC,FUNC…]; # comments)".to_owned()));
    }
    Ok(entries)
}

/// Re-reads the token file after a change, failing closed: a missing,
/// unreadable or emptied file means no token is valid any more, and a malformed line is
/// skipped (logged by number, never the token) while the other lines take
/// effect — a rotation with a typo never keeps revoked tokens valid.
fn reread(path: &Path) -> Result<Vec<Entry>> {
    let text = match read_text(path) {
        Ok(text) => text,
        Err(e) => {
            // Gone, unreadable, not a regular file: no token holds.
            tracing::warn!(error = %e, "--auth-token-file cannot be read: no token is accepted until it can");
            String::new()
        }
    };
    let mut entries = Vec::new();
    for (i, line) in text.lines().enumerate() {
        match parse(line) {
            Ok(parsed) => entries.extend(parsed),
            Err(e) => tracing::error!(
                file = %path.display(),
                "--auth-token-file line {} is malformed and skipped ({}); the other lines take effect",
                i + 1,
                e.trim_start_matches("line 1: ")
            ),
        }
    }
    if entries.is_empty() {
        tracing::warn!(file = %path.display(), "--auth-token-file holds no token: every call is refused");
    }
    Ok(entries)
}

fn read_text(path: &Path) -> Result<String> {
    let bytes = read_credential("--auth-token-file", path)?;
    String::from_utf8(bytes).map_err(|_| Error::Config(format!("--auth-token-file {}: not UTF-8 text", path.display())))
}

fn parse(text: &str) -> std::result::Result<Vec<Entry>, String> {
    let mut entries = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split_once('#').map_or(line, |(before, _)| before).trim();
        if line.is_empty() {
            continue;
        }
        let (token, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
        let rest = rest.trim();
        let functions = if rest.is_empty() {
            None
        } else {
            let items: Vec<&str> = rest.split(',').map(str::trim).collect();
            if items.iter().any(|f| f.contains(char::is_whitespace)) {
                return Err(format!("line {}: expected TOKEN [FUNC,FUNC…], found more words", i + 1));
            }
            let set: BTreeSet<String> = items.into_iter().filter(|f| !f.is_empty()).map(str::to_owned).collect();
            if set.is_empty() {
                return Err(format!("line {}: an empty function list", i + 1));
            }
            Some(set)
        };
        if token.len() < 16 {
            return Err(format!("line {}: tokens must be at least 16 characters", i + 1));
        }
        entries.push(Entry { digest: Sha256::digest(token.as_bytes()).into(), functions });
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "tok-aaaaaaaaaaaaaaaa";
    const B: &str = "tok-bbbbbbbbbbbbbbbb";

    fn auth(text: &str) -> Auth {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("tokens");
        std::fs::write(&path, text).expect("write");
        let auth = Auth::load(&path).expect("load");
        drop(dir);
        auth
    }

    #[test]
    fn tokens_with_and_without_function_lists() {
        let a = auth(&format!("# comment\n{A}\n\n{B}  predict, explain  # only these\n"));
        assert!(a.check(Some(format!("Bearer {A}").as_bytes())).expect("a").may_call("train"));
        let b = a.check(Some(format!("Bearer {B}").as_bytes())).expect("b");
        assert!(b.may_call("predict") && b.may_call("explain") && !b.may_call("train"));
        for bad in [None, Some("Bearer".as_bytes()), Some(b"Bearer "), Some(b"Basic abc"), Some(A.as_bytes())] {
            assert!(matches!(a.check(bad), Err(Error::Unauthenticated)), "{bad:?}");
        }
        assert!(matches!(a.check(Some(b"Bearer tok-aaaaaaaaaaaaaaab")), Err(Error::Unauthenticated)));
    }

    #[test]
    fn malformed_files_name_the_line_not_the_token() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("tokens");
        for (text, want) in [
            ("short\n".to_owned(), "line 1: tokens must be at least 16"),
            (format!("{A} a,b extra\n"), "line 1: expected TOKEN"),
            (format!("\n{A} ,\n"), "line 2: an empty function list"),
            ("# only a comment\n".to_owned(), "no tokens"),
        ] {
            std::fs::write(&path, &text).expect("write");
            let msg = Auth::load(&path).expect_err("malformed").to_string();
            assert!(msg.contains(want) && msg.contains("--auth-token-file"), "{msg}");
            assert!(!msg.contains(A), "the token leaked: {msg}");
        }
        assert!(Auth::load(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn constant_time_eq_compares_every_byte() {
        let x = [7u8; 32];
        let mut y = x;
        assert!(constant_time_eq(&x, &y));
        y[31] ^= 1;
        assert!(!constant_time_eq(&x, &y));
    }
}
