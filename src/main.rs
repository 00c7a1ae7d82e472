//! The command line: parse flags, set up logging, run the node (or the
//! `bench` load generator).

use std::process::ExitCode;

use clap::Parser;
use cockatiel::config::{BenchArgs, Cli, Command};

fn main() -> ExitCode {
    let mut cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("cockatiel: {}", one_line(&e.to_string()));
            return ExitCode::from(2);
        }
    };
    if let Some(Command::Bench(args)) = cli.command.take() {
        return bench(args);
    }
    cli.env_token = match std::env::var("COCKATIEL_TOKEN") {
        Ok(token) => Some(token),
        Err(std::env::VarError::NotPresent) => None,
        Err(std::env::VarError::NotUnicode(_)) => {
            eprintln!("cockatiel: COCKATIEL_TOKEN is not valid UTF-8");
            return ExitCode::from(2);
        }
    };
    let config = match cli.into_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cockatiel: {e}");
            return ExitCode::from(2);
        }
    };
    let level = match config.verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("cockatiel={level},warn")));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cockatiel: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The handlers are in place before anything starts, so that a stop at
    // any moment of the start is a clean one (exit 0).
    let stop = {
        let _in_runtime = runtime.enter();
        stop_signals()
    };
    let result = runtime.block_on(cockatiel::run(config, stop));
    // Blocking file work still running is cut after a bound; a cut upload
    // leaves only a temp file, which the next start removes.
    runtime.shutdown_timeout(std::time::Duration::from_secs(5));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cockatiel: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `cockatiel bench`: run the load generator, print its figures; exit 1
/// when any request failed.
fn bench(args: BenchArgs) -> ExitCode {
    let config = match args.into_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cockatiel bench: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cockatiel bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    say(&format!(
        "cockatiel bench: {} files of {} bytes, {} in flight, against {}\n",
        config.files,
        config.size,
        config.concurrency,
        config.urls.join(" ")
    ));
    match runtime.block_on(cockatiel::bench::run(config)) {
        Ok(report) => {
            say(&report.to_string());
            if report.errors() > 0 {
                eprintln!("cockatiel bench: {} requests failed", report.errors());
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("cockatiel bench: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Print to stdout; a reader that went away (`| head`) is not an error.
fn say(text: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
}

/// Install the SIGTERM and SIGINT handlers now; the future resolves on
/// either.
fn stop_signals() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate()).ok();
    let int = signal(SignalKind::interrupt()).ok();
    async move {
        let wait = |s: Option<tokio::signal::unix::Signal>| async move {
            match s {
                Some(mut s) => {
                    s.recv().await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = wait(term) => {}
            () = wait(int) => {}
        }
    }
}

/// A clap error in one line: its first paragraph (some list what they
/// refer to on the lines below the first), without usage and tips.
fn one_line(text: &str) -> String {
    let first: Vec<&str> = text
        .lines()
        .take_while(|l| !l.trim().is_empty())
        .map(str::trim)
        .collect();
    let joined = first.join(" ");
    let line = joined.trim_start_matches("error: ").trim();
    if line.is_empty() {
        "invalid arguments".to_string()
    } else {
        line.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::one_line;

    #[test]
    fn clap_errors_in_one_line() {
        let listed = "error: the subcommand 'x' cannot be used with:\n  --port <PORT>\n  --storage <STORAGE>\n\nUsage: cockatiel [OPTIONS]\n";
        assert_eq!(
            one_line(listed),
            "the subcommand 'x' cannot be used with: --port <PORT> --storage <STORAGE>"
        );
        let tipped = "error: unexpected argument '--bogus' found\n\n  tip: to pass '--bogus' as a value, use '-- --bogus'\n";
        assert_eq!(one_line(tipped), "unexpected argument '--bogus' found");
        assert_eq!(one_line(""), "invalid arguments");
    }
}
