//! Reconciliation of one region against the cloud: no tagged instance runs
//! that the database does not know (a leak: terminated and logged), and no
//! database instance points at one that is gone (marked terminated; its
//! sessions end). Runs under the region's scaler lease.

use std::collections::HashMap;

use chrono::Utc;
use tracing::{info, warn};

use super::region::{RegionScaler, terminate_instance};
use crate::{cloud::Instance, model::InstanceState, model::Lease};

pub(super) async fn reconcile_region(scaler: &RegionScaler, lease: &Lease) -> anyhow::Result<()> {
    let core = &scaler.core;
    let store = &core.store;
    let region = scaler.region.as_str();
    let described = scaler.provider.describe_by_tag(region, &scaler.options.cluster).await?;
    // Read after listing the cloud: an instance launched in between is then
    // known here, never mistaken for a leak.
    let known = store.list_instances(Some(region), false).await?;
    let now = Utc::now();
    let grace = chrono::Duration::milliseconds(i64::try_from(scaler.options.config.leak_grace_ms).unwrap_or(i64::MAX));
    let old_enough = |at: Option<chrono::DateTime<Utc>>| at.is_none_or(|at| now - at >= grace);

    let by_instance_id: HashMap<&str, &Instance> = described.iter().map(|i| (i.instance_id.as_str(), i)).collect();
    let mut leaks = Vec::new();
    for instance in described.iter().filter(|i| i.state.is_live()) {
        let row = known.iter().find(|row| {
            row.instance_id.as_deref() == Some(instance.instance_id.as_str())
                || (row.instance_id.is_none() && row.host_id.as_str() == instance.host_id.as_deref().unwrap_or(""))
        });
        match row {
            Some(row) if row.instance_id.is_none() => {
                // Its launch call did not return (crash, timeout), but it runs: adopt it.
                let capacity = row.capacity;
                store.instance_launched(&row.host_id, &instance.instance_id, &instance.instance_type, capacity).await?;
                info!(region, host_id = %row.host_id, instance_id = %instance.instance_id, "instance of an unfinished launch adopted");
            }
            Some(_) => {}
            None if old_enough(instance.launched_at) => leaks.push(instance),
            None => {}
        }
    }
    if !leaks.is_empty() {
        let ids: Vec<String> = leaks.iter().map(|i| i.instance_id.clone()).collect();
        for leak in &leaks {
            warn!(
                region,
                instance_id = %leak.instance_id,
                host_id = leak.host_id.as_deref().unwrap_or(""),
                instance_type = %leak.instance_type,
                "leaked instance (tagged with this cluster, unknown to the database): terminating"
            );
        }
        scaler.provider.terminate(region, &ids).await?;
    }

    for row in &known {
        let Some(instance_id) = row.instance_id.as_deref() else { continue };
        let gone = by_instance_id.get(instance_id).is_none_or(|i| !i.state.is_live());
        if gone && old_enough(Some(row.launched_at)) && row.state != InstanceState::Terminated {
            warn!(region, host_id = %row.host_id, instance_id, "instance is gone from the cloud; marking it terminated");
            terminate_instance(core, scaler.provider.as_ref(), lease, row, "instance gone").await?;
        }
    }
    Ok(())
}
