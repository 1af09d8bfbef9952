//! Reading the files an operator names: the policy, `file:` credentials, certificates and the
//! CA key.
//!
//! SECURITY: each is read only when it is a regular file, looked at before it is opened
//! (opening a FIFO or a device has effects of its own) and opened without blocking (in case
//! one was swapped in since: a FIFO would hold the read, and with it startup, a reload or a
//! credential check), and only up to a limit (`/dev/zero`, or a log file named by mistake,
//! must not fill memory, least of all in a reload of a running proxy).

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

/// Why a file could not be read. Messages name no byte of the file.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("not a regular file")]
    NotAFile,
    #[error("larger than {}", size(*.0))]
    TooLarge(u64),
}

impl ReadError {
    /// The `io::ErrorKind` that stands for it, for callers that report kinds.
    pub fn kind(&self) -> io::ErrorKind {
        match self {
            ReadError::Io(e) => e.kind(),
            ReadError::NotAFile => io::ErrorKind::InvalidInput,
            ReadError::TooLarge(_) => io::ErrorKind::InvalidData,
        }
    }
}

impl From<ReadError> for io::Error {
    fn from(e: ReadError) -> io::Error {
        match e {
            ReadError::Io(e) => e,
            other => io::Error::new(other.kind(), other.to_string()),
        }
    }
}

/// `limit` in the unit an operator would write it in.
fn size(limit: u64) -> String {
    const KIB: u64 = 1024;
    const MIB: u64 = 1024 * KIB;
    match limit {
        l if l >= MIB && l % MIB == 0 => format!("{} MiB", l / MIB),
        l if l >= KIB && l % KIB == 0 => format!("{} KiB", l / KIB),
        l => format!("{l} bytes"),
    }
}

/// Opens `path` for reading when it is a regular file, before and after opening.
pub fn open_regular(path: &Path) -> Result<File, ReadError> {
    use std::os::unix::fs::OpenOptionsExt;
    if !std::fs::metadata(path)?.is_file() {
        return Err(ReadError::NotAFile);
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(ReadError::NotAFile);
    }
    Ok(file)
}

/// Appends all of `file` to `into`, failing past `limit` bytes. A caller reading a secret
/// passes a buffer that wipes itself, with room made beforehand, so that no copy left behind
/// by a reallocation holds its bytes.
pub fn read_bounded(file: File, limit: u64, into: &mut Vec<u8>) -> Result<(), ReadError> {
    file.take(limit.saturating_add(1)).read_to_end(into)?;
    if into.len() as u64 > limit {
        return Err(ReadError::TooLarge(limit));
    }
    Ok(())
}

/// `open_regular` then `read_bounded`.
pub fn read_regular(path: &Path, limit: u64, into: &mut Vec<u8>) -> Result<(), ReadError> {
    read_bounded(open_regular(path)?, limit, into)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_regular_file_within_the_limit_is_read_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"0123456789").unwrap();
        let mut buf = Vec::new();
        read_regular(&path, 10, &mut buf).unwrap();
        assert_eq!(buf, b"0123456789");
    }

    #[test]
    fn a_file_over_the_limit_is_refused_with_the_limit_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![b'x'; 2049]).unwrap();
        let err = read_regular(&path, 2048, &mut Vec::new()).unwrap_err();
        assert!(matches!(err, ReadError::TooLarge(2048)), "{err}");
        assert_eq!(err.to_string(), "larger than 2 KiB");
        assert_eq!(
            ReadError::TooLarge(4 << 20).to_string(),
            "larger than 4 MiB"
        );
        assert_eq!(
            ReadError::TooLarge(1000).to_string(),
            "larger than 1000 bytes"
        );
    }

    #[test]
    fn devices_directories_and_fifos_are_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        rustix::fs::mkfifoat(rustix::fs::CWD, &fifo, rustix::fs::Mode::RUSR).unwrap();
        for path in [Path::new("/dev/zero"), dir.path(), &fifo] {
            let err = read_regular(path, 1 << 20, &mut Vec::new()).unwrap_err();
            assert!(
                matches!(err, ReadError::NotAFile),
                "{}: {err}",
                path.display()
            );
            assert_eq!(io::Error::from(err).kind(), io::ErrorKind::InvalidInput);
        }
    }

    #[test]
    fn a_missing_file_keeps_its_io_error() {
        let err = read_regular(Path::new("/nonexistent/keyward"), 10, &mut Vec::new()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }
}
