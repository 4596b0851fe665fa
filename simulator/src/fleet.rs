//! One region's instances and their mandelbox slots: hosts connect, fill
//! their free slots with warm boxes, give them to users (fullest host first,
//! as the real allocator bin-packs), refill a slot when its session ends,
//! drain, die and go away. The fleet is what the scaler sees (`view`) and what
//! its plans change (`apply`).

use std::time::Duration;

use rand::{SeedableRng, rngs::StdRng};

use planner::{
    DrainReason, InstanceType, InstanceView, Millis, Phase, Plan, RegionSettings, RegionView, TerminateReason,
};

use crate::{
    dist,
    provider::{LaunchOutcome, Provider},
};

/// How hosts behave once connected.
#[derive(Debug, Clone, PartialEq)]
pub struct HostModel {
    /// Starting one warm mandelbox in a free slot (uniform in this range);
    /// boxes start in parallel.
    pub spawn_min: Duration,
    pub spawn_max: Duration,
    /// Connected hosts that die, per host-hour (a kernel panic, a GPU falling
    /// off the bus, a spot reclaim): their sessions end at once.
    pub loss_per_host_hour: f64,
}

impl Default for HostModel {
    fn default() -> Self {
        HostModel { spawn_min: Duration::from_secs(10), spawn_max: Duration::from_secs(20), loss_per_host_hour: 0.001 }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HostState {
    /// `connects_at: None`: launched, but its host will never connect.
    Launching {
        connects_at: Option<Millis>,
    },
    Active,
    Draining,
    Lost,
    Terminating {
        gone_at: Millis,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    /// No box and none coming (not connected, draining, lost).
    Down,
    /// A box is starting; warm at `ready_at`.
    Spawning { ready_at: Millis },
    /// A warm box waiting for a user.
    Warm,
    /// Holds a user until `ends_at` (a user who reserved a box still starting
    /// holds it from the reservation).
    Busy { ends_at: Millis },
}

#[derive(Debug, Clone)]
struct Host {
    id: String,
    launched_at: Millis,
    state: HostState,
    slots: Vec<Slot>,
}

impl Host {
    fn busy(&self) -> u32 {
        self.count(|slot| matches!(slot, Slot::Busy { .. }))
    }

    fn warm(&self) -> u32 {
        self.count(|slot| *slot == Slot::Warm)
    }

    fn count(&self, pick: impl Fn(&Slot) -> bool) -> u32 {
        self.slots.iter().filter(|slot| pick(slot)).count() as u32
    }

    /// Free slots as the allocator and the planner count them: everything not
    /// holding a user.
    fn free(&self) -> u32 {
        self.slots.len() as u32 - self.busy()
    }

    fn phase(&self) -> Phase {
        match self.state {
            HostState::Launching { .. } => Phase::Launching,
            HostState::Active => Phase::Active,
            HostState::Draining => Phase::Draining,
            HostState::Lost => Phase::Lost,
            HostState::Terminating { .. } => Phase::Terminating,
        }
    }

    /// Counts against `max_instances`, as the planner counts it.
    fn is_live(&self) -> bool {
        !matches!(self.state, HostState::Lost | HostState::Terminating { .. })
    }
}

/// What changed in one step of the fleet's own life.
#[derive(Debug, Default)]
pub(crate) struct Advance {
    /// Sessions that ended normally (each a teardown the scaler hears of).
    pub(crate) sessions_ended: u32,
    /// What was left of the sessions on hosts that died this step.
    pub(crate) cut: Vec<Millis>,
    pub(crate) hosts_lost: u32,
}

/// What applying one plan did.
#[derive(Debug, Default)]
pub(crate) struct Applied {
    pub(crate) launched: u32,
    pub(crate) refused: u32,
    pub(crate) drained_for_excess: u32,
    pub(crate) drained_old_image: u32,
    pub(crate) terminated: Vec<Terminated>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Terminated {
    pub(crate) reason: TerminateReason,
    /// Since its launch.
    pub(crate) age: Millis,
    /// Still launching, but its host would have connected later: a launch
    /// timeout shorter than the boot.
    pub(crate) slow_boot: bool,
}

/// A snapshot of the fleet for the figures.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Counts {
    /// Every instance that exists, i.e. that is billed.
    pub(crate) billed: u32,
    pub(crate) live: u32,
    pub(crate) launching: u32,
    pub(crate) active: u32,
    pub(crate) draining: u32,
    pub(crate) lost: u32,
    pub(crate) terminating: u32,
    pub(crate) warm: u32,
    pub(crate) busy: u32,
    /// Free slots on draining hosts: capacity paid for that no one may use.
    pub(crate) draining_free: u32,
}

pub(crate) struct Fleet {
    hosts: Vec<Host>,
    next_id: u64,
    settings: RegionSettings,
    model: HostModel,
    rng: StdRng,
}

impl Fleet {
    pub(crate) fn new(settings: RegionSettings, model: HostModel, seed: u64) -> Self {
        Fleet { hosts: Vec::new(), next_id: 0, settings, model, rng: StdRng::seed_from_u64(seed) }
    }

    fn capacity(&self) -> u32 {
        self.settings.instance_types.first().map_or(0, |kind: &InstanceType| kind.capacity)
    }

    fn spawn_ready_at(&mut self, now: Millis) -> Millis {
        now + dist::uniform_millis(&mut self.rng, self.model.spawn_min, self.model.spawn_max)
    }

    /// Moves the fleet to `now`: terminations take effect, hosts connect and
    /// warm their slots, sessions end and their slots re-warm, boxes finish
    /// starting, hosts die.
    pub(crate) fn advance(&mut self, now: Millis, step: Millis) -> Advance {
        let mut result = Advance::default();
        self.hosts.retain(|host| !matches!(host.state, HostState::Terminating { gone_at } if gone_at <= now));
        // A per-step probability from the hourly rate (exact for a Poisson
        // process, and never above 1 however coarse the step).
        let loss_chance = 1.0 - (-self.model.loss_per_host_hour * step as f64 / 3_600_000.0).exp();
        for index in 0..self.hosts.len() {
            let state = self.hosts[index].state;
            match state {
                HostState::Launching { connects_at: Some(at) } if at <= now => {
                    self.hosts[index].state = HostState::Active;
                    for slot in 0..self.hosts[index].slots.len() {
                        self.hosts[index].slots[slot] = Slot::Spawning { ready_at: self.spawn_ready_at(now) };
                    }
                }
                HostState::Active | HostState::Draining if dist::chance(&mut self.rng, loss_chance) => {
                    let host = &mut self.hosts[index];
                    host.state = HostState::Lost;
                    for slot in &mut host.slots {
                        if let Slot::Busy { ends_at } = *slot {
                            result.cut.push(ends_at.saturating_sub(now).max(1));
                        }
                        *slot = Slot::Down;
                    }
                    result.hosts_lost += 1;
                    continue;
                }
                _ => {}
            }
            let active = self.hosts[index].state == HostState::Active;
            for slot in 0..self.hosts[index].slots.len() {
                if let Slot::Busy { ends_at } = self.hosts[index].slots[slot]
                    && ends_at <= now
                {
                    result.sessions_ended += 1;
                    // The box is torn down; an active host starts a fresh one
                    // in its slot, a draining host leaves the slot empty.
                    self.hosts[index].slots[slot] =
                        if active { Slot::Spawning { ready_at: self.spawn_ready_at(now) } } else { Slot::Down };
                }
                if let Slot::Spawning { ready_at } = self.hosts[index].slots[slot]
                    && ready_at <= now
                {
                    self.hosts[index].slots[slot] = if active { Slot::Warm } else { Slot::Down };
                }
            }
        }
        result
    }

    /// Gives a warm box to a user for `session`: on the connected host of the
    /// current image with the fewest free slots (ties by host id), as the
    /// allocator's claim does. False when no box is warm.
    pub(crate) fn claim_warm(&mut self, now: Millis, session: Millis) -> bool {
        let Some(index) = self.fullest(|slot| *slot == Slot::Warm) else {
            return false;
        };
        let host = &mut self.hosts[index];
        if let Some(slot) = host.slots.iter_mut().find(|slot| **slot == Slot::Warm) {
            *slot = Slot::Busy { ends_at: now + session };
        }
        true
    }

    /// No warm box: reserves the box that will be warm soonest on the fullest
    /// host with one starting (the allocator's on-demand path) and returns how
    /// long the user waits for it. None when no box is starting anywhere.
    pub(crate) fn reserve_starting(&mut self, now: Millis, session: Millis) -> Option<Millis> {
        let index = self.fullest(|slot| matches!(slot, Slot::Spawning { .. }))?;
        let host = &mut self.hosts[index];
        let slot =
            host.slots.iter_mut().filter(|slot| matches!(slot, Slot::Spawning { .. })).min_by_key(
                |slot| match slot {
                    Slot::Spawning { ready_at } => *ready_at,
                    _ => Millis::MAX,
                },
            )?;
        let Slot::Spawning { ready_at } = *slot else {
            return None;
        };
        *slot = Slot::Busy { ends_at: ready_at + session };
        Some(ready_at.saturating_sub(now))
    }

    /// The active host with a slot matching `pick` and the fewest free slots.
    fn fullest(&self, pick: impl Fn(&Slot) -> bool) -> Option<usize> {
        self.hosts
            .iter()
            .enumerate()
            .filter(|(_, host)| host.state == HostState::Active && host.slots.iter().any(&pick))
            .min_by(|(_, a), (_, b)| a.free().cmp(&b.free()).then_with(|| a.id.cmp(&b.id)))
            .map(|(index, _)| index)
    }

    /// The region as the scaler sees it, with `buffer` as the region's setting
    /// and `waiting` users queued for a box (PENDING sessions in the server).
    pub(crate) fn view(&self, now: Millis, buffer: u32, waiting: u32) -> RegionView {
        let instances = self
            .hosts
            .iter()
            .map(|host| InstanceView {
                host_id: host.id.clone(),
                phase: host.phase(),
                capacity: host.slots.len() as u32,
                assigned: host.busy(),
                image: self.settings.image.clone(),
                launched_at: host.launched_at,
                managed: true,
                in_rollout: false,
            })
            .collect();
        RegionView { settings: RegionSettings { buffer, ..self.settings.clone() }, instances, waiting, now }
    }

    /// Carries out a plan: terminations first (nothing is left running on
    /// them but, should a plan terminate a host with sessions, they end),
    /// then drains, then launches.
    pub(crate) fn apply(&mut self, plan: &Plan, now: Millis, provider: &mut Provider) -> Applied {
        let mut result = Applied::default();
        for (id, reason) in &plan.terminate {
            let Some(host) = self.hosts.iter_mut().find(|host| &host.id == id) else {
                continue;
            };
            if matches!(host.state, HostState::Terminating { .. }) {
                continue;
            }
            result.terminated.push(Terminated {
                reason: *reason,
                age: now.saturating_sub(host.launched_at),
                slow_boot: matches!(host.state, HostState::Launching { connects_at: Some(_) }),
            });
            host.state = HostState::Terminating { gone_at: provider.terminate(now) };
            host.slots.iter_mut().for_each(|slot| *slot = Slot::Down);
        }
        for (id, reason) in &plan.drain {
            let Some(host) = self.hosts.iter_mut().find(|host| &host.id == id && host.state == HostState::Active)
            else {
                continue;
            };
            host.state = HostState::Draining;
            // Its warm and starting boxes go; its sessions stay to the end.
            for slot in &mut host.slots {
                if !matches!(slot, Slot::Busy { .. }) {
                    *slot = Slot::Down;
                }
            }
            match reason {
                DrainReason::Excess => result.drained_for_excess += 1,
                DrainReason::OldImage => result.drained_old_image += 1,
            }
        }
        let capacity = self.capacity() as usize;
        for _ in 0..plan.launch {
            match provider.launch(now) {
                LaunchOutcome::Refused => result.refused += 1,
                LaunchOutcome::Launched { connects_at } => {
                    self.next_id += 1;
                    self.hosts.push(Host {
                        id: format!("h{:06}", self.next_id),
                        launched_at: now,
                        state: HostState::Launching { connects_at },
                        slots: vec![Slot::Down; capacity],
                    });
                    result.launched += 1;
                }
            }
        }
        result
    }

    pub(crate) fn counts(&self) -> Counts {
        let mut counts = Counts::default();
        for host in &self.hosts {
            counts.billed += 1;
            counts.live += u32::from(host.is_live());
            match host.state {
                HostState::Launching { .. } => counts.launching += 1,
                HostState::Active => counts.active += 1,
                HostState::Draining => {
                    counts.draining += 1;
                    counts.draining_free += host.free();
                }
                HostState::Lost => counts.lost += 1,
                HostState::Terminating { .. } => counts.terminating += 1,
            }
            counts.warm += host.warm();
            counts.busy += host.busy();
        }
        counts
    }
}

#[cfg(test)]
mod tests {
    use crate::provider::ProviderModel;

    use super::*;

    fn settings(capacity: u32) -> RegionSettings {
        RegionSettings {
            buffer: 0,
            min_instances: 0,
            max_instances: 100,
            instance_types: vec![InstanceType { name: "test".into(), capacity }],
            image: "img".into(),
        }
    }

    fn instant() -> (Provider, HostModel) {
        let provider = ProviderModel {
            boot_min: Duration::ZERO,
            boot_max: Duration::ZERO,
            launch_failure_rate: 0.0,
            never_connect_rate: 0.0,
            ..ProviderModel::default()
        };
        let host = HostModel { spawn_min: Duration::ZERO, spawn_max: Duration::ZERO, loss_per_host_hour: 0.0 };
        (Provider::new(provider, 1), host)
    }

    fn launch(fleet: &mut Fleet, provider: &mut Provider, n: u32, now: Millis) {
        fleet.apply(&Plan { launch: n, ..Plan::default() }, now, provider);
    }

    #[test]
    fn a_launched_host_connects_and_warms_every_slot() {
        let (mut provider, model) = instant();
        let mut fleet = Fleet::new(settings(3), model, 1);
        launch(&mut fleet, &mut provider, 1, 0);
        assert_eq!(fleet.counts().launching, 1);
        fleet.advance(1000, 1000);
        let counts = fleet.counts();
        assert_eq!((counts.active, counts.warm), (1, 3));
    }

    #[test]
    fn users_go_to_the_fullest_host() {
        let (mut provider, model) = instant();
        let mut fleet = Fleet::new(settings(2), model, 1);
        launch(&mut fleet, &mut provider, 2, 0);
        fleet.advance(1000, 1000);
        assert!(fleet.claim_warm(1000, 60_000));
        assert!(fleet.claim_warm(1000, 60_000), "the second user fills the first user's host");
        let busy: Vec<u32> = fleet.hosts.iter().map(Host::busy).collect();
        assert!(busy == [2, 0] || busy == [0, 2], "bin-packed: {busy:?}");
    }

    #[test]
    fn an_ended_session_re_warms_its_slot_and_a_drain_removes_warm_boxes() {
        let (mut provider, model) = instant();
        let mut fleet = Fleet::new(settings(2), model, 1);
        launch(&mut fleet, &mut provider, 1, 0);
        fleet.advance(1000, 1000);
        assert!(fleet.claim_warm(1000, 5000));
        assert_eq!(fleet.advance(6000, 1000).sessions_ended, 1);
        assert_eq!(fleet.counts().warm, 2);
        assert!(fleet.claim_warm(6000, 5000));
        let id = fleet.hosts[0].id.clone();
        fleet.apply(&Plan { drain: vec![(id, DrainReason::Excess)], ..Plan::default() }, 6000, &mut provider);
        let counts = fleet.counts();
        assert_eq!((counts.draining, counts.warm, counts.busy, counts.draining_free), (1, 0, 1, 1));
        assert!(!fleet.claim_warm(6000, 5000), "a draining host takes no new session");
        fleet.advance(11_000, 1000);
        assert_eq!(fleet.counts().warm, 0, "its slot does not re-warm");
    }

    #[test]
    fn a_user_may_reserve_a_box_still_starting() {
        let (mut provider, mut model) = instant();
        model.spawn_min = Duration::from_secs(10);
        model.spawn_max = Duration::from_secs(10);
        let mut fleet = Fleet::new(settings(1), model, 1);
        launch(&mut fleet, &mut provider, 1, 0);
        fleet.advance(1000, 1000);
        assert!(!fleet.claim_warm(4000, 60_000));
        assert_eq!(fleet.reserve_starting(4000, 60_000), Some(7000));
        assert_eq!(fleet.reserve_starting(4000, 60_000), None, "nothing else is starting");
        assert_eq!(fleet.view(4000, 0, 0).instances[0].assigned, 1, "the planner sees the reservation");
    }

    #[test]
    fn a_lost_host_cuts_its_sessions() {
        let (mut provider, mut model) = instant();
        model.loss_per_host_hour = 1e9;
        let mut fleet = Fleet::new(settings(2), model, 1);
        launch(&mut fleet, &mut provider, 1, 0);
        fleet.hosts[0].state = HostState::Active;
        fleet.hosts[0].slots = vec![Slot::Busy { ends_at: 50_000 }, Slot::Warm];
        let advance = fleet.advance(10_000, 1000);
        assert_eq!((advance.hosts_lost, advance.cut.as_slice()), (1, [40_000].as_slice()));
        assert_eq!(fleet.view(10_000, 0, 0).instances[0].phase, Phase::Lost);
    }
}
