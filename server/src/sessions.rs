//! Reading, watching and ending sessions, for their owner (or an admin), and
//! the protocol server's disconnect report.

use std::pin::Pin;

use futures::Stream;
use switchboard_proto::v1::SessionUpdate;
use tokio::sync::broadcast::error::RecvError;
use uuid::Uuid;

use crate::{
    allocation::PendingSessions,
    api::convert,
    auth::{Principal, mandelbox_token},
    core::SharedCore,
    error::{ApiError, ApiResult},
    events::{Event, SessionChange},
    model::{EndReason, MandelboxState, SessionRecord, SessionState},
    session_ends::SessionEnds,
    store::{DisconnectReport, TokenEnd},
};

pub type SessionUpdates = Pin<Box<dyn Stream<Item = Result<SessionUpdate, tonic::Status>> + Send>>;

#[derive(Clone)]
pub struct Sessions {
    core: SharedCore,
    pending: PendingSessions,
}

pub fn parse_id(text: &str, what: &str) -> ApiResult<Uuid> {
    Uuid::parse_str(text).map_err(|_| ApiError::InvalidRequest(format!("{what} {text:?} is not a UUID")))
}

impl Sessions {
    pub fn new(core: SharedCore, pending: PendingSessions) -> Self {
        Sessions { core, pending }
    }

    /// The session if the caller may see it; another user's is NOT_FOUND, so
    /// ids cannot be probed.
    async fn owned(&self, principal: &Principal, session_id: &str) -> ApiResult<SessionRecord> {
        let id = parse_id(session_id, "session_id")?;
        match self.core.store.get_session(id).await? {
            Some(session) if session.user_id == principal.user_id() || principal.is_admin() => Ok(session),
            _ => Err(ApiError::SessionNotFound),
        }
    }

    pub async fn get(&self, principal: &Principal, session_id: &str) -> ApiResult<switchboard_proto::v1::Session> {
        let session = self.owned(principal, session_id).await?;
        Ok(convert::session(&self.core.session_change(&session).await))
    }

    pub async fn end(&self, principal: &Principal, session_id: &str) -> ApiResult<switchboard_proto::v1::Session> {
        let session = self.owned(principal, session_id).await?;
        self.pending.remove(session.id);
        let ended = self.core.end_session(session.id, EndReason::UserEnded).await?.ok_or(ApiError::SessionNotFound)?;
        Ok(convert::session(&self.core.session_change(&ended.session).await))
    }

    /// The session now, then each change until it ends. Subscribes before
    /// reading, so no change between the read and the subscription is missed.
    pub async fn watch(&self, principal: &Principal, session_id: &str) -> ApiResult<SessionUpdates> {
        let mut events = self.core.events.subscribe();
        let session = self.owned(principal, session_id).await?;
        let owner = session.user_id == principal.user_id();
        let first = self.core.session_change(&session).await;
        let core = self.core.clone();
        let pending = self.pending.clone();
        let id = session.id;
        let stream = async_stream(move |sender| async move {
            let mut last_state = first.session.state;
            // A session that is already running may have been fulfilled just
            // now on another replica: ask briefly (a running session allocated
            // at once has no key waiting anywhere, so the wait is short).
            let mut first_key = session_key(&first, owner, &pending);
            if first_key.is_empty() {
                first_key = remote_key(&core, &first, owner, FIRST_KEY_WAIT).await;
            }
            if sender.send(Ok(update(&first, first_key))).await.is_err() || last_state == SessionState::Ended {
                return;
            }
            loop {
                let change = match events.recv().await {
                    Ok(Event::Session(change)) if change.session.id == id => *change,
                    Ok(_) => continue,
                    Err(RecvError::Lagged(_)) => match core.store.get_session(id).await {
                        Ok(Some(session)) => core.session_change(&session).await,
                        _ => return,
                    },
                    Err(RecvError::Closed) => return,
                };
                let mut key = session_key(&change, owner, &pending);
                if key.is_empty() && last_state != SessionState::Running {
                    key = remote_key(&core, &change, owner, KEY_WAIT).await;
                }
                if change.session.state == last_state && key.is_empty() {
                    continue;
                }
                last_state = change.session.state;
                if sender.send(Ok(update(&change, key))).await.is_err() || last_state == SessionState::Ended {
                    return;
                }
            }
        });
        Ok(stream)
    }

    /// The protocol server in a mandelbox reports that its client left.
    /// Wrong or used tokens change nothing.
    pub async fn report_disconnect(&self, mandelbox_id: &str, token: &str) -> ApiResult<Uuid> {
        let id = parse_id(mandelbox_id, "mandelbox_id")?;
        let reason = SessionEnds::REASON;
        let report = DisconnectReport { mandelbox_id: id, token_hash: mandelbox_token::hash(token) };
        match self.core.session_ends.end_by_token(report).await? {
            TokenEnd::UnknownBox => Err(ApiError::BadMandelboxToken),
            TokenEnd::WrongToken => {
                tracing::warn!(mandelbox_id = %id, "disconnect report with a wrong token");
                Err(ApiError::BadMandelboxToken)
            }
            // Its session already ended: the token was used, or the box is gone.
            TokenEnd::NoSession(MandelboxState::Dying | MandelboxState::Dead | MandelboxState::Lost) => {
                Err(ApiError::BadMandelboxToken)
            }
            TokenEnd::NoSession(_) => Err(ApiError::MandelboxNotAssigned),
            TokenEnd::Ended { session_id, ended } => {
                if let Some(ended) = ended {
                    self.core.session_ended(&ended, reason).await;
                }
                Ok(session_id)
            }
        }
    }
}

/// How long a watcher on another replica waits for a just-fulfilled session's key.
const KEY_WAIT: std::time::Duration = std::time::Duration::from_secs(2);
/// The same, for a session already running when the watch starts.
const FIRST_KEY_WAIT: std::time::Duration = std::time::Duration::from_millis(250);

/// The key of a session fulfilled by another replica (several replicas only).
async fn remote_key(
    core: &crate::core::Core,
    change: &SessionChange,
    owner: bool,
    wait: std::time::Duration,
) -> String {
    match &core.cluster {
        Some(cluster) if owner && change.session.state == SessionState::Running => {
            cluster.take_session_key(change.session.id, wait).await.unwrap_or_default()
        }
        _ => String::new(),
    }
}

/// The key of a pending session that just started, for its owner, once.
fn session_key(change: &SessionChange, owner: bool, pending: &PendingSessions) -> String {
    if owner && change.session.state == SessionState::Running {
        pending.take_key(change.session.id).unwrap_or_default()
    } else {
        String::new()
    }
}

fn update(change: &SessionChange, session_key: String) -> SessionUpdate {
    SessionUpdate { session: Some(convert::session(change)), session_key }
}

/// A stream fed by a task through a channel; the task stops when the receiver
/// (the client) goes away.
fn async_stream<F, Fut>(body: F) -> SessionUpdates
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<SessionUpdate, tonic::Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (sender, receiver) = tokio::sync::mpsc::channel(16);
    tokio::spawn(body(sender));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(receiver))
}
