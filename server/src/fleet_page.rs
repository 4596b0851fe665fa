//! The fleet page: hosts by region with their running, warm and free slots,
//! refreshed every second. `/fleet` is a static page; its data comes from
//! `/fleet/api/hosts`, which needs an admin token like AdminService.

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
}

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

async fn hosts(State(core): State<SharedCore>) -> Result<Json<FleetView>, (http::StatusCode, String)> {
    let hosts = core.store.list_hosts(None).await.map_err(|error| {
        tracing::warn!(%error, "fleet page could not list hosts");
        (http::StatusCode::SERVICE_UNAVAILABLE, "database unavailable".to_owned())
    })?;
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
    Ok(Json(FleetView { hosts }))
}
