//! The command line: flags, their defaults, and the checks that turn them
//! into a `Config`. Owns nothing at run time; never opens files or sockets
//! (except reading `--token-file`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;

use crate::bench::BenchConfig;

/// The server's version, sent in `Server` and `User-Agent`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// A replicating file server: every node keeps every file.
#[derive(Debug, Parser)]
#[command(
    name = "cockatiel",
    version,
    about,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Port to listen on.
    #[arg(short = 'p', long, default_value_t = 8080)]
    pub port: u16,
    /// Address to listen on (0.0.0.0 to serve a network).
    #[arg(short = 'H', long, default_value = "127.0.0.1")]
    pub host: String,
    /// Directory holding the stored files.
    #[arg(long, default_value = "./data")]
    pub storage: PathBuf,
    /// Directory holding the node's state (deletion log, replication queues).
    #[arg(long, default_value = "./queue")]
    pub queue: PathBuf,
    /// This node's own URL; a --node equal to it is skipped.
    #[arg(long)]
    pub url: Option<String>,
    /// A neighbour's URL (repeat for each neighbour).
    #[arg(long = "node")]
    pub nodes: Vec<String>,
    /// HTTP forward proxy for all outgoing replication.
    #[arg(long)]
    pub proxy: Option<String>,
    /// More logging (-v: debug, -vv: trace).
    #[arg(short = 'v', long, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Seconds without body bytes before a PUT gets 408; also how long a
    /// client may take none of an answer before its connection is closed.
    #[arg(long, default_value = "60", value_parser = parse_seconds)]
    pub read_timeout: Duration,
    /// Seconds a client has to send its request headers.
    #[arg(long, default_value = "10", value_parser = parse_seconds)]
    pub header_timeout: Duration,
    /// Largest accepted body (bytes, or with K/M/G/T suffix); unlimited when unset.
    #[arg(long, value_parser = parse_size)]
    pub max_size: Option<u64>,
    /// Largest request head (request line and headers) in bytes; larger gets 431.
    #[arg(long, default_value = "16K", value_parser = parse_size)]
    pub max_header_size: u64,
    /// Memory for copies of small, often read files (bytes or K/M/G); 0 turns it off.
    #[arg(long, default_value = "32M", value_parser = parse_size)]
    pub cache_size: u64,
    /// Most connections served at once; further ones wait to be accepted.
    #[arg(long, default_value_t = 4096)]
    pub max_connections: usize,
    /// Bearer token required for PUT and DELETE [env: COCKATIEL_TOKEN; a
    /// flag, this or --token-file, wins over the environment].
    #[arg(long)]
    pub token: Option<String>,
    /// File whose first line is the token.
    #[arg(long, conflicts_with = "token")]
    pub token_file: Option<PathBuf>,
    /// The token from the environment (`COCKATIEL_TOKEN`), used when neither
    /// flag gives one; the caller fills it in.
    #[arg(skip)]
    pub env_token: Option<String>,
    /// Seconds to connect to a neighbour.
    #[arg(long, default_value = "5", value_parser = parse_seconds)]
    pub connect_timeout: Duration,
    /// Seconds without progress before a replication request is given up and retried.
    #[arg(long, default_value = "30", value_parser = parse_seconds)]
    pub transfer_timeout: Duration,
    /// First retry delay after a failed replication, in seconds (doubles each failure).
    #[arg(long, default_value = "0.5", value_parser = parse_seconds)]
    pub retry_min: Duration,
    /// Longest retry delay, in seconds.
    #[arg(long, default_value = "30", value_parser = parse_seconds)]
    pub retry_max: Duration,
    /// Replication requests in flight per neighbour (as many again while a
    /// neighbour that joined late is sent everything stored and deleted).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub max_in_flight: u16,
    /// Seconds that in-flight requests get to finish on SIGTERM/SIGINT.
    #[arg(long, default_value = "10", value_parser = parse_seconds)]
    pub shutdown_timeout: Duration,
}

/// What else the binary can do besides running a node.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Load-test running nodes: upload files, read them back, delete them,
    /// and print rates and latencies (nothing else is touched).
    Bench(BenchArgs),
}

/// Flags of `cockatiel bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// A node to send requests to; repeat for a cluster (requests go to each in turn).
    #[arg(long = "url", default_value = "http://127.0.0.1:8080")]
    pub urls: Vec<String>,
    /// Files to upload.
    #[arg(long, default_value_t = 1000)]
    pub files: usize,
    /// Size of each file (bytes, or with a K/M/G suffix).
    #[arg(long, default_value = "4K", value_parser = parse_size)]
    pub size: u64,
    /// Requests in flight.
    #[arg(short = 'c', long, default_value_t = 32)]
    pub concurrency: usize,
    /// Seconds the GET phase runs.
    #[arg(long, default_value = "10", value_parser = parse_seconds)]
    pub duration: Duration,
    /// Longest wait, in seconds, for replication to empty every queue.
    #[arg(long, default_value = "120", value_parser = parse_seconds)]
    pub wait: Duration,
    /// Bearer token for PUT and DELETE (also COCKATIEL_TOKEN).
    #[arg(long, env = "COCKATIEL_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Directory the files go to (default: bench-<unix time>-<pid>).
    #[arg(long)]
    pub prefix: Option<String>,
    /// Leave the files in place instead of deleting them at the end.
    #[arg(long)]
    pub keep: bool,
}

/// Most memory `cockatiel bench` may hold in bodies (each request in
/// flight holds one, twice while a read is checked).
const MAX_BENCH_MEMORY: u64 = 1 << 30;

impl BenchArgs {
    /// Check the flags and derive what the load generator does.
    pub fn into_config(self) -> Result<BenchConfig, ConfigError> {
        let mut urls = Vec::new();
        for url in &self.urls {
            let url = normalize_url(url)?;
            if !url.starts_with("http://") {
                return Err(ConfigError::NotHttp(url));
            }
            urls.push(url);
        }
        if self.files == 0 {
            return Err(ConfigError::Zero("files"));
        }
        if self.concurrency == 0 || self.concurrency > 4096 {
            return Err(ConfigError::Bench("--concurrency must be 1 to 4096".into()));
        }
        if self.size.saturating_mul(2 * self.concurrency as u64) > MAX_BENCH_MEMORY {
            return Err(ConfigError::Bench(
                "--size × --concurrency must be at most 512M (bodies are held in memory)".into(),
            ));
        }
        let prefix = self.prefix.unwrap_or_else(|| {
            format!("bench-{}-{}", crate::state::unix_now(), std::process::id())
        });
        let probe = format!("{prefix}/{}.bin", self.files);
        crate::name::check(&probe, crate::name::Purpose::Put)
            .map_err(|e| ConfigError::Bench(format!("--prefix {prefix:?}: {e}")))?;
        if prefix.contains(['%', '?', '#', ' ']) {
            return Err(ConfigError::Bench(format!(
                "--prefix {prefix:?}: use letters, digits, -, _, . and /"
            )));
        }
        Ok(BenchConfig {
            urls,
            files: self.files,
            size: usize::try_from(self.size).unwrap_or(usize::MAX),
            concurrency: self.concurrency,
            duration: self.duration,
            wait: self.wait,
            token: self.token.map(|t| t.trim().to_string()),
            prefix,
            keep: self.keep,
        })
    }
}

/// Validated settings the node runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub port: u16,
    pub host: String,
    pub storage: PathBuf,
    pub queue: PathBuf,
    pub url: Option<String>,
    /// Neighbours, normalised, without this node's own URL, without duplicates.
    pub neighbours: Vec<String>,
    /// Each neighbour as `--node` first gave it (`/_status` names it so).
    pub neighbours_as_given: Vec<String>,
    pub proxy: Option<String>,
    pub verbose: u8,
    pub read_timeout: Duration,
    pub header_timeout: Duration,
    pub max_size: Option<u64>,
    pub max_header_size: usize,
    pub cache_size: u64,
    pub max_connections: usize,
    pub token: Option<String>,
    pub connect_timeout: Duration,
    pub transfer_timeout: Duration,
    pub retry_min: Duration,
    pub retry_max: Duration,
    pub max_in_flight: usize,
    pub shutdown_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid URL {0:?}: expected http://host[:port]")]
    BadUrl(String),
    #[error("{0}: replication speaks plain HTTP; use http:// (TLS belongs to a proxy in front)")]
    NotHttp(String),
    #[error("cannot read --token-file {0}: {1}")]
    TokenFile(PathBuf, std::io::Error),
    #[error("the token is empty")]
    EmptyToken,
    #[error("the token must be printable ASCII: it travels in an HTTP header")]
    TokenNotAscii,
    #[error("--retry-min must not be larger than --retry-max")]
    RetryOrder,
    #[error("--{0} must be larger than zero")]
    Zero(&'static str),
    #[error("--max-header-size must be at least 1K")]
    HeaderSize,
    #[error("{0}")]
    Bench(String),
}

impl Config {
    /// A neighbour (normalised) as `--node` gave it.
    pub fn neighbour_as_given<'a>(&'a self, neighbour: &'a str) -> &'a str {
        self.neighbours
            .iter()
            .position(|n| n == neighbour)
            .and_then(|i| self.neighbours_as_given.get(i))
            .map_or(neighbour, String::as_str)
    }
}

impl Cli {
    /// Check the flags and derive the running configuration.
    pub fn into_config(self) -> Result<Config, ConfigError> {
        let url = self.url.as_deref().map(normalize_url).transpose()?;
        let mut neighbours: Vec<String> = Vec::new();
        let mut neighbours_as_given: Vec<String> = Vec::new();
        for given in &self.nodes {
            let node = normalize_url(given)?;
            if !node.starts_with("http://") && Some(&node) != url.as_ref() {
                return Err(ConfigError::NotHttp(node));
            }
            if Some(&node) != url.as_ref() && !neighbours.contains(&node) {
                neighbours.push(node);
                neighbours_as_given.push(given.trim().to_string());
            }
        }
        let proxy = self.proxy.as_deref().map(normalize_url).transpose()?;
        if let Some(p) = proxy.as_ref().filter(|p| !p.starts_with("http://")) {
            return Err(ConfigError::NotHttp(p.clone()));
        }
        let token = match (self.token, &self.token_file) {
            (Some(t), _) => Some(t.trim().to_string()),
            (None, Some(path)) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| ConfigError::TokenFile(path.clone(), e))?;
                Some(text.lines().next().unwrap_or("").trim().to_string())
            }
            (None, None) => self.env_token.map(|t| t.trim().to_string()),
        };
        if token.as_deref().is_some_and(str::is_empty) {
            return Err(ConfigError::EmptyToken);
        }
        // Any other byte could never be matched: header values are compared as
        // ASCII, and a neighbour could not send it.
        if token
            .as_deref()
            .is_some_and(|t| !t.bytes().all(|b| (b' '..=b'~').contains(&b)))
        {
            return Err(ConfigError::TokenNotAscii);
        }
        if self.retry_min > self.retry_max {
            return Err(ConfigError::RetryOrder);
        }
        for (flag, d) in [
            ("read-timeout", self.read_timeout),
            ("header-timeout", self.header_timeout),
            ("connect-timeout", self.connect_timeout),
            ("transfer-timeout", self.transfer_timeout),
            ("retry-min", self.retry_min),
        ] {
            if d.is_zero() {
                return Err(ConfigError::Zero(flag));
            }
        }
        if self.max_connections == 0 {
            return Err(ConfigError::Zero("max-connections"));
        }
        if self.max_header_size < 1024 {
            return Err(ConfigError::HeaderSize);
        }
        Ok(Config {
            port: self.port,
            host: self.host,
            storage: self.storage,
            queue: self.queue,
            url,
            neighbours,
            neighbours_as_given,
            proxy,
            verbose: self.verbose,
            read_timeout: self.read_timeout,
            header_timeout: self.header_timeout,
            max_size: self.max_size,
            max_header_size: usize::try_from(self.max_header_size).unwrap_or(usize::MAX),
            cache_size: self.cache_size,
            max_connections: self.max_connections,
            token,
            connect_timeout: self.connect_timeout,
            transfer_timeout: self.transfer_timeout,
            retry_min: self.retry_min,
            retry_max: self.retry_max,
            max_in_flight: usize::from(self.max_in_flight),
            shutdown_timeout: self.shutdown_timeout,
        })
    }
}

/// Check a URL and give it one spelling, so that `http://Host:1/` and
/// `http://host:1` name the same node: the URL parser lower-cases the
/// scheme and host (not credentials), drops a default port, and the
/// trailing slash goes.
pub fn normalize_url(url: &str) -> Result<String, ConfigError> {
    let bad = || ConfigError::BadUrl(url.to_string());
    let parsed = reqwest::Url::parse(url.trim()).map_err(|_| bad())?;
    if !matches!(parsed.scheme(), "http" | "https")
        || parsed.host_str().is_none_or(str::is_empty)
        || parsed.query().is_some()
        || parsed.fragment().is_some()
    {
        return Err(bad());
    }
    Ok(parsed.as_str().trim_end_matches('/').to_string())
}

/// Seconds as a non-negative decimal number (`0.5`, `30`).
pub fn parse_seconds(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if !secs.is_finite() || !(0.0..=1e9).contains(&secs) {
        return Err(format!("{s:?} is not a usable number of seconds"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Bytes, or a number with a K/M/G/T suffix in powers of 1024 (`10M`).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (digits, shift) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(format!("{s:?}: unknown size suffix (use K, M, G or T)")),
            };
            (&t[..i], shift)
        }
        _ => (t, 0),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a size in bytes"))?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// Where the state directory lies relative to the storage directory, both
/// given as canonical paths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StatePlace {
    /// Neither inside the other (the state may hold the storage).
    Apart,
    /// The same directory: unusable, state files would be stored files.
    Same,
    /// In the storage directory's temporary area, which start-up empties.
    InTemp,
    /// Below the storage directory, at this relative name ('/'-separated).
    Inside(String),
}

pub fn state_place(storage: &Path, queue: &Path, temp_dir: &str) -> StatePlace {
    let Ok(rel) = queue.strip_prefix(storage) else {
        return StatePlace::Apart;
    };
    let parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    match parts.first() {
        None => StatePlace::Same,
        Some(first) if first == temp_dir => StatePlace::InTemp,
        Some(_) => StatePlace::Inside(parts.join("/")),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn state_directory_placement() {
        use std::path::Path;
        let place = |s: &str, q: &str| super::state_place(Path::new(s), Path::new(q), ".tmp");
        assert_eq!(place("/d/data", "/d/queue"), super::StatePlace::Apart);
        assert_eq!(place("/d/data", "/d/data2"), super::StatePlace::Apart);
        assert_eq!(place("/d/data/x", "/d"), super::StatePlace::Apart);
        assert_eq!(place("/d/data", "/d/data"), super::StatePlace::Same);
        assert_eq!(
            place("/d/data", "/d/data/.tmp/q"),
            super::StatePlace::InTemp
        );
        assert_eq!(
            place("/d/data", "/d/data/a/q"),
            super::StatePlace::Inside("a/q".into())
        );
    }

    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("1500"), Ok(1500));
        assert_eq!(parse_size("1K"), Ok(1024));
        assert_eq!(parse_size("2m"), Ok(2 << 20));
        assert_eq!(parse_size("3G"), Ok(3 << 30));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert!(parse_size("1X").is_err());
        assert!(parse_size("K").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn seconds() {
        assert_eq!(parse_seconds("0.5"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_seconds("30"), Ok(Duration::from_secs(30)));
        assert!(parse_seconds("-1").is_err());
        assert!(parse_seconds("nan").is_err());
        assert!(parse_seconds("x").is_err());
    }

    #[test]
    fn urls() {
        assert_eq!(
            normalize_url("http://LocalHost:9001/").unwrap(),
            "http://localhost:9001"
        );
        assert_eq!(normalize_url("HTTP://a:1").unwrap(), "http://a:1");
        assert!(normalize_url("localhost:9001").is_err());
        assert!(normalize_url("http://127.0.0.1:99999").is_err());
        assert!(normalize_url("http://[::1").is_err());
        assert!(normalize_url("http://a b").is_err());
        // Credentials keep their case; the host does not.
        assert_eq!(
            normalize_url("http://User:Secret@Proxy:3128/").unwrap(),
            "http://User:Secret@proxy:3128"
        );
        assert_eq!(normalize_url("http://[::1]:80/").unwrap(), "http://[::1]");
        assert!(normalize_url("ftp://a").is_err());
        assert!(normalize_url("http://").is_err());
    }

    #[test]
    fn own_url_and_duplicates_are_dropped_from_neighbours() {
        let cli = Cli::parse_from([
            "cockatiel",
            "--url",
            "http://127.0.0.1:1/",
            "--node",
            "http://127.0.0.1:1",
            "--node",
            "http://127.0.0.1:2",
            "--node",
            "http://127.0.0.1:2/",
        ]);
        let config = cli.into_config().unwrap();
        assert_eq!(config.neighbours, vec!["http://127.0.0.1:2".to_string()]);
        assert_eq!(
            config.neighbour_as_given("http://127.0.0.1:2"),
            "http://127.0.0.1:2"
        );
        let cli = Cli::parse_from(["cockatiel", "--node", "http://LocalHost:9001/"]);
        let config = cli.into_config().unwrap();
        assert_eq!(config.neighbours, vec!["http://localhost:9001".to_string()]);
        assert_eq!(
            config.neighbour_as_given("http://localhost:9001"),
            "http://LocalHost:9001/"
        );
    }

    #[test]
    fn a_token_flag_wins_over_the_environment() {
        let mut cli = Cli::parse_from(["cockatiel"]);
        cli.env_token = Some(" from-env ".into());
        assert_eq!(
            cli.into_config().unwrap().token.as_deref(),
            Some("from-env")
        );
        let mut cli = Cli::parse_from(["cockatiel", "--token", "from-flag"]);
        cli.env_token = Some("from-env".into());
        assert_eq!(
            cli.into_config().unwrap().token.as_deref(),
            Some("from-flag")
        );
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "from-file\n").unwrap();
        let mut cli = Cli::parse_from(["cockatiel", "--token-file", file.to_str().unwrap()]);
        cli.env_token = Some("from-env".into());
        assert_eq!(
            cli.into_config().unwrap().token.as_deref(),
            Some("from-file")
        );
        let mut cli = Cli::parse_from(["cockatiel"]);
        cli.env_token = Some(" ".into());
        assert!(cli.into_config().is_err(), "an empty token is refused");
    }

    #[test]
    fn tokens_are_trimmed_and_never_empty() {
        let cli = Cli::parse_from(["cockatiel", "--token", " s3cret \n"]);
        assert_eq!(cli.into_config().unwrap().token.as_deref(), Some("s3cret"));
        let cli = Cli::parse_from(["cockatiel", "--token", "  "]);
        assert!(matches!(cli.into_config(), Err(ConfigError::EmptyToken)));
    }

    #[test]
    fn tokens_must_be_printable_ascii() {
        for bad in ["pässwörd", "a\u{7f}b", "tab\there"] {
            let cli = Cli::parse_from(["cockatiel", "--token", bad]);
            assert!(
                matches!(cli.into_config(), Err(ConfigError::TokenNotAscii)),
                "{bad:?}"
            );
        }
        let cli = Cli::parse_from(["cockatiel", "--token", "A-z_0.9~+/="]);
        assert!(cli.into_config().is_ok());
    }

    #[test]
    fn https_neighbours_are_refused() {
        let cli = Cli::parse_from(["cockatiel", "--node", "https://a:1"]);
        assert!(matches!(cli.into_config(), Err(ConfigError::NotHttp(_))));
        let cli = Cli::parse_from(["cockatiel", "--proxy", "https://p:1"]);
        assert!(matches!(cli.into_config(), Err(ConfigError::NotHttp(_))));
        // The node's own URL may be https (a TLS proxy in front of it).
        let cli = Cli::parse_from(["cockatiel", "--url", "https://me", "--node", "https://me"]);
        assert!(cli.into_config().unwrap().neighbours.is_empty());
    }

    #[test]
    fn defaults_serve_local_data() {
        let config = Cli::parse_from(["cockatiel"]).into_config().unwrap();
        assert_eq!(config.port, 8080);
        assert_eq!(config.host, "127.0.0.1");
        assert_eq!(config.storage, PathBuf::from("./data"));
        assert_eq!(config.read_timeout, Duration::from_secs(60));
        assert!(config.max_size.is_none());
    }
}
