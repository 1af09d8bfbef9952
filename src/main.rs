//! The `keyward` binary: parse the command line, run it, map the outcome to an exit code
//! (0 ok, 1 user error, 2 internal error) with one sentence on stderr.

use clap::Parser;

fn main() {
    let cli = keyward::cli::Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match keyward::app::runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("keyward: cannot start the async runtime: {e}");
            std::process::exit(2);
        }
    };
    let code = match runtime.block_on(keyward::cli::run(cli)) {
        Ok(()) => 0,
        Err(failure) => {
            eprintln!("keyward: {}", failure.message);
            failure.code
        }
    };
    drop(runtime);
    std::process::exit(code);
}
