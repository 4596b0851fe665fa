//! A [`CloudProvider`] that "launches" hosts as hostagents in this process
//! (`LocalRuntime`: mandelboxes are small local processes). `switchboard dev`
//! and the tests run the scaling code through it exactly as production runs it
//! through EC2: launch returns instances at once, the hosts connect over gRPC
//! like real ones, terminate kills them without a goodbye (a machine that is
//! switched off), and describe lists them with their tags.

use std::{
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use async_trait::async_trait;
use chrono::Utc;
use hostagent_client::{AgentHandle, AgentOptions, Backoff, HostAgent, LocalRuntime, MandelboxRuntime};
use tracing::info;

use super::{CloudError, CloudProvider, Instance, InstanceState, LaunchRequest, TypeRefusal, validate_launch};
use crate::auth::host_credential::HostCredentials;

/// Makes the mandelbox runtime of each local host.
pub type RuntimeFactory = Arc<dyn Fn(&str) -> Arc<dyn MandelboxRuntime> + Send + Sync>;

struct LocalInstance {
    instance: Instance,
    handle: Option<AgentHandle>,
    token: String,
}

/// In-process hosts behind the [`CloudProvider`] trait.
pub struct LocalProvider {
    endpoint: String,
    credentials: HostCredentials,
    address: String,
    backoff: Backoff,
    runtime: RuntimeFactory,
    /// Instance id → instance, in launch order (terminated ones stay listed, as on EC2).
    instances: Mutex<Vec<LocalInstance>>,
    next_id: Mutex<u64>,
    /// Instance types "EC2" refuses, to exercise fallbacks and capacity errors.
    refused: Mutex<Vec<String>>,
}

impl LocalProvider {
    /// Hosts connect to `endpoint` with credentials from `credentials`.
    pub fn new(endpoint: impl Into<String>, credentials: HostCredentials) -> Self {
        LocalProvider {
            endpoint: endpoint.into(),
            credentials,
            address: "127.0.0.1".into(),
            backoff: Backoff::default(),
            runtime: Arc::new(|_: &str| -> Arc<dyn MandelboxRuntime> { Arc::new(LocalRuntime::new()) }),
            instances: Mutex::new(Vec::new()),
            next_id: Mutex::new(0),
            refused: Mutex::new(Vec::new()),
        }
    }

    /// The hostagents' reconnect backoff (tests make it short).
    pub fn with_backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.backoff.initial = initial;
        self.backoff.max = max;
        self
    }

    /// A different mandelbox runtime per host (tests observe their boxes).
    pub fn with_runtime(mut self, runtime: RuntimeFactory) -> Self {
        self.runtime = runtime;
        self
    }

    fn lock(&self) -> MutexGuard<'_, Vec<LocalInstance>> {
        // A poisoned lock only means a panic elsewhere; the list itself is consistent.
        self.instances.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn next_instance_id(&self) -> String {
        let mut next = self.next_id.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        *next += 1;
        format!("i-local{:010}", *next)
    }

    /// Makes launches refuse `instance_type` as EC2 does when it has no capacity
    /// (`InsufficientInstanceCapacity`): the next type is used, or the launch fails.
    pub fn set_refused(&self, instance_types: &[&str]) {
        let mut refused = self.refused.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        *refused = instance_types.iter().map(|t| (*t).to_owned()).collect();
    }

    /// The agent handle of a live instance (tests use it to wait for the connection or inject faults).
    pub fn handle(&self, instance_id: &str) -> Option<AgentHandle> {
        self.lock().iter().find(|i| i.instance.instance_id == instance_id).and_then(|i| i.handle.clone())
    }

    /// Stops every host with a goodbye (a clean shutdown, e.g. when
    /// `switchboard dev` stops): the control plane sees them leave, not fail.
    pub async fn shutdown_all(&self) {
        let handles: Vec<AgentHandle> = self
            .lock()
            .iter_mut()
            .filter_map(|local| {
                local.instance.state = InstanceState::Terminated;
                local.handle.take()
            })
            .collect();
        for handle in handles {
            handle.shutdown().await;
        }
    }

    /// Kills every host (no goodbye).
    pub fn kill_all(&self) {
        for local in self.lock().iter_mut() {
            if let Some(handle) = local.handle.take() {
                handle.kill();
                local.instance.state = InstanceState::Terminated;
            }
        }
    }
}

impl Drop for LocalProvider {
    fn drop(&mut self) {
        self.kill_all();
    }
}

#[async_trait]
impl CloudProvider for LocalProvider {
    async fn launch(&self, request: LaunchRequest) -> Result<Vec<Instance>, CloudError> {
        validate_launch(&request)?;
        let region = request.region.as_str();
        let refused_types = self.refused.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone();
        let Some(instance_type) = request.instance_types.iter().find(|t| !refused_types.contains(&t.name)) else {
            let refused = request
                .instance_types
                .iter()
                .map(|t| TypeRefusal {
                    instance_type: t.name.clone(),
                    code: "InsufficientInstanceCapacity".into(),
                    message: "refused by the local provider".into(),
                })
                .collect();
            return Err(CloudError::InsufficientCapacity { region: region.to_owned(), refused });
        };
        let mut instances = self.lock();
        let mut result = Vec::with_capacity(request.host_ids.len());
        for host_id in &request.host_ids {
            // Idempotency: a host this token already launched is returned as it is.
            if let Some(existing) = instances.iter().find(|i| {
                i.token == request.token
                    && i.instance.host_id.as_deref() == Some(host_id)
                    && i.instance.region == region
            }) {
                result.push(existing.instance.clone());
                continue;
            }
            let mut options = AgentOptions::new(
                self.endpoint.clone(),
                host_id.clone(),
                region.to_owned(),
                self.credentials.issue(host_id),
            );
            options.capacity = instance_type.capacity;
            options.image = request.image.clone();
            options.address = self.address.clone();
            options.backoff = self.backoff;
            let handle = HostAgent::new(options, (self.runtime)(host_id.as_str())).spawn();
            let instance = Instance {
                instance_id: self.next_instance_id(),
                host_id: Some(host_id.clone()),
                cluster: Some(request.cluster.clone()),
                region: region.to_owned(),
                instance_type: instance_type.name.clone(),
                image: request.image.clone(),
                state: InstanceState::Running,
                launched_at: Some(Utc::now()),
            };
            info!(region, host_id, instance_id = %instance.instance_id, "local host launched");
            instances.push(LocalInstance {
                instance: instance.clone(),
                handle: Some(handle),
                token: request.token.clone(),
            });
            result.push(instance);
        }
        Ok(result)
    }

    async fn terminate(&self, region: &str, instance_ids: &[String]) -> Result<(), CloudError> {
        let mut instances = self.lock();
        if let Some(unknown) = instance_ids
            .iter()
            .find(|id| !instances.iter().any(|i| &i.instance.instance_id == *id && i.instance.region == region))
        {
            return Err(CloudError::NotFound {
                region: region.to_owned(),
                message: format!("instance {unknown} does not exist"),
            });
        }
        for local in instances.iter_mut().filter(|i| instance_ids.contains(&i.instance.instance_id)) {
            if let Some(handle) = local.handle.take() {
                handle.kill();
                info!(region, instance_id = %local.instance.instance_id, host_id = ?local.instance.host_id, "local host terminated");
            }
            local.instance.state = InstanceState::Terminated;
        }
        Ok(())
    }

    async fn describe_by_tag(&self, region: &str, cluster: &str) -> Result<Vec<Instance>, CloudError> {
        Ok(self
            .lock()
            .iter()
            .filter(|i| i.instance.region == region && i.instance.cluster.as_deref() == Some(cluster))
            .map(|i| i.instance.clone())
            .collect())
    }
}
