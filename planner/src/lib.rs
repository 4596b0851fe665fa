//! The scaler's decisions for one region as a pure function of what the region
//! looks like now: [`plan`] takes a [`RegionView`] (settings, instances, the
//! clock) and the scaler's short [`ScalerMemory`], and returns a [`Plan`]: how
//! many instances to launch, which hosts to drain, which instances to
//! terminate.
//!
//! It does no I/O and reads no clock, so the control plane's scaler and the
//! fleet simulator (`simulator/`) run exactly the same decisions, one against
//! the database and a cloud API, the other against a simulated clock and
//! provider.
//!
//! The rules, in order:
//! 1. **Terminate** what is of no further use: an instance that never connected
//!    within `launch_timeout`; a host that is lost (missed heartbeats, or
//!    disconnected past its grace period; its sessions already ended); a
//!    draining host with no session left.
//! 2. **Drain** hosts on an image other than the region's current one (after a
//!    rollout): they take no new session and are terminated once empty.
//! 3. **Scale up**: `available` = free slots on connected hosts of the current
//!    image (warm boxes and slots about to be warmed) + the slots of instances
//!    launched but not yet connected. Launch exactly enough instances of the
//!    first instance type to cover `buffer + waiting - available` (`waiting`:
//!    users with no box yet), and enough to reach `min_instances`; never more
//!    than `max_instances` live instances.
//! 4. **Scale down** when `available - buffer` is at least an empty host's
//!    slots and has been for `scale_down_delay`, and no launch happened in the
//!    last `scale_down_cooldown`: drain *empty* hosts (allocation packs the
//!    fullest host first, so hosts empty out), never below `min_instances`. A
//!    host with sessions is never drained for excess: it would hold its free
//!    slots hostage (and count towards `max_instances`) until its last session
//!    ends, while new users could need them.

use std::time::Duration;

/// Milliseconds on the caller's clock (wall clock in the server, simulated time
/// in the simulator). Only differences matter.
pub type Millis = u64;

/// An instance type and how many mandelboxes one instance of it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceType {
    pub name: String,
    pub capacity: u32,
}

/// A region's scaling settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionSettings {
    /// Desired idle (warm) mandelboxes.
    pub buffer: u32,
    pub min_instances: u32,
    pub max_instances: u32,
    /// In preference order; the first one's capacity sizes launches. Empty: the
    /// region is not scaled (a fixed fleet), nothing is launched or drained.
    pub instance_types: Vec<InstanceType>,
    /// The region's current image; hosts on another one are drained. Empty:
    /// any image is current.
    pub image: String,
}

/// The timings that keep the scaler from flapping and from waiting forever.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timings {
    /// An instance whose host has not connected this long after its launch is
    /// terminated.
    pub launch_timeout: Duration,
    /// Excess capacity must persist this long before a host is drained.
    pub scale_down_delay: Duration,
    /// No scale-down within this long after a launch.
    pub scale_down_cooldown: Duration,
}

impl Default for Timings {
    /// Checked with the fleet simulator (simulator/REPORT.md, "Recommended
    /// defaults") on a simulated day of 2-slot hosts booting in 90–240 s,
    /// against this `plan()` (excess drains take empty hosts only):
    /// - `launch_timeout` 600 s: every value from 240 s up costs the same on
    ///   a normal day; shorter ones kill healthy slow boots. A shorter one
    ///   helps only on a day of broken images, and is safe only once the
    ///   real boot tail is measured.
    /// - `scale_down_delay` 300 s: the end of the flat part of the cost
    ///   curve. From 60 s to 300 s instance-hours stay within 0.7% (same
    ///   buffer) while launches fall by a quarter; beyond it they rise about
    ///   0.8% per further 5 min, for fewer misses that a bigger buffer buys
    ///   cheaper (buffer 13 at 300 s beats buffer 12 at 600 s on both). 600 s
    ///   was better only while scale-down also drained hosts with sessions.
    /// - `scale_down_cooldown` 300 s: a launch already restarts the delay,
    ///   so the cooldown binds only when it is longer than the delay; equal
    ///   to it, it keeps that floor if a region's delay is set lower.
    fn default() -> Self {
        Timings {
            launch_timeout: Duration::from_secs(600),
            scale_down_delay: Duration::from_secs(300),
            scale_down_cooldown: Duration::from_secs(300),
        }
    }
}

/// Where an instance is in its life, as the control plane sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Phase {
    /// Launched; its host has not connected yet.
    Launching,
    /// Its host is connected and takes sessions.
    Active,
    /// Its host's stream dropped; within the reconnect grace period.
    Disconnected,
    /// Its host is gone (missed heartbeats, or did not come back in time).
    Lost,
    /// Drained by the scaler: takes no new session; terminated once its
    /// sessions have ended.
    Draining,
    /// Drained by an operator: takes no new session and is kept (counted as a
    /// live instance) until the operator decides; the scaler never terminates it.
    Cordoned,
    /// Termination requested; waiting for the cloud to confirm.
    Terminating,
}

/// One instance (or a host the scaler does not manage, `managed = false`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceView {
    pub host_id: String,
    pub phase: Phase,
    /// Mandelbox slots.
    pub capacity: u32,
    /// Slots holding a user (allocated or running sessions).
    pub assigned: u32,
    pub image: String,
    pub launched_at: Millis,
    /// Launched by the scaler (it may drain and terminate it). Hosts that
    /// connected on their own count towards capacity but are never touched.
    pub managed: bool,
    /// Part of an image rollout in progress: neither counted nor drained
    /// until the rollout switches the region to its image (or rolls back).
    pub in_rollout: bool,
}

impl InstanceView {
    fn free(&self) -> u32 {
        self.capacity.saturating_sub(self.assigned)
    }
}

/// One region as it is now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionView {
    pub settings: RegionSettings,
    pub instances: Vec<InstanceView>,
    /// Users waiting for a box here (PENDING sessions): demand on top of the
    /// buffer, each about to take one of the available slots. Without them a
    /// region with a buffer of 0 would never grow past `min_instances`.
    pub waiting: u32,
    pub now: Millis,
}

/// What the scaler remembers between two plans of one region.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ScalerMemory {
    /// Since when there has been more than a host's worth of excess.
    pub excess_since: Option<Millis>,
    /// The last time this region launched.
    pub last_launch: Option<Millis>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TerminateReason {
    /// Launched but never connected within the launch timeout.
    NeverConnected,
    /// Missed heartbeats or disconnected past the grace period.
    HostLost,
    /// Drained and empty.
    Drained,
}

impl TerminateReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NeverConnected => "never_connected",
            Self::HostLost => "host_lost",
            Self::Drained => "drained",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DrainReason {
    /// More warm capacity than the buffer wants.
    Excess,
    /// On an image other than the region's current one.
    OldImage,
}

impl DrainReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Excess => "excess",
            Self::OldImage => "old_image",
        }
    }
}

/// The plan for one region.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Instances to launch (of the settings' instance types, in order).
    pub launch: u32,
    pub drain: Vec<(String, DrainReason)>,
    pub terminate: Vec<(String, TerminateReason)>,
    /// Free slots counted (connected hosts of the current image + launching).
    pub available: u32,
    /// Slots of instances launched but not yet connected.
    pub on_the_way: u32,
    /// Live instances the scaler manages (everything but terminating ones).
    pub live_instances: u32,
    /// Set when the wanted launches were cut by `max_instances`.
    pub capped_by_max: bool,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.launch == 0 && self.drain.is_empty() && self.terminate.is_empty()
    }
}

/// The plan for one region; updates `memory` (excess tracking, last launch).
pub fn plan(view: &RegionView, memory: &mut ScalerMemory, timings: &Timings) -> Plan {
    let settings = &view.settings;
    let now = view.now;
    let mut result = Plan::default();
    let is_current = |instance: &InstanceView| settings.image.is_empty() || instance.image == settings.image;
    let elapsed = |since: Millis| Duration::from_millis(now.saturating_sub(since));

    // 1. Terminate what is of no further use.
    for instance in view.instances.iter().filter(|i| i.managed) {
        let reason = match instance.phase {
            Phase::Launching if elapsed(instance.launched_at) >= timings.launch_timeout => {
                Some(TerminateReason::NeverConnected)
            }
            Phase::Lost => Some(TerminateReason::HostLost),
            Phase::Draining if instance.assigned == 0 => Some(TerminateReason::Drained),
            _ => None,
        };
        if let Some(reason) = reason {
            result.terminate.push((instance.host_id.clone(), reason));
        }
    }
    let terminating = |instance: &InstanceView| {
        instance.phase == Phase::Terminating || result.terminate.iter().any(|(id, _)| id == &instance.host_id)
    };

    // A region without instance types is a fixed fleet: only clean-up applies.
    let Some(launch_type) = settings.instance_types.first() else {
        return result;
    };

    // 2. Old-image hosts drain (rollout instances are the new image in waiting).
    for instance in view.instances.iter().filter(|i| i.managed && !i.in_rollout) {
        if instance.phase == Phase::Active && !is_current(instance) {
            result.drain.push((instance.host_id.clone(), DrainReason::OldImage));
        }
    }
    let draining_now = |instance: &InstanceView, drains: &[(String, DrainReason)]| {
        drains.iter().any(|(id, _)| id == &instance.host_id)
    };

    // 3. Count what is there and what is coming.
    let mut live = 0u32;
    let mut serving = 0u32;
    for instance in view.instances.iter().filter(|i| !i.in_rollout) {
        if instance.managed && !terminating(instance) && instance.phase != Phase::Lost {
            live += 1;
        }
        match instance.phase {
            Phase::Active if is_current(instance) && !draining_now(instance, &result.drain) => {
                result.available += instance.free();
                if instance.managed {
                    serving += 1;
                }
            }
            Phase::Launching if !terminating(instance) && is_current(instance) => {
                result.available += instance.capacity;
                result.on_the_way += instance.capacity;
                if instance.managed {
                    serving += 1;
                }
            }
            _ => {}
        }
    }
    result.live_instances = live;

    let capacity = launch_type.capacity.max(1);
    let wanted_free = settings.buffer.saturating_add(view.waiting);
    let missing = wanted_free.saturating_sub(result.available);
    let for_buffer = missing.div_ceil(capacity);
    let for_minimum = settings.min_instances.saturating_sub(serving);
    let wanted = for_buffer.max(for_minimum);
    let room = settings.max_instances.saturating_sub(live);
    result.launch = wanted.min(room);
    result.capped_by_max = wanted > room;
    if result.launch > 0 {
        memory.last_launch = Some(now);
        memory.excess_since = None;
        return result;
    }

    // 4. Scale down, slowly: only a lasting excess, not right after a launch.
    let excess = result.available.saturating_sub(wanted_free);
    let mut candidates: Vec<&InstanceView> = view
        .instances
        .iter()
        .filter(|i| {
            i.managed
                && !i.in_rollout
                && i.phase == Phase::Active
                && is_current(i)
                && i.assigned == 0
                && i.capacity > 0
                && !draining_now(i, &result.drain)
        })
        .collect();
    let smallest_free = candidates.iter().map(|i| i.free()).min().unwrap_or(u32::MAX);
    if result.on_the_way > 0 || candidates.is_empty() || excess < smallest_free {
        memory.excess_since = None;
        return result;
    }
    let since = *memory.excess_since.get_or_insert(now);
    let cooled = memory.last_launch.is_none_or(|at| elapsed(at) >= timings.scale_down_cooldown);
    if elapsed(since) < timings.scale_down_delay || !cooled {
        return result;
    }
    // The biggest empty hosts first: fewest instances for the same slots.
    candidates.sort_by(|a, b| b.free().cmp(&a.free()).then(a.host_id.cmp(&b.host_id)));
    let mut excess = excess;
    let mut remaining = serving;
    for instance in candidates {
        if remaining <= settings.min_instances {
            break;
        }
        let free = instance.free();
        if free > excess {
            continue;
        }
        excess -= free;
        remaining -= 1;
        result.drain.push((instance.host_id.clone(), DrainReason::Excess));
    }
    if result.drain.iter().any(|(_, reason)| *reason == DrainReason::Excess) {
        memory.excess_since = None;
    }
    result
}

#[cfg(test)]
mod tests;
