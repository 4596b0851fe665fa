//! The fleet page: hosts by region with their running, warm and free slots,
//! the scaler's view of each region (buffer, bounds, launches on the way, the
//! last launch error), instances launching, draining and just terminated, and
//! running image rollouts with their progress; refreshed every second.
//! `/fleet` is a static page; its data comes from `/fleet/api/hosts`, which
//! needs an admin token like AdminService.

use axum::{
    Json,
    extract::State,
    response::Html,
    routing::{MethodRouter, get},
};
use serde::Serialize;

use crate::{api::convert, core::SharedCore};

#[derive(Serialize)]
struct FleetView {
    hosts: Vec<HostView>,
    regions: Vec<RegionView>,
    /// Live instances, and those terminated in the last minute.
    instances: Vec<InstanceView>,
    /// Running operations (rollouts), with their progress.
    operations: Vec<serde_json::Value>,
}

#[derive(Serialize)]
struct RegionView {
    name: String,
    enabled: bool,
    image: String,
    buffer: u32,
    min_instances: u32,
    max_instances: u32,
    instance_types: Vec<String>,
    available: Option<u32>,
    launching: Option<u32>,
    last_error: Option<String>,
    at_max_instances: bool,
}

#[derive(Serialize)]
struct InstanceView {
    host_id: String,
    region: String,
    instance_id: Option<String>,
    instance_type: String,
    capacity: u32,
    image: String,
    state: &'static str,
    reason: Option<String>,
    in_rollout: bool,
}

/// How long a terminated instance stays on the page.
const RECENTLY_TERMINATED: chrono::Duration = chrono::Duration::seconds(60);

#[derive(Serialize)]
struct HostView {
    host_id: String,
    region: String,
    state: &'static str,
    connected: bool,
    image: String,
    capacity: u32,
    warm: u32,
    running: u32,
    generation: u64,
}

/// `/fleet`: the page.
pub fn page() -> MethodRouter {
    get(|| async { Html(include_str!("web/fleet.html")) })
}

/// `/fleet/api/hosts`: what the page shows, as JSON.
pub fn hosts_api(core: SharedCore) -> MethodRouter {
    get(hosts).with_state(core)
}

fn unavailable(error: crate::store::StoreError) -> (http::StatusCode, String) {
    tracing::warn!(%error, "fleet page could not read the fleet");
    (http::StatusCode::SERVICE_UNAVAILABLE, "database unavailable".to_owned())
}

async fn hosts(State(core): State<SharedCore>) -> Result<Json<FleetView>, (http::StatusCode, String)> {
    let hosts = core.store.list_hosts(None).await.map_err(unavailable)?;
    let regions = core
        .store
        .list_regions()
        .await
        .map_err(unavailable)?
        .into_iter()
        .map(|region| {
            let status = core.scaling.status(&region.name);
            RegionView {
                available: status.as_ref().map(|s| s.available),
                launching: status.as_ref().map(|s| s.launching),
                at_max_instances: status.as_ref().is_some_and(|s| s.at_max_instances),
                last_error: status.and_then(|s| s.last_error),
                instance_types: region
                    .scaling
                    .instance_types
                    .iter()
                    .map(|t| format!("{} ×{}", t.name, t.capacity))
                    .collect(),
                name: region.name,
                enabled: region.enabled,
                image: region.image,
                buffer: region.scaling.buffer,
                min_instances: region.scaling.min_instances,
                max_instances: region.scaling.max_instances,
            }
        })
        .collect();
    let cutoff = chrono::Utc::now() - RECENTLY_TERMINATED;
    let instances = core
        .store
        .list_instances(None, true)
        .await
        .map_err(unavailable)?
        .into_iter()
        .filter(|i| i.terminated_at.is_none_or(|at| at > cutoff))
        .map(|i| InstanceView {
            state: i.state.as_str(),
            in_rollout: i.rollout_id.is_some(),
            host_id: i.host_id,
            region: i.region,
            instance_id: i.instance_id,
            instance_type: i.instance_type,
            capacity: i.capacity,
            image: i.image,
            reason: i.reason,
        })
        .collect();
    let operations = core
        .store
        .list_operations(true, 10)
        .await
        .map_err(unavailable)?
        .into_iter()
        .map(|op| serde_json::json!({ "id": op.id, "kind": op.kind, "progress": op.progress, "error": op.error }))
        .collect();
    let hosts = hosts
        .iter()
        .map(|summary| {
            let info = convert::host(summary, core.registry.is_connected(&summary.host.id));
            HostView {
                host_id: info.host_id,
                region: info.region,
                state: summary.host.state.as_str(),
                connected: info.connected,
                image: info.image,
                capacity: info.capacity,
                warm: info.warm_mandelboxes,
                running: info.running_mandelboxes,
                generation: info.generation,
            }
        })
        .collect();
    Ok(Json(FleetView { hosts, regions, instances, operations }))
}
