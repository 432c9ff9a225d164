//! The control socket: a Unix stream socket serving one JSON-line [`Request`] per connection.
//!
//! Only root and the daemon's own uid are served (checked with `SO_PEERCRED`, on top of the
//! socket's 0600 mode). The server never dies from a bad client: every problem with a
//! connection ends in an [`Response::Error`] on that connection and a log line.

use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener as StdUnixListener, UnixStream as StdUnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use thiserror::Error;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader as AsyncBufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use super::protocol::{ErrorKind, Request, Response};
use crate::events::{self, EventLog};
use tokio::sync::broadcast;

/// Longest accepted request line, newline included.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// Longest accepted response line on the client side (a status of many services is large).
pub const MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;
/// Default time the server waits for the daemon to answer a request; failover and shadow
/// rebuilds legitimately take long.
pub const DEFAULT_REPLY_TIMEOUT: Duration = Duration::from_secs(120);
/// Time a client gets to send its request line, so idle connections cannot pile up.
const REQUEST_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Time allowed to write the response back.
const RESPONSE_WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// The channel the server forwards requests on; the daemon answers through the oneshot.
pub type RequestSender = mpsc::Sender<(Request, oneshot::Sender<Response>)>;

/// Errors of the control socket, server and client side.
#[derive(Debug, Error)]
pub enum ControlError {
    /// The socket's parent directory could not be created.
    #[error("cannot create control socket directory {path}")]
    CreateDir {
        /// Directory that could not be created.
        path: PathBuf,
        /// Underlying I/O error.
        #[source]
        source: io::Error,
    },
    /// The socket path has no parent directory or file name.
    #[error("control socket path {path} has no parent directory or file name")]
    InvalidPath {
        /// The offending path.
        path: PathBuf,
    },
    /// Something other than a socket sits at the socket path; it is left alone.
    #[error("{path} exists and is not a socket; refusing to replace it")]
    NotASocket {
        /// The offending path.
        path: PathBuf,
    },
    /// A live daemon answers on the socket path.
    #[error("another daemon is running: {path} accepts connections")]
    AnotherDaemon {
        /// The socket path.
        path: PathBuf,
    },
    /// A stale socket file could not be inspected or removed.
    #[error("cannot replace stale control socket {path}")]
    RemoveStale {
        /// The socket path.
        path: PathBuf,
        /// Underlying I/O error.
        #[source]
        source: io::Error,
    },
    /// Binding the listening socket failed.
    #[error("cannot bind control socket {path}")]
    Bind {
        /// Path that was bound.
        path: PathBuf,
        /// Underlying I/O error.
        #[source]
        source: io::Error,
    },
    /// Restricting the socket to mode 0600, or moving it into place, failed.
    #[error("cannot set up control socket file {path}")]
    SetupSocketFile {
        /// Path being set up.
        path: PathBuf,
        /// Underlying I/O error.
        #[source]
        source: io::Error,
    },
    /// Registering the listener with the tokio runtime failed.
    #[error("cannot register control socket {path} with the runtime")]
    Register {
        /// The socket path.
        path: PathBuf,
        /// Underlying I/O error.
        #[source]
        source: io::Error,
    },
    /// Client: nothing listens at the socket path.
    #[error("daemon not running: no socket at {path}")]
    DaemonNotRunning {
        /// The socket path.
        path: PathBuf,
    },
    /// Client: the socket exists but this user may not connect to it.
    #[error("permission denied on {path} (the control socket is root-only)")]
    PermissionDenied {
        /// The socket path.
        path: PathBuf,
    },
    /// Client: connecting failed for another reason.
    #[error("cannot connect to {path}")]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// Underlying I/O error.
        #[source]
        source: io::Error,
    },
    /// Client: the daemon did not answer within the timeout.
    #[error("daemon at {path} did not answer within {timeout:?}")]
    Timeout {
        /// The socket path.
        path: PathBuf,
        /// The timeout that expired.
        timeout: Duration,
    },
    /// Client: sending the request or receiving the answer failed.
    #[error("lost connection to daemon at {path}")]
    Io {
        /// The socket path.
        path: PathBuf,
        /// Underlying I/O error.
        #[source]
        source: io::Error,
    },
    /// Client: the daemon closed the connection without answering.
    #[error("daemon at {path} closed the connection without answering")]
    NoResponse {
        /// The socket path.
        path: PathBuf,
    },
    /// Client: the answer exceeded [`MAX_RESPONSE_BYTES`].
    #[error("answer from daemon at {path} exceeds {MAX_RESPONSE_BYTES} bytes")]
    ResponseTooLarge {
        /// The socket path.
        path: PathBuf,
    },
    /// Client: the answer was not a valid response line.
    #[error("invalid answer from daemon at {path}")]
    BadResponse {
        /// The socket path.
        path: PathBuf,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
    /// Client: the request could not be encoded.
    #[error("cannot encode request")]
    Encode(#[source] serde_json::Error),
}

/// A bound control socket, ready to [`serve`](ControlServer::serve).
///
/// Dropping it (or the future of `serve`) removes the socket file if it is still ours.
#[derive(Debug)]
pub struct ControlServer {
    listener: StdUnixListener,
    file: SocketFile,
    reply_timeout: Duration,
    events: Option<EventLog>,
}

/// Removes the socket file on drop, but only if the file at the path is still the one we
/// bound (a new daemon may have replaced it).
#[derive(Debug)]
struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if let Ok(meta) = fs::symlink_metadata(&self.path) {
            if meta.dev() == self.dev && meta.ino() == self.ino {
                let _ = fs::remove_file(&self.path);
            }
        }
    }
}

impl ControlServer {
    /// Binds the control socket at `path` with mode 0600.
    ///
    /// Creates the parent directory if missing. An existing socket file is replaced only if
    /// nobody answers on it; a live daemon or a non-socket file is an error. The socket is
    /// bound under a temporary name, restricted, then renamed into place, so it is never
    /// reachable with a wider mode.
    pub fn bind(path: &Path) -> Result<Self, ControlError> {
        let invalid = || ControlError::InvalidPath {
            path: path.to_path_buf(),
        };
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let file_name = path.file_name().ok_or_else(invalid)?;
        if !dir.exists() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(dir)
                .map_err(|source| ControlError::CreateDir {
                    path: dir.to_path_buf(),
                    source,
                })?;
        }

        remove_stale_socket(path)?;

        let tmp = dir.join(format!(
            ".{}.bind.{}",
            file_name.to_string_lossy(),
            std::process::id()
        ));
        // A leftover from a crashed bind of a process with our pid; never a live daemon.
        let _ = fs::remove_file(&tmp);
        let listener = StdUnixListener::bind(&tmp).map_err(|source| ControlError::Bind {
            path: tmp.clone(),
            source,
        })?;
        let setup = || -> io::Result<fs::Metadata> {
            fs::set_permissions(&tmp, fs::Permissions::from_mode(0o600))?;
            fs::rename(&tmp, path)?;
            fs::symlink_metadata(path)
        };
        let meta = setup().map_err(|source| {
            let _ = fs::remove_file(&tmp);
            ControlError::SetupSocketFile {
                path: path.to_path_buf(),
                source,
            }
        })?;
        listener
            .set_nonblocking(true)
            .map_err(|source| ControlError::SetupSocketFile {
                path: path.to_path_buf(),
                source,
            })?;
        info!(path = %path.display(), "control socket bound");
        Ok(ControlServer {
            listener,
            file: SocketFile {
                path: path.to_path_buf(),
                dev: meta.dev(),
                ino: meta.ino(),
            },
            reply_timeout: DEFAULT_REPLY_TIMEOUT,
            events: None,
        })
    }

    /// Serves [`Request::Events`] from `events` (the socket streams them itself, without the
    /// daemon's loop).
    pub fn with_events(mut self, events: EventLog) -> Self {
        self.events = Some(events);
        self
    }

    /// Sets how long a connection waits for the daemon's answer before replying
    /// [`ErrorKind::Timeout`].
    pub fn with_reply_timeout(mut self, timeout: Duration) -> Self {
        self.reply_timeout = timeout;
        self
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.file.path
    }

    /// Accepts connections until the daemon drops the receiving end of `handler`, forwarding
    /// each request with a oneshot for the answer. Must run inside a tokio runtime. The
    /// socket file is removed when this returns or its future is dropped.
    pub async fn serve(self, handler: RequestSender) -> Result<(), ControlError> {
        let ControlServer {
            listener,
            file,
            reply_timeout,
            events,
        } = self;
        let listener =
            UnixListener::from_std(listener).map_err(|source| ControlError::Register {
                path: file.path.clone(),
                source,
            })?;
        let own_uid = nix::unistd::geteuid().as_raw();
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        let handler = handler.clone();
                        tokio::spawn(handle_connection(stream, handler, own_uid, reply_timeout, events.clone()));
                    }
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning, keep serving.
                        warn!(error = %e, path = %file.path.display(), "control socket accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                () = handler.closed() => {
                    debug!(path = %file.path.display(), "control handler gone, closing socket");
                    return Ok(());
                }
            }
        }
    }
}

/// Removes `path` if it is a socket nobody answers on.
fn remove_stale_socket(path: &Path) -> Result<(), ControlError> {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(ControlError::RemoveStale {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    if !meta.file_type().is_socket() {
        return Err(ControlError::NotASocket {
            path: path.to_path_buf(),
        });
    }
    match StdUnixStream::connect(path) {
        Ok(_) => Err(ControlError::AnotherDaemon {
            path: path.to_path_buf(),
        }),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            info!(path = %path.display(), "removing stale control socket");
            match fs::remove_file(path) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(source) => Err(ControlError::RemoveStale {
                    path: path.to_path_buf(),
                    source,
                }),
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(ControlError::RemoveStale {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Whether a peer with `uid` may use the socket of a daemon running as `own_uid`.
fn peer_allowed(uid: u32, own_uid: u32) -> bool {
    uid == 0 || uid == own_uid
}

async fn handle_connection(
    mut stream: UnixStream,
    handler: RequestSender,
    own_uid: u32,
    reply_timeout: Duration,
    events: Option<EventLog>,
) {
    let response = match stream.peer_cred() {
        Ok(cred) if peer_allowed(cred.uid(), own_uid) => match read_request(&mut stream).await {
            Ok(Request::Events { service, follow }) => match events {
                Some(log) => return stream_events(stream, &log, service, follow).await,
                None => Response::error(ErrorKind::Internal, "this daemon keeps no events"),
            },
            Ok(request) => dispatch(request, &handler, reply_timeout).await,
            Err(refusal) => refusal,
        },
        Ok(cred) => {
            warn!(
                uid = cred.uid(),
                pid = ?cred.pid(),
                "control connection refused: peer uid is neither root nor the daemon's"
            );
            Response::error(
                ErrorKind::PermissionDenied,
                format!(
                    "uid {} may not use the control socket (root only)",
                    cred.uid()
                ),
            )
        }
        Err(e) => {
            warn!(error = %e, "control connection refused: cannot read peer credentials");
            Response::error(
                ErrorKind::PermissionDenied,
                "cannot determine peer credentials",
            )
        }
    };
    write_response(&mut stream, &response).await;
}

/// Reads one bounded request line; a bad one is answered with the error to send back.
async fn read_request<R>(read: R) -> Result<Request, Response>
where
    R: tokio::io::AsyncRead + Unpin,
{
    let mut line = Vec::new();
    // One byte past the limit tells "exactly at the limit" from "too long".
    let mut limited = AsyncBufReader::new(read.take(MAX_REQUEST_BYTES as u64 + 1));
    match tokio::time::timeout(REQUEST_READ_TIMEOUT, limited.read_until(b'\n', &mut line)).await {
        Err(_) => {
            return Err(Response::error(
                ErrorKind::BadRequest,
                format!("no request line within {REQUEST_READ_TIMEOUT:?}"),
            ))
        }
        Ok(Err(e)) => {
            debug!(error = %e, "control connection read failed");
            return Err(Response::error(
                ErrorKind::BadRequest,
                format!("cannot read request: {e}"),
            ));
        }
        Ok(Ok(_)) => {}
    }
    let request = decode_request(&line).map_err(|m| Response::error(ErrorKind::BadRequest, m))?;
    debug!(cmd = request.name(), "control request");
    Ok(request)
}

/// Forwards a request to the daemon and waits for the answer.
async fn dispatch(request: Request, handler: &RequestSender, reply_timeout: Duration) -> Response {
    let name = request.name();
    let (tx, rx) = oneshot::channel();
    if handler.send((request, tx)).await.is_err() {
        return Response::error(ErrorKind::Internal, "daemon is shutting down");
    }
    match tokio::time::timeout(reply_timeout, rx).await {
        Ok(Ok(response)) => response,
        Ok(Err(_)) => Response::error(
            ErrorKind::Internal,
            format!("daemon dropped the {name} request without answering"),
        ),
        Err(_) => Response::error(
            ErrorKind::Timeout,
            format!(
                "{name} did not finish within {reply_timeout:?}; it may still complete, check status"
            ),
        ),
    }
}

/// Decodes what a client sent: at most [`MAX_REQUEST_BYTES`] + 1 bytes up to and including the
/// first newline. A line that is too long or is not a [`Request`] is refused with a message that
/// names the problem, for an [`ErrorKind::BadRequest`] answer.
pub fn decode_request(line: &[u8]) -> Result<Request, String> {
    let line = match line.strip_suffix(b"\n") {
        Some(l) => l,
        None if line.len() > MAX_REQUEST_BYTES => {
            warn!("control request longer than {MAX_REQUEST_BYTES} bytes rejected");
            return Err(format!("request line exceeds {MAX_REQUEST_BYTES} bytes"));
        }
        None => line,
    };
    serde_json::from_slice(line).map_err(|e| {
        warn!(error = %e, "malformed control request");
        format!("malformed request: {e}")
    })
}

/// Writes the recent events of `service` (all with `None`) as [`Response::Event`] lines and,
/// with `follow`, every later one until the client hangs up. A client that falls too far
/// behind is told how many events it lost and goes on with the next ones.
async fn stream_events(stream: UnixStream, log: &EventLog, service: Option<String>, follow: bool) {
    let (backlog, mut live) = log.subscribe();
    let (mut read, mut write) = stream.into_split();
    let service = service.as_deref();
    for e in backlog.into_iter().filter(|e| events::matches(e, service)) {
        if !write_line(&mut write, &Response::Event(e)).await {
            return;
        }
    }
    if !follow {
        let _ = write.shutdown().await;
        return;
    }
    let mut scratch = [0u8; 64];
    loop {
        tokio::select! {
            next = live.recv() => match next {
                Ok(e) if events::matches(&e, service) => {
                    if !write_line(&mut write, &Response::Event(e)).await {
                        return;
                    }
                }
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    let lost = Response::error(ErrorKind::Timeout, format!("{n} events were lost: this client read too slowly"));
                    if !write_line(&mut write, &lost).await {
                        return;
                    }
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
            // The client sends nothing more: a read returning means it hung up.
            r = read.read(&mut scratch) => {
                if matches!(r, Ok(0) | Err(_)) {
                    return;
                }
            }
        }
    }
}

/// Writes one response line within [`RESPONSE_WRITE_TIMEOUT`]; false if the client is gone.
async fn write_line<W>(write: &mut W, response: &Response) -> bool
where
    W: tokio::io::AsyncWrite + Unpin,
{
    let Ok(mut line) = serde_json::to_vec(response) else {
        warn!("cannot encode control response");
        return false;
    };
    line.push(b'\n');
    matches!(
        tokio::time::timeout(RESPONSE_WRITE_TIMEOUT, write.write_all(&line)).await,
        Ok(Ok(()))
    )
}

async fn write_response<W>(write: &mut W, response: &Response)
where
    W: tokio::io::AsyncWrite + Unpin,
{
    let mut line = match serde_json::to_vec(response) {
        Ok(l) => l,
        Err(e) => {
            warn!(error = %e, "cannot encode control response");
            return;
        }
    };
    line.push(b'\n');
    let write_all = async {
        write.write_all(&line).await?;
        write.shutdown().await
    };
    match tokio::time::timeout(RESPONSE_WRITE_TIMEOUT, write_all).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => debug!(error = %e, "control client went away before the answer"),
        Err(_) => debug!("control client did not read the answer in time"),
    }
}

/// Sends `req` to the daemon at `path` and waits up to `timeout` for the answer (blocking).
pub fn call(path: &Path, req: &Request, timeout: Duration) -> Result<Response, ControlError> {
    let mut answer = None;
    exchange(path, req, Some(timeout), |r| {
        answer = Some(r);
        false
    })?;
    answer.ok_or_else(|| ControlError::NoResponse {
        path: path.to_path_buf(),
    })
}

/// Sends `req` (e.g. [`Request::Events`]) and hands each answer line to `each` until the
/// daemon ends the stream or `each` returns false (blocking; no timeout between lines). A
/// stream may be empty (no event yet).
pub fn stream(
    path: &Path,
    req: &Request,
    each: impl FnMut(Response) -> bool,
) -> Result<(), ControlError> {
    match exchange(path, req, None, each) {
        Err(ControlError::NoResponse { .. }) => Ok(()),
        other => other,
    }
}

fn exchange(
    path: &Path,
    req: &Request,
    timeout: Option<Duration>,
    mut each: impl FnMut(Response) -> bool,
) -> Result<(), ControlError> {
    let p = || path.to_path_buf();
    let stream = StdUnixStream::connect(path).map_err(|source| match source.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => {
            ControlError::DaemonNotRunning { path: p() }
        }
        io::ErrorKind::PermissionDenied => ControlError::PermissionDenied { path: p() },
        _ => ControlError::Connect { path: p(), source },
    })?;
    // A zero timeout means "block forever" to std; make it the smallest real one instead.
    let timeout = timeout.map(|t| t.max(Duration::from_millis(1)));
    let io_err = |source: io::Error| match (source.kind(), timeout) {
        (io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut, Some(timeout)) => {
            ControlError::Timeout { path: p(), timeout }
        }
        _ => ControlError::Io { path: p(), source },
    };
    stream
        .set_read_timeout(timeout)
        .and_then(|()| stream.set_write_timeout(timeout))
        .map_err(io_err)?;

    let mut line = serde_json::to_vec(req).map_err(ControlError::Encode)?;
    line.push(b'\n');
    (&stream).write_all(&line).map_err(io_err)?;

    let mut reader = BufReader::new(&stream);
    let mut answered = false;
    loop {
        let mut answer = Vec::new();
        (&mut reader)
            .take(MAX_RESPONSE_BYTES as u64 + 1)
            .read_until(b'\n', &mut answer)
            .map_err(io_err)?;
        if answer.is_empty() {
            return if answered {
                Ok(())
            } else {
                Err(ControlError::NoResponse { path: p() })
            };
        }
        if answer.last() == Some(&b'\n') {
            answer.pop();
        } else if answer.len() > MAX_RESPONSE_BYTES {
            return Err(ControlError::ResponseTooLarge { path: p() });
        }
        answered = true;
        let response = serde_json::from_slice(&answer)
            .map_err(|source| ControlError::BadResponse { path: p(), source })?;
        if !each(response) {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::protocol::ErrorKind;
    use crate::events::EventKind;
    use std::os::unix::fs::PermissionsExt;

    /// Answers `Status` with an `Ok`, everything else with `NotFound`, and `Stop` never.
    fn spawn_handler() -> (RequestSender, tokio::task::JoinHandle<Vec<Request>>) {
        let (tx, mut rx) = mpsc::channel::<(Request, oneshot::Sender<Response>)>(8);
        let task = tokio::spawn(async move {
            let mut seen = Vec::new();
            let mut parked = Vec::new();
            while let Some((req, reply)) = rx.recv().await {
                seen.push(req.clone());
                match req {
                    Request::Status => {
                        let _ = reply.send(Response::ok("all good"));
                    }
                    Request::Stop { .. } => parked.push(reply),
                    other => {
                        let _ = reply.send(Response::error(
                            ErrorKind::NotFound,
                            format!("no such thing: {}", other.name()),
                        ));
                    }
                }
            }
            seen
        });
        (tx, task)
    }

    /// Raw exchange: writes `bytes`, returns the parsed answer line.
    fn raw_exchange(path: &Path, bytes: &[u8]) -> Response {
        let mut s = StdUnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s.write_all(bytes).unwrap();
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).unwrap();
        serde_json::from_str(line.trim_end()).unwrap()
    }

    fn blocking<T: Send + 'static>(
        f: impl FnOnce() -> T + Send + 'static,
    ) -> impl std::future::Future<Output = T> {
        let h = tokio::task::spawn_blocking(f);
        async move { h.await.unwrap() }
    }

    fn kind_of(r: &Response) -> Option<ErrorKind> {
        match r {
            Response::Error { kind, .. } => Some(*kind),
            _ => None,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn streams_recent_events_then_follows_until_the_client_leaves() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        let log = EventLog::new();
        log.emit(
            Some("web"),
            EventKind::Stopped {
                domain: "web".into(),
            },
        );
        log.emit(
            Some("db"),
            EventKind::Stopped {
                domain: "db".into(),
            },
        );
        let server = ControlServer::bind(&path).unwrap().with_events(log.clone());
        let (tx, _handler) = spawn_handler();
        let serve = tokio::spawn(server.serve(tx));

        // Not following: the recent events of the service asked for, then the end.
        let p = path.clone();
        let recent = blocking(move || {
            let mut got = Vec::new();
            stream(
                &p,
                &Request::Events {
                    service: Some("web".into()),
                    follow: false,
                },
                |r| {
                    got.push(r);
                    true
                },
            )
            .map(|()| got)
        })
        .await
        .unwrap();
        assert_eq!(recent.len(), 1, "{recent:?}");
        assert!(matches!(&recent[0], Response::Event(e) if e.seq == 1));

        // Following: the backlog, then what happens next, in order.
        let p = path.clone();
        let follower = blocking(move || {
            let mut seqs = Vec::new();
            stream(
                &p,
                &Request::Events {
                    service: None,
                    follow: true,
                },
                |r| {
                    if let Response::Event(e) = r {
                        seqs.push(e.seq);
                    }
                    seqs.len() < 4
                },
            )
            .map(|()| seqs)
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        log.emit(
            Some("web"),
            EventKind::Started {
                domain: "web".into(),
            },
        );
        log.emit(
            None,
            EventKind::ConfigReloaded {
                ok: true,
                error: None,
            },
        );
        assert_eq!(follower.await.unwrap(), [1, 2, 3, 4]);
        serve.abort();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn serves_good_malformed_and_oversized_requests() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/dir/control.sock");
        let server = ControlServer::bind(&path)
            .unwrap()
            .with_reply_timeout(Duration::from_millis(200));
        let mode = fs::symlink_metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(fs::symlink_metadata(&path).unwrap().file_type().is_socket());

        let (tx, handler_task) = spawn_handler();
        let serve = tokio::spawn(server.serve(tx));

        let p = path.clone();
        let r = blocking(move || call(&p, &Request::Status, Duration::from_secs(30)))
            .await
            .unwrap();
        assert_eq!(r, Response::ok("all good"));

        let p = path.clone();
        let r = blocking(move || {
            call(
                &p,
                &Request::Failover {
                    service: "web".into(),
                    to_host: None,
                },
                Duration::from_secs(30),
            )
        })
        .await
        .unwrap();
        assert_eq!(kind_of(&r), Some(ErrorKind::NotFound));

        let p = path.clone();
        let r = blocking(move || raw_exchange(&p, b"{\"cmd\":\"explode\"}\n")).await;
        assert_eq!(kind_of(&r), Some(ErrorKind::BadRequest));
        let Response::Error { message, .. } = &r else {
            unreachable!()
        };
        assert!(message.contains("explode"), "{message}");

        let p = path.clone();
        let r = blocking(move || raw_exchange(&p, b"not json at all\n")).await;
        assert_eq!(kind_of(&r), Some(ErrorKind::BadRequest));

        let p = path.clone();
        let r = blocking(move || {
            let mut big = vec![b' '; MAX_REQUEST_BYTES + 10];
            big.push(b'\n');
            raw_exchange(&p, &big)
        })
        .await;
        assert_eq!(kind_of(&r), Some(ErrorKind::BadRequest));
        let Response::Error { message, .. } = &r else {
            unreachable!()
        };
        assert!(message.contains("exceeds"), "{message}");

        // Padding up to the limit is still fine.
        let p = path.clone();
        let r = blocking(move || {
            let mut line = br#"{"cmd":"status"}"#.to_vec();
            line.resize(MAX_REQUEST_BYTES - 1, b' ');
            line.push(b'\n');
            raw_exchange(&p, &line)
        })
        .await;
        assert_eq!(r, Response::ok("all good"));

        // The handler never answers Stop: the server replies Timeout on its own.
        let p = path.clone();
        let r = blocking(move || {
            call(
                &p,
                &Request::Stop {
                    service: "web".into(),
                },
                Duration::from_secs(30),
            )
        })
        .await
        .unwrap();
        assert_eq!(kind_of(&r), Some(ErrorKind::Timeout));

        // Still serving after all that.
        let p = path.clone();
        let r = blocking(move || call(&p, &Request::Status, Duration::from_secs(30)))
            .await
            .unwrap();
        assert_eq!(r, Response::ok("all good"));

        serve.abort();
        let _ = serve.await;
        // Dropping the server removed its socket file.
        assert!(!path.exists());
        let seen = handler_task.await.unwrap();
        assert_eq!(seen.len(), 5, "{seen:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn serve_returns_when_handler_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.sock");
        let server = ControlServer::bind(&path).unwrap();
        let (tx, rx) = mpsc::channel(1);
        let serve = tokio::spawn(server.serve(tx));
        drop(rx);
        serve.await.unwrap().unwrap();
        assert!(!path.exists());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn second_bind_fails_while_first_serves() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.sock");
        let server = ControlServer::bind(&path).unwrap();
        let (tx, _handler) = spawn_handler();
        let serve = tokio::spawn(server.serve(tx));
        let err = ControlServer::bind(&path).unwrap_err();
        assert!(matches!(err, ControlError::AnotherDaemon { .. }), "{err:?}");
        assert!(err.to_string().contains("another daemon is running"));
        // The live socket was left in place.
        let p = path.clone();
        let r = blocking(move || call(&p, &Request::Status, Duration::from_secs(30)))
            .await
            .unwrap();
        assert_eq!(r, Response::ok("all good"));
        serve.abort();
    }

    #[test]
    fn stale_socket_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.sock");
        // A socket file with no listener behind it, like after a crash.
        drop(StdUnixListener::bind(&path).unwrap());
        assert!(fs::symlink_metadata(&path).unwrap().file_type().is_socket());
        assert_eq!(
            StdUnixStream::connect(&path).unwrap_err().kind(),
            io::ErrorKind::ConnectionRefused
        );
        let server = ControlServer::bind(&path).unwrap();
        let meta = fs::symlink_metadata(&path).unwrap();
        // Live now: the kernel queues the connection on the new listener.
        StdUnixStream::connect(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        // Nothing else left behind in the directory.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
        drop(server);
        assert!(!path.exists());
    }

    #[test]
    fn non_socket_file_is_not_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.sock");
        fs::write(&path, b"precious").unwrap();
        let err = ControlServer::bind(&path).unwrap_err();
        assert!(matches!(err, ControlError::NotASocket { .. }), "{err:?}");
        assert_eq!(fs::read(&path).unwrap(), b"precious");
    }

    #[test]
    fn dropping_a_replaced_server_keeps_the_new_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.sock");
        let first = ControlServer::bind(&path).unwrap();
        // Someone else replaced the file meanwhile.
        fs::remove_file(&path).unwrap();
        let _other = StdUnixListener::bind(&path).unwrap();
        drop(first);
        assert!(path.exists());
    }

    #[test]
    fn client_errors_are_clear() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing.sock");
        let err = call(&path, &Request::Status, Duration::from_secs(1)).unwrap_err();
        assert!(matches!(err, ControlError::DaemonNotRunning { .. }));
        assert_eq!(
            err.to_string(),
            format!("daemon not running: no socket at {}", path.display())
        );

        // Stale socket: refused, also reported as not running.
        drop(StdUnixListener::bind(&path).unwrap());
        let err = call(&path, &Request::Status, Duration::from_secs(1)).unwrap_err();
        assert!(matches!(err, ControlError::DaemonNotRunning { .. }));
    }

    #[test]
    fn client_times_out_and_reports_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.sock");
        let listener = StdUnixListener::bind(&path).unwrap();
        // A listener that accepts and never answers.
        let err = call(&path, &Request::Status, Duration::from_millis(50)).unwrap_err();
        assert!(matches!(err, ControlError::Timeout { .. }), "{err:?}");

        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap(); // the timed-out one
            drop(s);
            (s, _) = listener.accept().unwrap();
            let mut req = String::new();
            BufReader::new(&s).read_line(&mut req).unwrap();
            s.write_all(b"{\"type\":\"nonsense\"}\n").unwrap();
            let (s2, _) = listener.accept().unwrap();
            drop(s2);
        });
        let err = call(&path, &Request::Status, Duration::from_secs(30)).unwrap_err();
        assert!(matches!(err, ControlError::BadResponse { .. }), "{err:?}");
        let err = call(&path, &Request::Status, Duration::from_secs(30)).unwrap_err();
        assert!(
            matches!(
                err,
                ControlError::NoResponse { .. } | ControlError::Io { .. }
            ),
            "{err:?}"
        );
        server.join().unwrap();
    }

    #[test]
    fn only_root_and_own_uid_are_allowed() {
        assert!(peer_allowed(0, 1000));
        assert!(peer_allowed(1000, 1000));
        assert!(!peer_allowed(1001, 1000));
        assert!(peer_allowed(0, 0));
        assert!(!peer_allowed(65534, 0));
    }

    const PEER_SOCKET_ENV: &str = "UNDERSTUDY_TEST_PEER_SOCKET";

    /// Run by `foreign_uid_is_refused` in a child process as uid 65534.
    #[test]
    #[ignore = "helper run by foreign_uid_is_refused as another user"]
    fn peer_client_helper() {
        let Some(path) = std::env::var_os(PEER_SOCKET_ENV) else {
            return;
        };
        let r = call(Path::new(&path), &Request::Status, Duration::from_secs(30));
        println!(
            "PEER-RESULT {}",
            serde_json::to_string(&r.unwrap()).unwrap()
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn foreign_uid_is_refused() {
        use std::os::unix::process::CommandExt;
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipping foreign_uid_is_refused: needs root to run a client as another uid");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let path = dir.path().join("c.sock");
        let server = ControlServer::bind(&path).unwrap();
        // Open the file mode so that only the SO_PEERCRED check stands in the way.
        fs::set_permissions(&path, fs::Permissions::from_mode(0o666)).unwrap();
        let (tx, handler_task) = spawn_handler();
        let serve = tokio::spawn(server.serve(tx));

        let exe = std::env::current_exe().unwrap();
        let p = path.clone();
        let output = blocking(move || {
            std::process::Command::new(exe)
                .args([
                    "--exact",
                    "api::control::tests::peer_client_helper",
                    "--ignored",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env(PEER_SOCKET_ENV, &p)
                .uid(65534)
                .gid(65534)
                .output()
                .unwrap()
        })
        .await;
        // libtest may route the helper's output to either stream; look in both.
        let text = format!(
            "{}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        let Some(line) = text
            .lines()
            .find_map(|l| l.split_once("PEER-RESULT ").map(|(_, r)| r))
        else {
            eprintln!(
                "skipping foreign_uid_is_refused: helper could not run as uid 65534 ({}): {text}",
                output.status
            );
            serve.abort();
            return;
        };
        let r: Response = serde_json::from_str(line).unwrap();
        assert_eq!(kind_of(&r), Some(ErrorKind::PermissionDenied), "{r:?}");
        serve.abort();
        let _ = serve.await;
        // The refused request never reached the daemon.
        assert!(handler_task.await.unwrap().is_empty());
    }
}
