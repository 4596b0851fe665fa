//! Between domain records and protocol messages.

use chrono::{DateTime, Utc};
use switchboard_proto::v1 as pb;

use crate::{
    events::SessionChange,
    model::{
        EndReason, HostState, HostSummary, InstanceRecord, InstanceState, MandelboxRecord, MandelboxState,
        OperationRecord, OperationState, PortSpec, Region, SessionState,
    },
    scaling::{RegionStatus, rollout::RolloutProgress},
};

pub fn timestamp(at: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: at.timestamp(), nanos: i32::try_from(at.timestamp_subsec_nanos()).unwrap_or(0) }
}

/// A port a host reported; None if it does not fit a port number.
pub fn port_from_proto(port: &pb::Port) -> Option<PortSpec> {
    Some(PortSpec { name: port.name.clone(), port: u16::try_from(port.port).ok()?, protocol: port.protocol.clone() })
}

pub fn port_to_proto(port: &PortSpec) -> pb::Port {
    pb::Port { name: port.name.clone(), port: u32::from(port.port), protocol: port.protocol.clone() }
}

pub fn session_state(state: SessionState) -> pb::SessionState {
    match state {
        SessionState::Pending => pb::SessionState::Pending,
        SessionState::Assigning => pb::SessionState::Assigning,
        SessionState::Running => pb::SessionState::Running,
        SessionState::Ended => pb::SessionState::Ended,
    }
}

pub fn end_reason(reason: EndReason) -> pb::EndReason {
    match reason {
        EndReason::UserEnded => pb::EndReason::UserEnded,
        EndReason::ClientDisconnected => pb::EndReason::ClientDisconnected,
        EndReason::MandelboxExited => pb::EndReason::MandelboxExited,
        EndReason::HostLost => pb::EndReason::HostLost,
        EndReason::NoCapacity => pb::EndReason::NoCapacity,
        EndReason::AssignFailed => pb::EndReason::AssignFailed,
        EndReason::HostDrained => pb::EndReason::HostDrained,
    }
}

pub fn mandelbox_state(state: MandelboxState) -> pb::MandelboxState {
    match state {
        MandelboxState::Spawning => pb::MandelboxState::Spawning,
        MandelboxState::Waiting => pb::MandelboxState::Waiting,
        MandelboxState::Allocated => pb::MandelboxState::Allocated,
        MandelboxState::Running => pb::MandelboxState::Running,
        MandelboxState::Dying => pb::MandelboxState::Dying,
        MandelboxState::Dead => pb::MandelboxState::Dead,
        MandelboxState::Lost => pb::MandelboxState::Lost,
    }
}

pub fn mandelbox_state_from_proto(state: i32) -> Option<Option<MandelboxState>> {
    Some(match pb::MandelboxState::try_from(state).ok()? {
        pb::MandelboxState::Unspecified => None,
        pb::MandelboxState::Spawning => Some(MandelboxState::Spawning),
        pb::MandelboxState::Waiting => Some(MandelboxState::Waiting),
        pb::MandelboxState::Allocated => Some(MandelboxState::Allocated),
        pb::MandelboxState::Running => Some(MandelboxState::Running),
        pb::MandelboxState::Dying => Some(MandelboxState::Dying),
        pb::MandelboxState::Dead => Some(MandelboxState::Dead),
        pb::MandelboxState::Lost => Some(MandelboxState::Lost),
    })
}

pub fn host_state(state: HostState) -> pb::HostState {
    match state {
        HostState::Active => pb::HostState::Active,
        HostState::Draining => pb::HostState::Draining,
        HostState::Disconnected => pb::HostState::Disconnected,
        HostState::Unhealthy => pb::HostState::Unhealthy,
    }
}

pub fn session(change: &SessionChange) -> pb::Session {
    let session = &change.session;
    pb::Session {
        session_id: session.id.to_string(),
        user_id: session.user_id.clone(),
        state: session_state(session.state) as i32,
        region: session.region.clone().unwrap_or_default(),
        app: session.app.clone(),
        mandelbox_id: session.mandelbox_id.map(|id| id.to_string()).unwrap_or_default(),
        host_id: session.host_id.clone().unwrap_or_default(),
        host_address: change.host_address.clone().unwrap_or_default(),
        ports: change.ports.iter().map(port_to_proto).collect(),
        end_reason: session.end_reason.map(end_reason).unwrap_or(pb::EndReason::Unspecified) as i32,
        created_at: Some(timestamp(session.created_at)),
        ended_at: session.ended_at.map(timestamp),
        requested_regions: session.requested_regions.clone(),
    }
}

pub fn host(summary: &HostSummary, connected: bool) -> pb::HostInfo {
    let host = &summary.host;
    pb::HostInfo {
        host_id: host.id.clone(),
        region: host.region.clone(),
        state: host_state(host.state) as i32,
        image: host.image.clone(),
        agent_version: host.agent_version.clone(),
        address: host.address.clone(),
        capacity: host.capacity,
        warm_mandelboxes: summary.warm,
        running_mandelboxes: summary.assigned,
        generation: host.generation,
        last_heartbeat_at: host.last_heartbeat_at.map(timestamp),
        connected,
    }
}

pub fn mandelbox(record: &MandelboxRecord) -> pb::MandelboxInfo {
    pb::MandelboxInfo {
        mandelbox_id: record.id.to_string(),
        host_id: record.host_id.clone(),
        region: record.region.clone(),
        app: record.app.clone(),
        state: mandelbox_state(record.state) as i32,
        session_id: record.session_id.map(|id| id.to_string()).unwrap_or_default(),
        ports: record.ports.iter().map(port_to_proto).collect(),
        created_at: Some(timestamp(record.created_at)),
    }
}

pub fn region(region: &Region, status: Option<&RegionStatus>) -> pb::RegionInfo {
    let scaling = &region.scaling;
    pb::RegionInfo {
        name: region.name.clone(),
        enabled: region.enabled,
        image: region.image.clone(),
        buffer: scaling.buffer,
        min_instances: scaling.min_instances,
        max_instances: scaling.max_instances,
        instance_types: scaling
            .instance_types
            .iter()
            .map(|t| pb::InstanceType { name: t.name.clone(), capacity: t.capacity })
            .collect(),
        status: status.map(|status| pb::RegionScalingStatus {
            available_mandelboxes: status.available,
            launching_mandelboxes: status.launching,
            live_instances: status.live_instances,
            last_error: status.last_error.clone().unwrap_or_default(),
            last_error_at: status.last_error_at.map(timestamp),
            updated_at: status.updated_at.map(timestamp),
            at_max_instances: status.at_max_instances,
        }),
    }
}

pub fn instance_state(state: InstanceState) -> pb::InstanceState {
    match state {
        InstanceState::Launching => pb::InstanceState::Launching,
        InstanceState::Running => pb::InstanceState::Running,
        InstanceState::Draining => pb::InstanceState::Draining,
        InstanceState::Terminating => pb::InstanceState::Terminating,
        InstanceState::Terminated => pb::InstanceState::Terminated,
    }
}

pub fn instance(record: &InstanceRecord) -> pb::InstanceInfo {
    pb::InstanceInfo {
        host_id: record.host_id.clone(),
        region: record.region.clone(),
        instance_id: record.instance_id.clone().unwrap_or_default(),
        instance_type: record.instance_type.clone(),
        capacity: record.capacity,
        image: record.image.clone(),
        state: instance_state(record.state).into(),
        reason: record.reason.clone().unwrap_or_default(),
        rollout_id: record.rollout_id.map(|id| id.to_string()).unwrap_or_default(),
        launched_at: Some(timestamp(record.launched_at)),
        connected_at: record.connected_at.map(timestamp),
        terminated_at: record.terminated_at.map(timestamp),
    }
}

pub fn operation_state(state: OperationState) -> pb::OperationState {
    match state {
        OperationState::Running => pb::OperationState::Running,
        OperationState::Succeeded => pb::OperationState::Succeeded,
        OperationState::Failed => pb::OperationState::Failed,
        OperationState::RolledBack => pb::OperationState::RolledBack,
    }
}

pub fn operation(record: &OperationRecord) -> pb::Operation {
    let rollout = RolloutProgress::parse(record).ok().map(|progress| pb::RolloutProgress {
        image: progress.image,
        phase: progress.phase.as_str().into(),
        deadline: Some(timestamp(progress.deadline)),
        regions: progress
            .regions
            .into_iter()
            .map(|r| pb::RegionRolloutProgress {
                region: r.region,
                previous_image: r.previous_image,
                wanted_mandelboxes: r.wanted_mandelboxes,
                launched_instances: r.launched_instances,
                connected_instances: r.connected_instances,
                warm_mandelboxes: r.warm_mandelboxes,
                ready: r.ready,
                error: r.error.unwrap_or_default(),
            })
            .collect(),
    });
    pb::Operation {
        id: record.id.to_string(),
        kind: record.kind.clone(),
        state: operation_state(record.state).into(),
        error: record.error.clone().unwrap_or_default(),
        created_at: Some(timestamp(record.created_at)),
        updated_at: Some(timestamp(record.updated_at)),
        finished_at: record.finished_at.map(timestamp),
        rollout,
    }
}
