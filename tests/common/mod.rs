//! Shared harness for the black-box integration tests: starts the real
//! `cockatiel` binary on temporary directories and talks raw HTTP/1.1 to it.
#![allow(dead_code)]

use std::collections::HashSet;
use std::fs;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sha1::{Digest, Sha1};

/// How long a node may take to answer `GET /_status` after being started.
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Socket read/write timeout for every test connection, so no test hangs forever.
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a node may take to exit after SIGTERM.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(20);

pub const CACHE_CONTROL: &str = "public, max-age=31536000, immutable";
pub const EMPTY_SHA1: &str = "da39a3ee5e6b4b0d3255bfef95601890afd80709";

// ---------------------------------------------------------------------------
// Ports
// ---------------------------------------------------------------------------

/// Ports already handed out in this test process, so two nodes started in
/// parallel threads never get the same one.
static USED_PORTS: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// A port that was free a moment ago (bind 127.0.0.1:0, read it, drop it) and
/// that no other node of this process has been given.
pub fn free_port() -> u16 {
    for _ in 0..100 {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = listener.local_addr().expect("local_addr").port();
        drop(listener);
        let mut used = USED_PORTS.lock().unwrap_or_else(|e| e.into_inner());
        if used.get_or_insert_with(HashSet::new).insert(port) {
            return port;
        }
    }
    panic!("could not find a free port");
}

// ---------------------------------------------------------------------------
// Node
// ---------------------------------------------------------------------------

/// One running (or stopped) cockatiel process with its own temporary
/// storage and queue directories. The directories and the port outlive
/// the process, so a node can be killed and started again on the same data.
pub struct Node {
    child: Option<Child>,
    port: u16,
    args: Vec<String>,
    root: tempfile::TempDir,
    starts: usize,
    /// Run the process as this user id (and the same group id).
    run_as: Option<u32>,
}

enum StartError {
    /// The process exited before becoming ready (e.g. the port was taken).
    Exited(ExitStatus),
    /// The process did not become ready in time.
    Timeout,
}

impl Node {
    /// A fresh temp directory holding empty `storage` and `queue` directories.
    pub fn new_root() -> tempfile::TempDir {
        let root = tempfile::Builder::new()
            .prefix("cockatiel-test-")
            .tempdir()
            .expect("create temp dir");
        fs::create_dir_all(root.path().join("storage")).expect("create storage dir");
        fs::create_dir_all(root.path().join("queue")).expect("create queue dir");
        root
    }

    /// Start a node with `-p PORT -H 127.0.0.1 --storage DIR --queue DIR`
    /// plus `extra` arguments. In `extra`, `{port}` is replaced by the port.
    pub fn start(extra: &[&str]) -> Node {
        let root = Node::new_root();
        let mut node = Node {
            child: None,
            port: 0,
            args: extra.iter().map(|s| s.to_string()).collect(),
            root,
            starts: 0,
            run_as: None,
        };
        let mut last = String::new();
        for _attempt in 0..5 {
            node.port = free_port();
            match node.spawn_and_wait() {
                Ok(()) => return node,
                Err(StartError::Exited(status)) => {
                    // Maybe the port was taken between our probe and the bind.
                    last = format!("exited with {status}");
                }
                Err(StartError::Timeout) => {
                    node.kill_child();
                    panic!(
                        "node did not answer GET /_status within {READY_TIMEOUT:?}; args {:?}\nstderr:\n{}",
                        node.command_args(),
                        node.stderr_text()
                    );
                }
            }
        }
        panic!(
            "node failed to start 5 times (last: {last}); args {:?}\nstderr:\n{}",
            node.command_args(),
            node.stderr_text()
        );
    }

    /// Start a node running as user and group `uid` (the test must run as
    /// root), its directories open to that user.
    pub fn start_as(uid: u32, extra: &[&str]) -> Node {
        use std::os::unix::fs::PermissionsExt;
        let args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let mut node = Node::prepare(free_port(), &args);
        node.run_as = Some(uid);
        for (dir, mode) in [
            (node.root.path().to_path_buf(), 0o755),
            (node.storage(), 0o777),
            (node.queue(), 0o777),
        ] {
            fs::set_permissions(&dir, fs::Permissions::from_mode(mode)).expect("chmod test dir");
        }
        node.restart();
        node
    }

    /// Start the process again on the same directories and port.
    /// Replace the extra arguments (the ones after `--storage`/`--queue`
    /// and the port) for the next [`Node::restart`].
    pub fn set_args(&mut self, args: Vec<String>) {
        self.args = args;
    }

    pub fn restart(&mut self) {
        assert!(
            self.child.is_none(),
            "restart() called while the node is still running"
        );
        let mut last = String::new();
        // The same port should be bindable at once (SO_REUSEADDR); retry a
        // few times in case an outgoing connection briefly holds it.
        for _attempt in 0..5 {
            match self.spawn_and_wait() {
                Ok(()) => return,
                Err(StartError::Exited(status)) => {
                    last = format!("exited with {status}");
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(StartError::Timeout) => {
                    self.kill_child();
                    panic!(
                        "restarted node did not answer GET /_status within {READY_TIMEOUT:?}\nstderr:\n{}",
                        self.stderr_text()
                    );
                }
            }
        }
        panic!(
            "node failed to restart on port {} (last: {last})\nstderr:\n{}",
            self.port,
            self.stderr_text()
        );
    }

    fn command_args(&self) -> Vec<String> {
        let mut args = vec![
            "-p".to_string(),
            self.port.to_string(),
            "-H".to_string(),
            "127.0.0.1".to_string(),
            "--storage".to_string(),
            self.storage().display().to_string(),
            "--queue".to_string(),
            self.queue().display().to_string(),
        ];
        let port = self.port.to_string();
        args.extend(self.args.iter().map(|a| a.replace("{port}", &port)));
        args
    }

    fn spawn_and_wait(&mut self) -> Result<(), StartError> {
        self.starts += 1;
        let mut log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.stderr_path())
            .expect("open stderr log");
        writeln!(
            log,
            "===== start #{} on port {}: {:?}",
            self.starts,
            self.port,
            self.command_args()
        )
        .expect("write stderr log");
        let mut command = Command::new(env!("CARGO_BIN_EXE_cockatiel"));
        if let Some(id) = self.run_as {
            use std::os::unix::process::CommandExt;
            command.uid(id).gid(id);
        }
        let child = command
            .args(self.command_args())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log"))
            .stderr(log)
            .spawn()
            .expect("spawn cockatiel binary");
        self.child = Some(child);

        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.try_wait() {
                return Err(StartError::Exited(status));
            }
            if status_is_ready(self.port) {
                // Make sure it is *our* process that answered.
                if let Some(status) = self.try_wait() {
                    return Err(StartError::Exited(status));
                }
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(StartError::Timeout);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `Some(status)` (and forget the child) if the process has exited.
    fn try_wait(&mut self) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        match child.try_wait() {
            Ok(Some(status)) => {
                self.child = None;
                Some(status)
            }
            Ok(None) => None,
            Err(e) => panic!("try_wait: {e}"),
        }
    }

    fn kill_child(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGKILL the process and wait for it.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("kill9: node is not running");
        child.kill().expect("SIGKILL the node");
        child.wait().expect("wait for the killed node");
    }

    /// SIGTERM the process and wait (bounded) for it to exit; returns its
    /// exit status. Panics if it does not exit within [`STOP_TIMEOUT`].
    pub fn stop(&mut self) -> ExitStatus {
        self.stop_within(STOP_TIMEOUT)
    }

    pub fn stop_within(&mut self, bound: Duration) -> ExitStatus {
        let pid = self.pid();
        let ok = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("run kill -TERM");
        assert!(ok.success(), "kill -TERM {pid} failed");
        let deadline = Instant::now() + bound;
        loop {
            if let Some(status) = self.try_wait() {
                return status;
            }
            if Instant::now() > deadline {
                self.kill_child();
                panic!(
                    "node did not exit within {bound:?} after SIGTERM\nstderr:\n{}",
                    self.stderr_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.try_wait();
        self.child.is_some()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("node is not running").id()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn root(&self) -> &Path {
        self.root.path()
    }

    pub fn storage(&self) -> PathBuf {
        self.root.path().join("storage")
    }

    pub fn queue(&self) -> PathBuf {
        self.root.path().join("queue")
    }

    /// `<storage>/.tmp`, where the server keeps files being uploaded.
    pub fn tmp_dir(&self) -> PathBuf {
        self.storage().join(".tmp")
    }

    pub fn stderr_path(&self) -> PathBuf {
        self.root.path().join("stderr.log")
    }

    pub fn stderr_text(&self) -> String {
        let text = fs::read(self.stderr_path()).unwrap_or_default();
        let text = String::from_utf8_lossy(&text);
        // Keep messages readable: the last 8 KiB is plenty.
        let start = text.len().saturating_sub(8192);
        let start = (start..text.len())
            .find(|&i| text.is_char_boundary(i))
            .unwrap_or(0);
        text[start..].to_string()
    }

    /// Peak resident set size of the process in KiB (VmHWM).
    pub fn peak_rss_kib(&self) -> u64 {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("read /proc/PID/status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM in /proc/PID/status")
    }

    /// Path on disk of a stored file, from the (percent-encoded) `Location`.
    pub fn stored_path(&self, location: &str) -> PathBuf {
        let decoded = percent_decode(location.trim_start_matches('/'));
        let decoded = String::from_utf8(decoded).expect("Location decodes to UTF-8");
        self.storage().join(decoded)
    }

    /// Regular files (and symlinks) under the storage dir, relative, sorted;
    /// the `.tmp` directory is left out.
    pub fn stored_files(&self) -> Vec<String> {
        let mut out = Vec::new();
        walk(&self.storage(), &self.storage(), &mut out, true);
        out.sort();
        out
    }

    /// Entries in `<storage>/.tmp` (empty when the directory is absent).
    pub fn tmp_files(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.tmp_dir().exists() {
            walk(&self.tmp_dir(), &self.tmp_dir(), &mut out, false);
        }
        out
    }

    /// Wait (bounded) until `<storage>/.tmp` is empty or absent; panics otherwise.
    #[track_caller]
    pub fn assert_tmp_empty_soon(&self, what: &str) {
        let ok = wait_until(Duration::from_secs(5), || self.tmp_files().is_empty());
        assert!(
            ok,
            "{what}: {}/.tmp still holds {:?} after 5 s",
            self.storage().display(),
            self.tmp_files()
        );
    }

    // Convenience request helpers -------------------------------------

    pub fn req(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Response {
        request(self.port, method, path, headers, body)
    }

    pub fn put(&self, path: &str, body: &[u8]) -> Response {
        request(self.port, "PUT", path, &[], body)
    }

    pub fn get(&self, path: &str) -> Response {
        request(self.port, "GET", path, &[], b"")
    }

    pub fn head(&self, path: &str) -> Response {
        request(self.port, "HEAD", path, &[], b"")
    }

    pub fn delete(&self, path: &str) -> Response {
        request(self.port, "DELETE", path, &[], b"")
    }

    /// PUT that must answer 201; returns the Location.
    #[track_caller]
    pub fn put_ok(&self, path: &str, body: &[u8]) -> String {
        let resp = self.put(path, body);
        assert_eq!(
            resp.status,
            201,
            "PUT {path}: expected 201, got {}",
            resp.describe()
        );
        resp.header("location")
            .unwrap_or_else(|| panic!("PUT {path}: 201 without Location: {}", resp.describe()))
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let running = self.child.is_some();
        self.kill_child();
        if std::thread::panicking() && self.starts > 0 {
            eprintln!(
                "---- node on port {} ({}) stderr (tail) ----\n{}\n---- end of node stderr ----",
                self.port,
                if running { "killed" } else { "not running" },
                self.stderr_text()
            );
        }
    }
}

fn walk(base: &Path, dir: &Path, out: &mut Vec<String>, skip_tmp: bool) {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(_) => return,
    };
    for entry in entries {
        let entry = entry.expect("read_dir entry");
        let path = entry.path();
        if skip_tmp && dir == base && entry.file_name() == ".tmp" {
            continue;
        }
        // A node still running may remove it (or prune its directory)
        // between the listing and this look.
        let meta = match fs::symlink_metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => panic!("symlink_metadata {}: {e}", path.display()),
        };
        if meta.is_dir() {
            walk(base, &path, out, skip_tmp);
        } else {
            let rel = path.strip_prefix(base).expect("strip_prefix");
            out.push(rel.to_string_lossy().into_owned());
        }
    }
}

/// A read that ran into its timeout (nothing arrived in time).
pub fn is_read_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// What a run of the binary that was expected to exit printed.
pub struct Ran {
    /// None when it was still running after the bound (it was then killed).
    pub status: Option<std::process::ExitStatus>,
    pub stdout: String,
    pub stderr: String,
}

/// Run the binary with `args` (COCKATIEL_TOKEN removed from its
/// environment) and wait for it to exit, at most `bound`.
pub fn run_to_exit(args: &[&str], bound: Duration) -> Ran {
    let dir = tempfile::tempdir().expect("temp dir");
    let (out_path, err_path) = (dir.path().join("out"), dir.path().join("err"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_cockatiel"))
        .args(args)
        .env_remove("COCKATIEL_TOKEN")
        .stdin(Stdio::null())
        .stdout(fs::File::create(&out_path).expect("stdout file"))
        .stderr(fs::File::create(&err_path).expect("stderr file"))
        .spawn()
        .expect("spawn cockatiel");
    let mut status = None;
    let exited = wait_until(bound, || {
        status = child.try_wait().expect("try_wait");
        status.is_some()
    });
    if !exited {
        let _ = child.kill();
        let _ = child.wait();
    }
    Ran {
        status,
        stdout: fs::read_to_string(&out_path).unwrap_or_default(),
        stderr: fs::read_to_string(&err_path).unwrap_or_default(),
    }
}

/// One quick `GET /_status` with short timeouts.
fn status_is_ready(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(2)));
    let req =
        format!("GET /_status HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
    if stream.write_all(req.as_bytes()).is_err() {
        return false;
    }
    let mut buf = [0u8; 12];
    let mut got = 0;
    while got < buf.len() {
        match stream.read(&mut buf[got..]) {
            Ok(0) | Err(_) => return false,
            Ok(n) => got += n,
        }
    }
    buf.starts_with(b"HTTP/1.1 200") || buf.starts_with(b"HTTP/1.0 200")
}

/// Poll `cond` every 20 ms until it holds or `bound` has passed.
pub fn wait_until(bound: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + bound;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------
// Raw HTTP/1.1 client
// ---------------------------------------------------------------------------

#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub reason: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Status codes of interim (1xx) responses received before this one.
    pub interim: Vec<u16>,
}

impl Response {
    /// First header of that name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    }

    pub fn header_all(&self, name: &str) -> Vec<String> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
            .collect()
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Status, headers and the start of the body, for assertion messages.
    pub fn describe(&self) -> String {
        let mut s = format!("{} {}", self.status, self.reason);
        for (n, v) in &self.headers {
            s.push_str(&format!("\n  {n}: {v}"));
        }
        let shown = &self.body[..self.body.len().min(300)];
        s.push_str(&format!(
            "\n  body ({} bytes): {:?}",
            self.body.len(),
            String::from_utf8_lossy(shown)
        ));
        s
    }
}

/// Head of a response (status line and headers), before the body.
#[derive(Debug, Clone)]
pub struct Head {
    pub status: u16,
    pub reason: String,
    pub headers: Vec<(String, String)>,
}

impl Head {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    }
}

/// A client connection with a read-ahead buffer.
pub struct Conn {
    pub stream: TcpStream,
    buf: Vec<u8>,
    eof: bool,
}

impl Conn {
    pub fn open(port: u16) -> Conn {
        Self::try_open(port).unwrap_or_else(|e| panic!("connect to 127.0.0.1:{port}: {e}"))
    }

    pub fn try_open(port: u16) -> io::Result<Conn> {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        let _ = stream.set_nodelay(true);
        Ok(Conn {
            stream,
            buf: Vec::new(),
            eof: false,
        })
    }

    pub fn set_read_timeout(&self, t: Duration) {
        self.stream
            .set_read_timeout(Some(t))
            .expect("set_read_timeout");
    }

    pub fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Read more bytes into the buffer; returns how many (0 at EOF).
    fn fill(&mut self) -> io::Result<usize> {
        if self.eof {
            return Ok(0);
        }
        let mut chunk = [0u8; 65536];
        let n = self.stream.read(&mut chunk)?;
        if n == 0 {
            self.eof = true;
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n)
    }

    /// Bytes received but not yet consumed.
    pub fn buffered(&self) -> &[u8] {
        &self.buf
    }

    /// Read one response head (which may be an interim 1xx one).
    pub fn read_head(&mut self) -> io::Result<Head> {
        loop {
            if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                let head_bytes: Vec<u8> = self.buf.drain(..end + 4).collect();
                return parse_head(&head_bytes[..end]);
            }
            if self.buf.len() > 1 << 20 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "response head over 1 MiB",
                ));
            }
            if self.fill()? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "connection closed before a complete response head (got {:?})",
                        String::from_utf8_lossy(&self.buf)
                    ),
                ));
            }
        }
    }

    /// Read the final response (skipping and recording 1xx ones). `no_body`
    /// is true for responses to HEAD; anything the server sends after the
    /// head of such a response (or of a 304/204) ends up in `body`.
    pub fn read_response(&mut self, no_body: bool) -> io::Result<Response> {
        let mut interim = Vec::new();
        let head = loop {
            let head = self.read_head()?;
            if (100..200).contains(&head.status) && head.status != 101 {
                interim.push(head.status);
                continue;
            }
            break head;
        };
        let mut body = Vec::new();
        self.read_body_with(&head, no_body, &mut |b| body.extend_from_slice(b))?;
        Ok(Response {
            status: head.status,
            reason: head.reason,
            headers: head.headers,
            body,
            interim,
        })
    }

    /// Stream the body of the response whose head was just read to `sink`;
    /// returns the number of body bytes.
    pub fn read_body_with(
        &mut self,
        head: &Head,
        no_body: bool,
        sink: &mut dyn FnMut(&[u8]),
    ) -> io::Result<u64> {
        let mut total = 0u64;
        let te = head.header("transfer-encoding").unwrap_or_default();
        if no_body || head.status == 304 || head.status == 204 {
            // Nothing is expected; collect whatever arrives before EOF (the
            // request said Connection: close) within a short bound.
            self.set_read_timeout(Duration::from_secs(2));
            loop {
                if !self.buf.is_empty() {
                    total += self.buf.len() as u64;
                    sink(&self.buf);
                    self.buf.clear();
                }
                match self.fill() {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) if is_read_timeout(&e) => break,
                    Err(e) if e.kind() == io::ErrorKind::ConnectionReset => break,
                    Err(e) => return Err(e),
                }
            }
            self.set_read_timeout(IO_TIMEOUT);
        } else if te.to_ascii_lowercase().contains("chunked") {
            loop {
                let line = self.read_line()?;
                let size_str = line.split(';').next().unwrap_or("").trim();
                let size = u64::from_str_radix(size_str, 16).map_err(|_| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("bad chunk size line {line:?}"),
                    )
                })?;
                if size == 0 {
                    // Trailers until an empty line.
                    loop {
                        if self.read_line()?.is_empty() {
                            break;
                        }
                    }
                    break;
                }
                self.read_exact_to(size, sink)?;
                total += size;
                let crlf = self.read_line()?;
                if !crlf.is_empty() {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "chunk not followed by CRLF",
                    ));
                }
            }
        } else if let Some(cl) = head.header("content-length") {
            let len: u64 = cl.trim().parse().map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("bad Content-Length {cl:?}"),
                )
            })?;
            self.read_exact_to(len, sink)?;
            total = len;
        } else {
            loop {
                if !self.buf.is_empty() {
                    total += self.buf.len() as u64;
                    sink(&self.buf);
                    self.buf.clear();
                }
                match self.fill() {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(total)
    }

    fn read_line(&mut self) -> io::Result<String> {
        loop {
            if let Some(end) = find(&self.buf, b"\r\n") {
                let line: Vec<u8> = self.buf.drain(..end + 2).collect();
                return Ok(String::from_utf8_lossy(&line[..end]).into_owned());
            }
            if self.fill()? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "EOF inside chunked body",
                ));
            }
        }
    }

    fn read_exact_to(&mut self, mut len: u64, sink: &mut dyn FnMut(&[u8])) -> io::Result<()> {
        while len > 0 {
            if self.buf.is_empty() && self.fill()? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("EOF with {len} body bytes still expected"),
                ));
            }
            let take = (self.buf.len() as u64).min(len) as usize;
            sink(&self.buf[..take]);
            self.buf.drain(..take);
            len -= take as u64;
        }
        Ok(())
    }

    /// Wait until the peer closes the connection (EOF or reset). Returns
    /// `Ok(true)` on close, `Ok(false)` when `bound` passed first.
    pub fn wait_closed(&mut self, bound: Duration) -> io::Result<bool> {
        let deadline = Instant::now() + bound;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(false);
            }
            self.set_read_timeout(left.min(Duration::from_millis(500)));
            match self.fill() {
                Ok(0) => return Ok(true),
                Ok(_) => {}
                Err(e) if is_read_timeout(&e) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
                    ) =>
                {
                    return Ok(true)
                }
                Err(e) => return Err(e),
            }
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn parse_head(bytes: &[u8]) -> io::Result<Head> {
    let text = String::from_utf8_lossy(bytes);
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let bad = || {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("bad status line {status_line:?}"),
        )
    };
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().ok_or_else(bad)?;
    if !version.starts_with("HTTP/1.") {
        return Err(bad());
    }
    let status: u16 = parts.next().ok_or_else(bad)?.parse().map_err(|_| bad())?;
    let reason = parts.next().unwrap_or("").to_string();
    let mut headers = Vec::new();
    for line in lines {
        let (name, value) = line.split_once(':').ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad header line {line:?}"),
            )
        })?;
        headers.push((name.trim().to_string(), value.trim().to_string()));
    }
    Ok(Head {
        status,
        reason,
        headers,
    })
}

/// The request head, exactly as sent: the target is written verbatim.
/// `Host`, `Content-Length` (when `body_len` is given and the caller set
/// neither `Content-Length` nor `Transfer-Encoding`) and `Connection: close`
/// are added unless the caller supplied them.
pub fn build_head(
    port: u16,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body_len: Option<usize>,
) -> Vec<u8> {
    let has = |name: &str| headers.iter().any(|(n, _)| n.eq_ignore_ascii_case(name));
    let mut out = format!("{method} {target} HTTP/1.1\r\n");
    if !has("host") {
        out.push_str(&format!("Host: 127.0.0.1:{port}\r\n"));
    }
    for (n, v) in headers {
        out.push_str(&format!("{n}: {v}\r\n"));
    }
    if let Some(len) = body_len {
        if !has("content-length") && !has("transfer-encoding") {
            out.push_str(&format!("Content-Length: {len}\r\n"));
        }
    }
    if !has("connection") {
        out.push_str("Connection: close\r\n");
    }
    out.push_str("\r\n");
    out.into_bytes()
}

/// A PUT of `len` bytes to `path` that asks with `Expect: 100-continue`
/// and never sends its body: the answer must come without asking for it
/// (no 100 Continue first).
pub fn put_asking_first(port: u16, path: &str, headers: &[(&str, &str)], len: usize) -> Response {
    let mut all = headers.to_vec();
    all.push(("Expect", "100-continue"));
    let mut conn = Conn::open(port);
    conn.send(&build_head(port, "PUT", path, &all, Some(len)))
        .unwrap();
    let r = conn
        .read_response(false)
        .expect("an answer without the body");
    assert!(
        r.interim.is_empty(),
        "PUT {path}: no 100 Continue before the answer: {:?}",
        r.interim
    );
    r
}

/// Send one request and read the whole response. Panics (with context) on
/// connection errors; see [`try_request`] for the fallible variant.
pub fn request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Response {
    try_request(port, method, path, headers, body)
        .unwrap_or_else(|e| panic!("{method} {path}: no complete response: {e}"))
}

pub fn try_request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> io::Result<Response> {
    let body_len = if body.is_empty() && matches!(method, "GET" | "HEAD") {
        None
    } else {
        Some(body.len())
    };
    let mut bytes = build_head(port, method, path, headers, body_len);
    bytes.extend_from_slice(body);
    exchange(port, &bytes, method == "HEAD")
}

/// Send a request with a `Transfer-Encoding: chunked` body made of `chunks`.
pub fn request_chunked(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    chunks: &[&[u8]],
) -> Response {
    let mut all: Vec<(&str, &str)> = headers.to_vec();
    all.push(("Transfer-Encoding", "chunked"));
    let mut bytes = build_head(port, method, path, &all, None);
    bytes.extend_from_slice(&chunked_body(chunks));
    exchange(port, &bytes, method == "HEAD")
        .unwrap_or_else(|e| panic!("{method} {path} (chunked): no complete response: {e}"))
}

/// Encode `chunks` as a chunked body (empty chunks are skipped).
pub fn chunked_body(chunks: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for c in chunks.iter().filter(|c| !c.is_empty()) {
        out.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
        out.extend_from_slice(c);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

/// Send fully raw bytes and read one response.
pub fn raw(port: u16, bytes: &[u8]) -> Response {
    try_raw(port, bytes).unwrap_or_else(|e| {
        panic!(
            "raw request {:?}: no complete response: {e}",
            String::from_utf8_lossy(&bytes[..bytes.len().min(200)])
        )
    })
}

pub fn try_raw(port: u16, bytes: &[u8]) -> io::Result<Response> {
    exchange(port, bytes, false)
}

fn exchange(port: u16, bytes: &[u8], no_body: bool) -> io::Result<Response> {
    let mut conn = Conn::try_open(port)?;
    // The server may answer (and close) before reading the whole request,
    // e.g. 413 or 431; still read what it said.
    let write_result = conn.send(bytes);
    match conn.read_response(no_body) {
        Ok(resp) => Ok(resp),
        Err(read_err) => match write_result {
            Err(write_err) => Err(io::Error::new(
                read_err.kind(),
                format!("{read_err} (after write error: {write_err})"),
            )),
            Ok(()) => Err(read_err),
        },
    }
}

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

pub fn sha1_hex(bytes: &[u8]) -> String {
    hex(&Sha1::digest(bytes))
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

/// Percent-decode (no `+` handling); invalid escapes are kept verbatim.
pub fn percent_decode(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hexval(b[i + 1]), hexval(b[i + 2])) {
                out.push(h * 16 + l);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

fn hexval(c: u8) -> Option<u8> {
    (c as char).to_digit(16).map(|d| d as u8)
}

/// Percent-encode every byte except unreserved characters and `/`.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::new();
    for &b in s.as_bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Split a generated stored name `/<stem>_<secs>_<sha1><ext>` (decoded)
/// into `(stem, secs, sha1, ext)`, where `ext` is `""` or `.suffix`.
pub fn split_stored_name(name: &str) -> Option<(String, u64, String, String)> {
    let name = name.strip_prefix('/')?;
    let (dir, base) = match name.rfind('/') {
        Some(i) => (&name[..=i], &name[i + 1..]),
        None => ("", name),
    };
    let (body, ext) = match base.rfind('.') {
        Some(i) if i > 0 => (&base[..i], &base[i..]),
        _ => (base, ""),
    };
    let (rest, sha) = body.rsplit_once('_')?;
    if sha.len() != 40 || !sha.bytes().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let (stem, secs) = rest.rsplit_once('_')?;
    if secs.is_empty() || !secs.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    Some((
        format!("{dir}{stem}"),
        secs.parse().ok()?,
        sha.to_string(),
        ext.to_string(),
    ))
}

/// Deterministic pseudo-random bytes (xorshift64*).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform-ish in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// Fill `buf`. The stream is the same however it is cut into buffers,
    /// as long as every buffer but the last has a length divisible by 8.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        self.fill(&mut v);
        v
    }
}

// ---------------------------------------------------------------------------
// Common assertions
// ---------------------------------------------------------------------------

/// Every response carries `Server: cockatiel/<version>`.
#[track_caller]
pub fn assert_server_header(resp: &Response, what: &str) {
    let server = resp.header("server");
    assert!(
        server
            .as_deref()
            .is_some_and(|s| s.starts_with("cockatiel/") && s.len() > "cockatiel/".len()),
        "{what}: expected a `Server: cockatiel/<version>` header, got {}",
        resp.describe()
    );
}

/// A refusal: the given 4xx status class, a short one-line plain-text body,
/// the Server header.
#[track_caller]
pub fn assert_error_body(resp: &Response, what: &str) {
    assert_server_header(resp, what);
    let text = resp.text();
    let trimmed = text.trim_end();
    assert!(
        !trimmed.is_empty(),
        "{what}: error response needs a non-empty plain-text body saying what was wrong, got {}",
        resp.describe()
    );
    assert!(
        !trimmed.contains('\n') && !trimmed.contains('\r') && trimmed.len() <= 500,
        "{what}: error body should be one short line, got {}",
        resp.describe()
    );
    let ct = resp.header("content-type").unwrap_or_default();
    assert!(
        ct.to_ascii_lowercase().starts_with("text/plain"),
        "{what}: error body should be text/plain, got {}",
        resp.describe()
    );
}

// Multi-node helpers and the fault-injecting proxy (replication tests).
pub mod cluster;
pub mod proxy;

/// Kills the process it holds (by its pid) when dropped, also when a test fails.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
