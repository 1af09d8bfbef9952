//! The `keyward` binary: parse the command line, run it, map the outcome to an exit code
//! (0 ok, 1 user error, 2 internal error) with one sentence on stderr.

use std::io::Write as _;

use clap::Parser;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

// mimalloc: a proxy allocates and frees many small buffers per request on every worker; the
// system allocator's arenas cost several percent of a core under load (see benches/README.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Turns transparent huge pages off for this process, on kernels that give them to every
/// large mapping (`always`; mimalloc is built not to ask for them, `no_thp`, for `madvise`).
///
/// With huge pages a few KiB touched in a 2 MiB region make all of it resident: 2,000 idle
/// intercepted connections held 114 MiB instead of 80, and an idle keyward 26 MiB instead of
/// 11 (`benches/README.md`, "Huge pages").
fn keep_small_pages() {
    // A kernel without the flag (before 3.15) keeps its default: nothing to report.
    #[cfg(target_os = "linux")]
    let _ = rustix::thread::disable_transparent_huge_pages(true);
}

fn main() {
    keep_small_pages();
    let cli = match keyward::cli::Cli::try_parse() {
        Ok(cli) => cli,
        // `--help` and `--version` succeed; a usage mistake is a user error (SPEC §6: exit 1),
        // not clap's default 2, which keyward keeps for internal errors.
        Err(e) if e.use_stderr() => {
            let line = keyward::cli::usage_mistake(&e);
            let _ = writeln!(std::io::stderr(), "keyward: {line}");
            std::process::exit(1);
        }
        Err(e) => {
            let _ = e.print();
            std::process::exit(0);
        }
    };
    // `serve` narrates its life at info; one-shot commands speak only to fail (one sentence).
    let default_level = match cli.command {
        keyward::cli::Command::Serve { .. } => "info",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        // Escape codes only for a person at a terminal, never into log files or collectors.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        // A line that cannot be written (stderr closed) is dropped; reporting that with
        // `eprintln!` to the same closed stderr would panic and turn the exit code into 101.
        .log_internal_errors(false)
        .finish()
        .with(tracing_subscriber::filter::filter_fn(|meta| {
            keyward::app::wire_safe(meta.target(), meta.level())
        }))
        .init();
    let workers = match keyward::app::workers() {
        Ok(n) => n,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "keyward: {e}");
            std::process::exit(1);
        }
    };
    let runtime = match keyward::app::runtime(workers) {
        Ok(rt) => rt,
        Err(e) => {
            let _ = writeln!(
                std::io::stderr(),
                "keyward: cannot start the async runtime: {e}"
            );
            std::process::exit(2);
        }
    };
    let code = match runtime.block_on(keyward::cli::run(cli)) {
        Ok(()) => 0,
        Err(failure) => {
            // Not `eprintln!`: a closed stderr must not turn the exit code into a panic's 101.
            if !failure.message.is_empty() {
                let _ = writeln!(std::io::stderr(), "keyward: {}", failure.message);
            }
            failure.code
        }
    };
    // Tasks still held are dropped (their destructors run); a blocking thread stuck on a hung
    // file system (a `file:` credential's check) is not waited for.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    std::process::exit(code);
}
