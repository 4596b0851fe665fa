//! One stream to the control plane, from Hello to its end.
//!
//! The connection task owns both halves of the stream: it sends Hello, waits
//! for Welcome, then selects over cancellation, fault injection, the heartbeat
//! timer, command results, self-exits of boxes and incoming commands. Commands
//! run in their own tasks and hand their results back through a channel, so a
//! slow spawn never delays a heartbeat. Any failed send means the stream is gone.

use std::error::Error as StdError;
use std::sync::Arc;
use std::time::Duration;

use switchboard_proto::v1::host_service_client::HostServiceClient;
use switchboard_proto::v1::{
    CommandResult, ControlMessage, Goodbye, Heartbeat, Hello, HostMessage, MandelboxExited, Welcome, control_message,
    host_message,
};
use tokio::sync::{broadcast, mpsc};
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status, Streaming};
use tracing::{Instrument, debug, error, info, warn};

use crate::AGENT_VERSION;
use crate::commands::{self, CommandContext};
use crate::handle::Shared;
use crate::metrics;
use crate::options::AgentOptions;
use crate::runtime::{ExitNotice, MandelboxRuntime};

/// How long the control plane has to answer Hello with Welcome.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long, after Goodbye, the agent waits for the control plane to close its half.
const GOODBYE_GRACE: Duration = Duration::from_secs(1);
/// Heartbeat interval when the Welcome does not name one.
const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(5);
const MIN_HEARTBEAT_INTERVAL: Duration = Duration::from_millis(10);

/// What a connection needs from the agent.
pub(crate) struct ConnectionContext<'a> {
    pub(crate) options: &'a AgentOptions,
    pub(crate) endpoint: &'a Endpoint,
    pub(crate) runtime: &'a Arc<dyn MandelboxRuntime>,
    pub(crate) shared: &'a Arc<Shared>,
}

/// How a connection ended.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// Shutdown was requested; Goodbye was sent if the stream was up.
    Shutdown,
    /// The stream failed or ended; the agent reconnects.
    Lost(Lost),
}

/// Why a connection ended, for logs and for choosing the backoff.
#[derive(Debug)]
pub(crate) struct Lost {
    pub(crate) error: String,
    /// The gRPC status code, when the control plane (or tonic) gave one.
    pub(crate) code: Option<Code>,
    /// How long the stream was up after Welcome; `None` if it never was.
    pub(crate) connected_for: Option<Duration>,
}

impl Lost {
    fn new(error: impl Into<String>) -> Self {
        Self { error: error.into(), code: None, connected_for: None }
    }

    fn from_status(context: &str, status: &Status) -> Self {
        Self {
            error: format!("{context}: {}", describe_status(status)),
            code: Some(status.code()),
            connected_for: None,
        }
    }

    /// The control plane refused this host; retrying fast cannot help.
    pub(crate) fn is_rejection(&self) -> bool {
        matches!(self.code, Some(Code::Unauthenticated | Code::PermissionDenied | Code::InvalidArgument))
    }
}

/// An open stream after a successful handshake.
struct Stream {
    /// Keeps the connection up for as long as the stream lives.
    _client: HostServiceClient<Channel>,
    outbound: mpsc::UnboundedSender<HostMessage>,
    inbound: Streaming<ControlMessage>,
    exits: broadcast::Receiver<ExitNotice>,
    welcome: Welcome,
    announced: usize,
}

/// Opens a stream, serves it until it ends or `shutdown` is cancelled, and says
/// how it ended. Command tasks go into `tasks`, which outlives the connection.
pub(crate) async fn run(cx: &ConnectionContext<'_>, tasks: &mut JoinSet<()>, shutdown: &CancellationToken) -> Outcome {
    let mut drop_requests = cx.shared.drop_connection.subscribe();
    let stream = tokio::select! {
        _ = shutdown.cancelled() => return Outcome::Shutdown,
        Ok(()) = drop_requests.changed() => {
            return Outcome::Lost(Lost::new("connection dropped on request during handshake"));
        }
        result = handshake(cx) => match result {
            Ok(stream) => stream,
            Err(lost) => return Outcome::Lost(lost),
        },
    };
    let Stream { _client, outbound, mut inbound, mut exits, welcome, announced } = stream;
    let welcomed_at = Instant::now();

    let interval = heartbeat_interval(welcome.heartbeat_interval_ms);
    let session_events_endpoint = if welcome.session_events_endpoint.is_empty() {
        cx.options.endpoint.clone()
    } else {
        welcome.session_events_endpoint.clone()
    };
    cx.shared.status.send_modify(|s| {
        s.connected = true;
        s.generation = welcome.generation;
        s.connections += 1;
    });
    info!(
        generation = welcome.generation,
        heartbeat_interval_ms = interval.as_millis() as u64,
        mandelboxes = announced,
        "connected"
    );

    let command_cx =
        CommandContext { runtime: Arc::clone(cx.runtime), shared: Arc::clone(cx.shared), session_events_endpoint };
    let (results_tx, mut results) = mpsc::unbounded_channel::<CommandResult>();
    let mut heartbeat = tokio::time::interval_at(welcomed_at + interval, interval);
    heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut sequence = 0u64;
    let mut exits_open = true;
    let send = |body: host_message::Body| -> Result<(), Lost> {
        outbound.send(HostMessage { body: Some(body) }).map_err(|_| Lost::new("stream closed"))
    };

    let lost = loop {
        let step: Result<(), Lost> = tokio::select! {
            biased;
            _ = shutdown.cancelled() => {
                let sent = send(host_message::Body::Goodbye(Goodbye { reason: "shutdown".to_owned() }));
                drop(outbound);
                if sent.is_ok() {
                    // Let the control plane read the Goodbye and close its half.
                    let closed = tokio::time::timeout(GOODBYE_GRACE, async {
                        while let Ok(Some(_)) = inbound.message().await {}
                    })
                    .await;
                    info!(closed_by_peer = closed.is_ok(), "said goodbye");
                }
                return Outcome::Shutdown;
            }
            Ok(()) = drop_requests.changed() => {
                warn!("dropping the connection on request");
                Err(Lost::new("connection dropped on request"))
            }
            _ = heartbeat.tick() => {
                if cx.shared.heartbeats_paused() {
                    Ok(())
                } else {
                    sequence += 1;
                    let load = metrics::host_load();
                    send(host_message::Body::Heartbeat(Heartbeat {
                        running_mandelboxes: u32::try_from(cx.runtime.running().len()).unwrap_or(u32::MAX),
                        cpu_load: load.cpu_load,
                        memory_used_bytes: load.memory_used_bytes,
                        sequence,
                    }))
                }
            }
            Some(result) = results.recv() => send(host_message::Body::Result(result)),
            exit = exits.recv(), if exits_open => match exit {
                Ok(notice) => {
                    info!(mandelbox_id = notice.mandelbox_id, reason = notice.reason, "reporting mandelbox exit");
                    send(host_message::Body::Exited(MandelboxExited {
                        mandelbox_id: notice.mandelbox_id,
                        reason: notice.reason,
                    }))
                }
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    warn!(missed, "missed mandelbox exit notices");
                    Ok(())
                }
                Err(broadcast::error::RecvError::Closed) => {
                    exits_open = false;
                    Ok(())
                }
            },
            message = inbound.message() => match message {
                Ok(Some(ControlMessage { body: Some(control_message::Body::Command(command)) })) => {
                    let command_id = command.command_id.clone();
                    debug!(command_id, kind = commands::kind_name(command.kind.as_ref()), "command received");
                    command_cx.shared.commands_received.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let command_cx = command_cx.clone();
                    let results_tx = results_tx.clone();
                    tasks.spawn(
                        async move {
                            let result = commands::execute(&command_cx, command).await;
                            if results_tx.send(result).is_err() {
                                warn!(command_id, "stream gone, command result dropped");
                            }
                        }
                        .in_current_span(),
                    );
                    reap(tasks);
                    Ok(())
                }
                Ok(Some(ControlMessage { body: Some(control_message::Body::Welcome(_)) })) => {
                    warn!("unexpected second welcome, ignored");
                    Ok(())
                }
                Ok(Some(ControlMessage { body: None })) => {
                    debug!("empty or unknown control message, ignored");
                    Ok(())
                }
                Ok(None) => Err(Lost::new("control plane closed the stream")),
                Err(status) => Err(Lost::from_status("stream failed", &status)),
            },
        };
        if let Err(lost) = step {
            break lost;
        }
    };
    Outcome::Lost(Lost { connected_for: Some(welcomed_at.elapsed()), ..lost })
}

/// Connects, sends Hello and waits for Welcome.
async fn handshake(cx: &ConnectionContext<'_>) -> Result<Stream, Lost> {
    let channel = cx.endpoint.connect().await.map_err(|e| Lost::new(format!("connect failed: {}", error_chain(&e))))?;
    let mut client = HostServiceClient::new(channel);

    // Subscribe before listing the boxes, so no exit falls between the two.
    let exits = cx.runtime.exits();
    let mandelboxes = cx.runtime.running();
    let announced = mandelboxes.len();
    let options = cx.options;
    let hello = Hello {
        host_id: options.host_id.clone(),
        region: options.region.clone(),
        image: options.image.clone(),
        agent_version: AGENT_VERSION.to_owned(),
        capacity: options.capacity,
        address: options.address.clone(),
        mandelboxes,
        credential: options.credential.clone(),
    };
    let (outbound, outbound_rx) = mpsc::unbounded_channel();
    outbound
        .send(HostMessage { body: Some(host_message::Body::Hello(hello)) })
        .map_err(|_| Lost::new("stream closed before hello"))?;
    debug!(mandelboxes = announced, "hello queued");

    let answer = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        let response = client
            .connect(UnboundedReceiverStream::new(outbound_rx))
            .await
            .map_err(|status| Lost::from_status("rejected", &status))?;
        let mut inbound = response.into_inner();
        match inbound.message().await {
            Ok(Some(ControlMessage { body: Some(control_message::Body::Welcome(welcome)) })) => Ok((inbound, welcome)),
            Ok(Some(_)) => Err(Lost::new("protocol error: first control message is not a welcome")),
            Ok(None) => Err(Lost::new("control plane closed the stream before welcome")),
            Err(status) => Err(Lost::from_status("rejected", &status)),
        }
    })
    .await;
    let (inbound, welcome) = match answer {
        Ok(result) => result?,
        Err(_) => {
            return Err(Lost::new(format!("no welcome within {HANDSHAKE_TIMEOUT:?}")));
        }
    };
    Ok(Stream { _client: client, outbound, inbound, exits, welcome, announced })
}

/// Collects finished command tasks so the set does not grow without bound.
fn reap(tasks: &mut JoinSet<()>) {
    while let Some(done) = tasks.try_join_next() {
        if let Err(e) = done
            && e.is_panic()
        {
            error!("command task panicked");
        }
    }
}

fn heartbeat_interval(ms: u32) -> Duration {
    if ms == 0 { DEFAULT_HEARTBEAT_INTERVAL } else { Duration::from_millis(u64::from(ms)).max(MIN_HEARTBEAT_INTERVAL) }
}

/// `UNAUTHENTICATED: BAD_HOST_CREDENTIAL: ...`
pub(crate) fn describe_status(status: &Status) -> String {
    let name = match status.code() {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    };
    if status.message().is_empty() { name.to_owned() } else { format!("{name}: {}", status.message()) }
}

/// An error and its sources: tonic's transport errors say little at the top.
fn error_chain(error: &dyn StdError) -> String {
    let mut parts = vec![error.to_string()];
    let mut source = error.source();
    while let Some(e) = source {
        let part = e.to_string();
        // hyper and tonic repeat themselves ("tcp connect error: tcp connect error").
        if parts.last() != Some(&part) {
            parts.push(part);
        }
        source = e.source();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejections_are_the_codes_retrying_cannot_fix() {
        let with = |code| Lost::from_status("rejected", &Status::new(code, "x"));
        assert!(with(Code::Unauthenticated).is_rejection());
        assert!(with(Code::PermissionDenied).is_rejection());
        assert!(with(Code::InvalidArgument).is_rejection());
        assert!(!with(Code::Unavailable).is_rejection());
        assert!(!with(Code::Aborted).is_rejection());
        assert!(!Lost::new("connect failed").is_rejection());
        assert_eq!(with(Code::Unauthenticated).error, "rejected: UNAUTHENTICATED: x");
    }

    #[test]
    fn heartbeat_interval_defaults_and_floor() {
        assert_eq!(heartbeat_interval(0), DEFAULT_HEARTBEAT_INTERVAL);
        assert_eq!(heartbeat_interval(1), MIN_HEARTBEAT_INTERVAL);
        assert_eq!(heartbeat_interval(250), Duration::from_millis(250));
    }
}
