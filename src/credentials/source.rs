//! Reading a secret from its source: `env:`, `file:` (a regular file, bounded) or `exec:` (a
//! command in its own process group, bounded in time and output). Errors name the source,
//! never anything it read.

use std::path::Path;
use std::time::Duration;

use crate::policy::SecretSource;
use crate::secret::Secret;

const EXEC_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a command's output may stay open after the command exited (held by a process it
/// started), before what was printed is taken as the value.
const EXEC_LEFTOVER_GRACE: Duration = Duration::from_millis(200);
/// The longest secret a file or a command may hold; more is an error, not a value.
const MAX_SECRET_BYTES: u64 = 64 * 1024;

/// Why a source gave no value, for the operator. Names the source (a variable, a path, a
/// command's program), never anything it read, nor a command's arguments or output; a part
/// of the name that looks like a pasted credential is shown `(hidden)` (`hidden`).
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("environment variable {name} is not set", name = hidden(.0))]
    EnvUnset(String),
    #[error("environment variable {name} is not valid UTF-8", name = hidden(.0))]
    EnvNotUnicode(String),
    #[error("environment variable {name} is empty", name = hidden(.0))]
    EnvEmpty(String),
    #[error("file {name} cannot be read: {1}", name = hidden(.0))]
    File(String, std::io::ErrorKind),
    #[error("file {name} is empty", name = hidden(.0))]
    FileEmpty(String),
    #[error("{name} holds a line break or another control character inside its value (more than one line?)", name = hidden(.0))]
    ControlInValue(String),
    #[error("{name} is not a regular file", name = hidden(.0))]
    NotAFile(String),
    #[error("file {name} holds more than {1} bytes: not a secret", name = hidden(.0))]
    FileTooLong(String, u64),
    #[error("`exec` has no command")]
    ExecNone,
    #[error("command `{name}` could not be run: {1}", name = hidden(.0))]
    ExecSpawn(String, std::io::ErrorKind),
    #[error("command `{name}` did not finish within {1} s", name = hidden(.0))]
    ExecTimeout(String, u64),
    #[error("command `{name}` failed ({1})", name = hidden(.0))]
    ExecFailed(String, std::process::ExitStatus),
    #[error("command `{name}` printed nothing (or only a line break)", name = hidden(.0))]
    ExecEmpty(String),
    #[error("command `{name}` printed text that is not UTF-8", name = hidden(.0))]
    ExecNotUtf8(String),
    #[error("command `{name}` printed more than {1} bytes: not a secret", name = hidden(.0))]
    ExecTooLong(String, u64),
}

fn hidden(name: &str) -> std::borrow::Cow<'_, str> {
    crate::policy::hide_pasted_parts(name)
}

/// Reads a secret from its source.
pub async fn read_source(source: &SecretSource) -> Result<Secret, SourceError> {
    match source {
        SecretSource::Env(name) => match std::env::var(name) {
            Ok(v) => one_line(
                trimmed(v).ok_or_else(|| SourceError::EnvEmpty(name.clone()))?,
                || format!("environment variable {name}"),
            ),
            Err(std::env::VarError::NotPresent) => Err(SourceError::EnvUnset(name.clone())),
            Err(std::env::VarError::NotUnicode(_)) => Err(SourceError::EnvNotUnicode(name.clone())),
        },
        SecretSource::File(path) => {
            // Off the runtime: a file on a hung mount must not stall requests while a reload
            // reads it.
            let owned = path.clone();
            tokio::task::spawn_blocking(move || read_file(&owned))
                .await
                .unwrap_or_else(|_| {
                    Err(SourceError::File(
                        path.display().to_string(),
                        std::io::ErrorKind::Other,
                    ))
                })
        }
        SecretSource::Exec { argv } => read_exec(argv).await,
    }
}

pub(super) fn read_file(path: &Path) -> Result<Secret, SourceError> {
    use crate::files::ReadError;
    let shown = || path.display().to_string();
    let mut bytes = zeroize::Zeroizing::new(Vec::with_capacity(4096));
    crate::files::read_regular(path, MAX_SECRET_BYTES, &mut bytes).map_err(|e| match e {
        ReadError::NotAFile => SourceError::NotAFile(shown()),
        ReadError::TooLarge(limit) => SourceError::FileTooLong(shown(), limit),
        ReadError::Io(e) => SourceError::File(shown(), e.kind()),
    })?;
    let text = String::from_utf8(std::mem::take(&mut *bytes)).map_err(|e| {
        zeroize::Zeroize::zeroize(&mut e.into_bytes());
        SourceError::File(shown(), std::io::ErrorKind::InvalidData)
    })?;
    let secret = trimmed(text).ok_or_else(|| SourceError::FileEmpty(shown()))?;
    one_line(secret, || format!("file {}", shown()))
}

/// SECURITY: two lines (`A\nB`) cannot go into a header: every request would fail while the
/// credential looked readable. Refused where it is read (at start, reload, refresh and file
/// change), so `/readyz` and the log say why.
fn one_line(secret: Secret, shown: impl FnOnce() -> String) -> Result<Secret, SourceError> {
    let control = |b: u8| (b < 0x20 && b != b'\t') || b == 0x7f;
    match secret.expose().bytes().any(control) {
        true => Err(SourceError::ControlInValue(shown())),
        false => Ok(secret),
    }
}

/// Runs the command in a process group of its own and reads what it prints. It is done when
/// it exits: a process it left holding its output open gets a moment to finish, and then
/// everything left in its group is killed (so is everything after a timeout). A daemon the
/// command starts on purpose leaves the group first (`setsid`), as daemons do.
async fn read_exec(argv: &[String]) -> Result<Secret, SourceError> {
    use tokio::io::AsyncReadExt;
    let (program, args) = argv.split_first().ok_or(SourceError::ExecNone)?;
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| SourceError::ExecSpawn(program.clone(), e.kind()))?;
    let _group = ProcessGroup(child.id());
    let Some(stdout) = child.stdout.take() else {
        return Err(SourceError::ExecSpawn(
            program.clone(),
            std::io::ErrorKind::BrokenPipe,
        ));
    };
    let mut out = zeroize::Zeroizing::new(Vec::with_capacity(4096));
    let run = async {
        let mut bounded = stdout.take(MAX_SECRET_BYTES + 1);
        let mut read = std::pin::pin!(bounded.read_to_end(&mut out));
        tokio::select! {
            status = child.wait() => {
                // What the command printed is in the pipe already.
                let _ = tokio::time::timeout(EXEC_LEFTOVER_GRACE, &mut read).await;
                status
            }
            read = &mut read => {
                // Past the bound, the command is killed (it may print forever).
                if read? as u64 > MAX_SECRET_BYTES {
                    return Ok(None);
                }
                child.wait().await
            }
        }
        .map(Some)
    };
    let status = tokio::time::timeout(EXEC_TIMEOUT, run)
        .await
        .map_err(|_| SourceError::ExecTimeout(program.clone(), EXEC_TIMEOUT.as_secs()))?
        .map_err(|e| SourceError::ExecSpawn(program.clone(), e.kind()))?;
    if status.is_none() || out.len() as u64 > MAX_SECRET_BYTES {
        return Err(SourceError::ExecTooLong(program.clone(), MAX_SECRET_BYTES));
    }
    if let Some(status) = status.filter(|s| !s.success()) {
        return Err(SourceError::ExecFailed(program.clone(), status));
    }
    let text = String::from_utf8(std::mem::take(&mut *out)).map_err(|e| {
        // The bytes read are the secret's, wiped like it.
        zeroize::Zeroize::zeroize(&mut e.into_bytes());
        SourceError::ExecNotUtf8(program.clone())
    })?;
    let secret = trimmed(text).ok_or_else(|| SourceError::ExecEmpty(program.clone()))?;
    one_line(secret, || format!("command `{program}`"))
}

/// A command's process group, killed when the read ends however it ends.
struct ProcessGroup(Option<u32>);

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        let pid = self
            .0
            .and_then(|id| i32::try_from(id).ok())
            .and_then(rustix::process::Pid::from_raw);
        if let Some(pid) = pid {
            // ESRCH (nothing left in the group) is the usual answer.
            let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
        }
    }
}

/// Secrets written by editors and `echo` end in a newline; the newline is never part of a key.
/// Nor are spaces or tabs at either end: an upstream's HTTP parser drops them from the header
/// keyward injects, so the key it uses is the trimmed one, and that is the one the redactor and
/// the egress scan must look for. (The bytes cut stay in the buffer, which wipes all of itself.)
fn trimmed(mut v: String) -> Option<Secret> {
    // Unicode's blanks too (a no-break space pasted from a web console, a byte-order mark):
    // an upstream that trims what it reads and echoes it back would show the bare value.
    let blank = |c: char| c.is_whitespace() || c == '\u{feff}';
    let keep = v.trim_end_matches(blank).len();
    v.truncate(keep);
    let lead = v.len() - v.trim_start_matches(blank).len();
    v.drain(..lead);
    (!v.is_empty()).then(|| Secret::new(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SECURITY: a secret pasted after `file:` or `env:` is a path or a name to keyward, and
    /// the message saying it cannot be read goes to the log: it is not repeated there.
    #[tokio::test]
    async fn a_source_that_is_a_pasted_secret_is_not_repeated_in_its_error() {
        let (file, env) = (
            "sk-live-abcdef1234567890abcdef",
            "ghp_0123456789abcdefghijklmnopq",
        );
        for (source, pasted) in [
            (SecretSource::File(format!("./{file}").into()), file),
            (SecretSource::Env(env.into()), env),
        ] {
            let err = read_source(&source).await.unwrap_err().to_string();
            assert!(err.contains("(hidden)"), "{err}");
            assert!(!err.contains(&pasted[4..]), "{err}");
        }
    }
    use std::time::Instant;

    fn exec(script: &str) -> SecretSource {
        SecretSource::Exec {
            argv: vec!["sh".into(), "-c".into(), script.into()],
        }
    }

    /// Whether process `pid` is gone (or a zombie nobody reaped yet: it runs no more).
    fn ended(pid: &str) -> bool {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => true,
            Ok(stat) => stat
                .rsplit(')')
                .next()
                .is_some_and(|rest| rest.trim_start().starts_with('Z')),
        }
    }

    // A command that leaves a child holding its output open (`cmd &` in a script, a helper
    // that forks) used to be waited for until the 30 s timeout, and the child lived on.
    #[tokio::test]
    async fn an_exec_is_done_when_it_exits_and_what_it_left_running_is_killed() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("pid");
        let script = format!(
            "sleep 60 & echo $! > {}; echo sk_from_exec_123",
            pid_file.display()
        );
        let started = Instant::now();
        let secret = read_source(&exec(&script)).await.unwrap();
        assert_eq!(secret.expose(), "sk_from_exec_123");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );
        let pid = std::fs::read_to_string(&pid_file).unwrap();
        let pid = pid.trim();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !ended(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(ended(pid), "the command's leftover child {pid} still runs");
    }

    // `yes`, or `file:/dev/zero`, must not fill memory: a secret is short.
    #[tokio::test]
    async fn endless_sources_are_an_error_not_a_value() {
        let err = read_source(&exec("yes sk_again")).await.unwrap_err();
        assert!(matches!(err, SourceError::ExecTooLong(..)), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big");
        std::fs::write(&big, vec![b'k'; 1 << 20]).unwrap();
        let err = read_source(&SecretSource::File(big.clone()))
            .await
            .unwrap_err();
        assert!(matches!(err, SourceError::FileTooLong(..)), "{err}");
        assert_eq!(
            err.to_string(),
            format!(
                "file {} holds more than 65536 bytes: not a secret",
                big.display()
            )
        );
    }

    // A FIFO would block the read (and every later check of the file) until someone writes
    // to it; a device or a directory is not a secret either.
    #[tokio::test]
    async fn only_a_regular_file_is_read_and_never_waited_for() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        for path in [fifo, "/dev/zero".into(), dir.path().to_path_buf()] {
            let source = SecretSource::File(path.clone());
            let read = tokio::time::timeout(Duration::from_secs(5), read_source(&source));
            let err = read.await.expect("the read did not wait").unwrap_err();
            assert!(
                matches!(err, SourceError::NotAFile(_) | SourceError::File(..)),
                "{}: {err}",
                path.display()
            );
        }
    }

    #[tokio::test]
    async fn exec_failures_name_the_program_never_the_output() {
        let err = read_source(&exec("echo sk_printed; exit 3"))
            .await
            .unwrap_err();
        assert!(matches!(err, SourceError::ExecFailed(..)), "{err}");
        assert!(!err.to_string().contains("sk_printed"), "{err}");
        let err = read_source(&exec("echo")).await.unwrap_err();
        assert!(matches!(err, SourceError::ExecEmpty(..)), "{err}");
        let err = read_source(&exec("printf 'sk\\377'")).await.unwrap_err();
        assert!(matches!(err, SourceError::ExecNotUtf8(..)), "{err}");
        let err = read_source(&exec("printf 'sk_line_one\\nsk_line_two\\n'"))
            .await
            .unwrap_err();
        assert!(matches!(err, SourceError::ControlInValue(..)), "{err}");
        assert_eq!(
            err.to_string(),
            "command `sh` holds a line break or another control character inside its value (more than one line?)"
        );
        let secret = read_source(&exec("printf 'sk_value\\r\\n'")).await.unwrap();
        assert_eq!(secret.expose(), "sk_value");
    }

    #[test]
    fn blanks_at_either_end_are_not_part_of_a_secret() {
        assert_eq!(trimmed("abc\n".into()).unwrap().expose(), "abc");
        assert!(trimmed("\n".into()).is_none());
        // An upstream reads `X-Api-Key: abc ` as `abc`: the value keyward injects, redacts and
        // scans for is the trimmed one.
        assert_eq!(trimmed(" \tab c \t\r\n".into()).unwrap().expose(), "ab c");
        assert_eq!(
            trimmed("\u{feff}\u{a0}sk_nbsp\u{a0}\u{3000}\n".into())
                .unwrap()
                .expose(),
            "sk_nbsp"
        );
        assert!(trimmed(" \t ".into()).is_none());
    }
}
