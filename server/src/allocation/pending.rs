//! Pending sessions of this replica. What a host needs to start a user's
//! session includes the config-encryption token, which is never stored, so a
//! pending session can only be fulfilled where its Allocate arrived; it is
//! kept here, in memory, until then. Session keys of fulfilled pending sessions
//! wait here too, for the owner's WatchSession to pick them up once.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use uuid::Uuid;

/// The part of an Allocate request that only the host may see.
#[derive(Clone)]
pub struct AssignmentSecrets {
    pub user_id: String,
    pub client_data_json: String,
    pub config_encryption_token: String,
}

impl std::fmt::Debug for AssignmentSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AssignmentSecrets").field("user_id", &self.user_id).finish_non_exhaustive()
    }
}

struct Waiting {
    regions: Vec<String>,
    secrets: AssignmentSecrets,
    since: Instant,
}

#[derive(Default)]
struct Inner {
    waiting: HashMap<Uuid, Waiting>,
    keys: HashMap<Uuid, (String, Instant)>,
}

/// How long a session key waits for its watcher.
const KEY_HANDOFF_TTL: Duration = Duration::from_secs(300);

#[derive(Clone, Default)]
pub struct PendingSessions {
    inner: Arc<Mutex<Inner>>,
}

impl PendingSessions {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn insert(&self, session_id: Uuid, regions: Vec<String>, secrets: AssignmentSecrets) {
        self.lock().waiting.insert(session_id, Waiting { regions, secrets, since: Instant::now() });
    }

    pub fn remove(&self, session_id: Uuid) {
        self.lock().waiting.remove(&session_id);
    }

    pub fn secrets(&self, session_id: Uuid) -> Option<AssignmentSecrets> {
        self.lock().waiting.get(&session_id).map(|waiting| waiting.secrets.clone())
    }

    /// Pending sessions that accept `region` (all of them for None), oldest first.
    pub fn waiting_for(&self, region: Option<&str>) -> Vec<Uuid> {
        let inner = self.lock();
        let mut matching: Vec<(&Uuid, &Waiting)> = inner
            .waiting
            .iter()
            .filter(|(_, waiting)| region.is_none_or(|region| waiting.regions.iter().any(|r| r == region)))
            .collect();
        matching.sort_by_key(|(_, waiting)| waiting.since);
        matching.into_iter().map(|(id, _)| *id).collect()
    }

    pub fn len(&self) -> usize {
        self.lock().waiting.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn hand_over_key(&self, session_id: Uuid, key: String) {
        let mut inner = self.lock();
        let now = Instant::now();
        inner.keys.retain(|_, (_, at)| now.duration_since(*at) < KEY_HANDOFF_TTL);
        inner.keys.insert(session_id, (key, now));
    }

    /// The key of a fulfilled pending session, once.
    pub fn take_key(&self, session_id: Uuid) -> Option<String> {
        self.lock().keys.remove(&session_id).map(|(key, _)| key)
    }
}
