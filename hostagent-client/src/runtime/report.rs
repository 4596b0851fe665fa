//! What a mandelbox does when its client leaves: tell the control plane
//! (`SessionEventsService/ReportDisconnect`), retrying while it is unreachable.

use std::time::Duration;

use switchboard_proto::v1::ReportDisconnectRequest;
use switchboard_proto::v1::session_events_service_client::SessionEventsServiceClient;
use tonic::Code;
use tonic::transport::Endpoint;
use tracing::{debug, info, warn};

use crate::backoff::{Backoff, BackoffSchedule};

/// How many times a disconnect report is tried before giving up.
pub(crate) const REPORT_ATTEMPTS: u32 = 5;

const REPORT_TIMEOUT: Duration = Duration::from_secs(5);

const REPORT_BACKOFF: Backoff =
    Backoff { initial: Duration::from_millis(100), max: Duration::from_secs(2), multiplier: 2.0 };

/// Why one report attempt failed.
#[derive(Debug)]
enum Failure {
    /// Worth another try (unreachable, overloaded, timed out).
    Transient(String),
    /// Retrying cannot help (bad token, no session, malformed request).
    Permanent(String),
}

/// Reports that the client of `mandelbox_id` left. Returns whether the control
/// plane accepted the report. Never logs the token.
pub(crate) async fn report_disconnect(endpoint: &str, mandelbox_id: &str, token: &str) -> bool {
    if endpoint.is_empty() {
        warn!(mandelbox_id, "no session events endpoint, disconnect not reported");
        return false;
    }
    let mut schedule = BackoffSchedule::new(REPORT_BACKOFF);
    for attempt in 1..=REPORT_ATTEMPTS {
        match report_once(endpoint, mandelbox_id, token).await {
            Ok(session_id) => {
                info!(mandelbox_id, session_id, attempt, "disconnect reported");
                return true;
            }
            Err(Failure::Permanent(error)) => {
                warn!(mandelbox_id, attempt, error, "disconnect report rejected, giving up");
                return false;
            }
            Err(Failure::Transient(error)) if attempt < REPORT_ATTEMPTS => {
                let delay = schedule.next_delay(&mut rand::thread_rng());
                debug!(
                    mandelbox_id,
                    attempt,
                    error,
                    delay_ms = delay.as_millis() as u64,
                    "disconnect report failed, retrying"
                );
                tokio::time::sleep(delay).await;
            }
            Err(Failure::Transient(error)) => {
                warn!(mandelbox_id, attempt, error, "disconnect report failed, giving up");
            }
        }
    }
    false
}

async fn report_once(endpoint: &str, mandelbox_id: &str, token: &str) -> Result<String, Failure> {
    let endpoint = Endpoint::from_shared(endpoint.to_owned())
        .map_err(|e| Failure::Permanent(format!("bad session events endpoint: {e}")))?
        .connect_timeout(REPORT_TIMEOUT)
        .timeout(REPORT_TIMEOUT);
    let channel = endpoint.connect().await.map_err(|e| Failure::Transient(format!("connect: {e}")))?;
    let request = ReportDisconnectRequest { mandelbox_id: mandelbox_id.to_owned(), token: token.to_owned() };
    match SessionEventsServiceClient::new(channel).report_disconnect(request).await {
        Ok(response) => Ok(response.into_inner().session_id),
        Err(status) => {
            let error = format!("{:?}: {}", status.code(), status.message());
            match status.code() {
                Code::Unavailable
                | Code::DeadlineExceeded
                | Code::ResourceExhausted
                | Code::Aborted
                | Code::Internal
                | Code::Unknown
                | Code::Cancelled => Err(Failure::Transient(error)),
                _ => Err(Failure::Permanent(error)),
            }
        }
    }
}
