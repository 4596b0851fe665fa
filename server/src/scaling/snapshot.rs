//! The database's picture of a region, turned into the planner's input.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use planner::{InstanceType, InstanceView, Phase, RegionSettings, RegionView};

use crate::model::{HostState, HostSummary, InstanceRecord, InstanceState, Region};

/// Milliseconds since the Unix epoch: the planner's clock in the server.
pub(super) fn millis(at: DateTime<Utc>) -> planner::Millis {
    u64::try_from(at.timestamp_millis()).unwrap_or(0)
}

pub(super) fn settings(region: &Region) -> RegionSettings {
    let scaling = &region.scaling;
    RegionSettings {
        buffer: scaling.buffer,
        min_instances: scaling.min_instances,
        max_instances: scaling.max_instances.max(scaling.min_instances),
        // A disabled region takes no sessions: it is neither grown nor shrunk,
        // only cleaned up (lost, never connected, drained instances).
        instance_types: if region.enabled {
            scaling.instance_types.iter().map(|t| InstanceType { name: t.name.clone(), capacity: t.capacity }).collect()
        } else {
            Vec::new()
        },
        image: region.image.clone(),
    }
}

fn host_phase(state: HostState) -> Phase {
    match state {
        HostState::Active => Phase::Active,
        HostState::Draining => Phase::Draining,
        HostState::Disconnected => Phase::Disconnected,
        HostState::Unhealthy => Phase::Lost,
    }
}

/// The region as the planner sees it: every live instance the scaler launched
/// (with its host, once connected) and every other connected host.
pub(super) fn region_view(
    region: &Region,
    instances: &[InstanceRecord],
    hosts: &[HostSummary],
    waiting: u32,
    now: DateTime<Utc>,
) -> RegionView {
    let hosts_by_id: HashMap<&str, &HostSummary> = hosts.iter().map(|h| (h.host.id.as_str(), h)).collect();
    let mut views = Vec::with_capacity(instances.len() + hosts.len());
    for instance in instances.iter().filter(|i| i.state != InstanceState::Terminated) {
        let host = hosts_by_id.get(instance.host_id.as_str());
        let phase = match (instance.state, host) {
            (InstanceState::Terminating, _) => Phase::Terminating,
            (_, Some(host)) if host.host.state == HostState::Unhealthy => Phase::Lost,
            (InstanceState::Draining, _) => Phase::Draining,
            // Drained by an operator, not by the scaler: kept until they decide.
            (_, Some(host)) if host.host.state == HostState::Draining => Phase::Cordoned,
            (_, Some(host)) => host_phase(host.host.state),
            (_, None) => Phase::Launching,
        };
        views.push(InstanceView {
            host_id: instance.host_id.clone(),
            phase,
            capacity: host.map_or(instance.capacity, |h| h.host.capacity),
            assigned: host.map_or(0, |h| h.assigned),
            image: host.map_or_else(|| instance.image.clone(), |h| h.host.image.clone()),
            launched_at: millis(instance.launched_at),
            managed: true,
            in_rollout: instance.rollout_id.is_some(),
        });
    }
    let managed: std::collections::HashSet<&str> = instances.iter().map(|i| i.host_id.as_str()).collect();
    for host in hosts.iter().filter(|h| !managed.contains(h.host.id.as_str())) {
        views.push(InstanceView {
            host_id: host.host.id.clone(),
            phase: host_phase(host.host.state),
            capacity: host.host.capacity,
            assigned: host.assigned,
            image: host.host.image.clone(),
            launched_at: millis(host.host.created_at),
            managed: false,
            in_rollout: false,
        });
    }
    RegionView { settings: settings(region), instances: views, waiting, now: millis(now) }
}
