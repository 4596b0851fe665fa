//! A runtime for tests: the real local runtime, plus what a test needs to see
//! (the disconnect tokens the control plane issued) and to provoke (slow spawns).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use async_trait::async_trait;
use hostagent_client::{AssignSpec, Assignment, ExitNotice, LocalRuntime, MandelboxRuntime, RuntimeError, SpawnSpec};
use switchboard_proto::v1::{Port, RunningMandelbox};
use tokio::sync::broadcast;

#[derive(Clone)]
pub struct ObservedRuntime {
    inner: Arc<LocalRuntime>,
    tokens: Arc<Mutex<HashMap<String, String>>>,
    spawn_delay: Arc<Mutex<Duration>>,
    assign_delay: Arc<Mutex<Duration>>,
    /// Teardown commands received, by box.
    teardowns: Arc<Mutex<HashMap<String, usize>>>,
    /// Boxes whose spawn began, in order.
    spawned: Arc<Mutex<Vec<String>>>,
    /// The next spawned box crashes right after its spawn is confirmed.
    crash_next_spawn: Arc<std::sync::atomic::AtomicBool>,
    exits: broadcast::Sender<ExitNotice>,
}

impl Default for ObservedRuntime {
    fn default() -> Self {
        ObservedRuntime::new()
    }
}

impl ObservedRuntime {
    pub fn new() -> Self {
        let inner = Arc::new(LocalRuntime::new());
        let (exits, _) = broadcast::channel(64);
        // Exits of the real runtime are passed on, next to simulated ones.
        let mut inner_exits = inner.exits();
        let forward = exits.clone();
        tokio::spawn(async move {
            while let Ok(notice) = inner_exits.recv().await {
                let _ = forward.send(notice);
            }
        });
        ObservedRuntime {
            inner,
            tokens: Arc::default(),
            spawn_delay: Arc::default(),
            assign_delay: Arc::default(),
            teardowns: Arc::default(),
            spawned: Arc::default(),
            crash_next_spawn: Arc::default(),
            exits,
        }
    }

    /// The boxes whose spawn has begun (before any spawn delay), in order.
    pub fn spawned(&self) -> Vec<String> {
        self.spawned.lock().map(|spawned| spawned.clone()).unwrap_or_default()
    }

    /// The next box spawned dies a few milliseconds after its spawn is
    /// confirmed (a box that crashes as it starts).
    pub fn crash_next_spawn(&self) {
        self.crash_next_spawn.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Makes every later assign take this long (a host that does not answer in time).
    pub fn set_assign_delay(&self, delay: Duration) {
        if let Ok(mut slot) = self.assign_delay.lock() {
            *slot = delay;
        }
    }

    /// The box dies by itself (crash): it stops and the agent reports it exited.
    pub async fn crash(&self, mandelbox_id: &str) -> Result<(), RuntimeError> {
        self.inner.teardown(mandelbox_id).await?;
        let _ = self.exits.send(ExitNotice { mandelbox_id: mandelbox_id.into(), reason: "crashed".into() });
        Ok(())
    }

    /// The disconnect token the control plane gave this box at spawn.
    pub fn token_of(&self, mandelbox_id: &str) -> Option<String> {
        self.tokens.lock().ok()?.get(mandelbox_id).cloned()
    }

    /// How many teardown commands the host received for this box.
    pub fn teardowns_of(&self, mandelbox_id: &str) -> usize {
        self.teardowns.lock().map(|teardowns| teardowns.get(mandelbox_id).copied().unwrap_or(0)).unwrap_or(0)
    }

    /// Makes every later spawn take this long.
    pub fn set_spawn_delay(&self, delay: Duration) {
        if let Ok(mut slot) = self.spawn_delay.lock() {
            *slot = delay;
        }
    }
}

#[async_trait]
impl MandelboxRuntime for ObservedRuntime {
    async fn spawn(&self, spec: SpawnSpec) -> Result<Vec<Port>, RuntimeError> {
        if let Ok(mut spawned) = self.spawned.lock() {
            spawned.push(spec.mandelbox_id.clone());
        }
        let delay = self.spawn_delay.lock().map(|delay| *delay).unwrap_or_default();
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if let Ok(mut tokens) = self.tokens.lock() {
            tokens.insert(spec.mandelbox_id.clone(), spec.disconnect_token.clone());
        }
        let id = spec.mandelbox_id.clone();
        let ports = self.inner.spawn(spec).await?;
        if self.crash_next_spawn.swap(false, std::sync::atomic::Ordering::SeqCst) {
            let runtime = self.clone();
            tokio::spawn(async move {
                // After the agent has sent the spawn's result.
                tokio::time::sleep(Duration::from_millis(20)).await;
                let _ = runtime.crash(&id).await;
            });
        }
        Ok(ports)
    }

    async fn assign(&self, spec: AssignSpec) -> Result<Assignment, RuntimeError> {
        let delay = self.assign_delay.lock().map(|delay| *delay).unwrap_or_default();
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        self.inner.assign(spec).await
    }

    async fn teardown(&self, mandelbox_id: &str) -> Result<(), RuntimeError> {
        if let Ok(mut teardowns) = self.teardowns.lock() {
            *teardowns.entry(mandelbox_id.to_owned()).or_default() += 1;
        }
        self.inner.teardown(mandelbox_id).await
    }

    fn running(&self) -> Vec<RunningMandelbox> {
        self.inner.running()
    }

    fn exits(&self) -> broadcast::Receiver<ExitNotice> {
        self.exits.subscribe()
    }

    async fn teardown_all(&self) {
        self.inner.teardown_all().await
    }

    fn kill_all(&self) {
        self.inner.kill_all()
    }
}
