use super::*;

const MINUTE: Millis = 60_000;

fn settings(buffer: u32, min: u32, max: u32, capacity: u32) -> RegionSettings {
    RegionSettings {
        buffer,
        min_instances: min,
        max_instances: max,
        instance_types: vec![InstanceType { name: "g4dn.2xlarge".into(), capacity }],
        image: "ami-new".into(),
    }
}

fn host(id: &str, phase: Phase, capacity: u32, assigned: u32) -> InstanceView {
    InstanceView {
        host_id: id.into(),
        phase,
        capacity,
        assigned,
        image: "ami-new".into(),
        launched_at: 0,
        managed: true,
        in_rollout: false,
    }
}

fn view(settings: RegionSettings, instances: Vec<InstanceView>, now: Millis) -> RegionView {
    RegionView { settings, instances, waiting: 0, now }
}

fn timings() -> Timings {
    Timings {
        launch_timeout: Duration::from_secs(600),
        scale_down_delay: Duration::from_secs(120),
        scale_down_cooldown: Duration::from_secs(300),
    }
}

#[test]
fn an_empty_region_launches_exactly_enough_for_its_buffer() {
    let mut memory = ScalerMemory::default();
    let plan = plan(&view(settings(5, 0, 10, 2), vec![], 0), &mut memory, &timings());
    assert_eq!(plan.launch, 3, "ceil(5 / 2)");
    assert_eq!(memory.last_launch, Some(0));
}

#[test]
fn waiting_users_are_demand_even_without_a_buffer() {
    let mut memory = ScalerMemory::default();
    let waiting = RegionView { waiting: 3, ..view(settings(0, 0, 10, 2), vec![], 0) };
    assert_eq!(plan(&waiting, &mut memory, &timings()).launch, 2, "ceil(3 / 2)");
    // Slots already coming cover them; the buffer comes on top.
    let coming = RegionView { waiting: 3, ..view(settings(2, 0, 10, 2), vec![host("a", Phase::Launching, 4, 0)], 0) };
    assert_eq!(plan(&coming, &mut memory, &timings()).launch, 1, "3 waiting + 2 buffer - 4 coming");
    // And no host is drained while users wait for its slots.
    let mut memory = ScalerMemory { excess_since: Some(0), last_launch: None };
    let busy =
        RegionView { waiting: 2, ..view(settings(0, 0, 10, 2), vec![host("a", Phase::Active, 2, 0)], 10 * MINUTE) };
    assert!(plan(&busy, &mut memory, &timings()).drain.is_empty());
}

#[test]
fn capacity_on_the_way_is_not_launched_twice() {
    let mut memory = ScalerMemory::default();
    let instances = vec![host("a", Phase::Launching, 2, 0), host("b", Phase::Launching, 2, 0)];
    let plan = plan(&view(settings(5, 0, 10, 2), instances, MINUTE), &mut memory, &timings());
    assert_eq!((plan.launch, plan.on_the_way, plan.available), (1, 4, 4));
}

#[test]
fn assigned_slots_do_not_count_as_available() {
    let mut memory = ScalerMemory::default();
    let instances = vec![host("a", Phase::Active, 4, 3), host("b", Phase::Active, 4, 4)];
    let plan = plan(&view(settings(4, 0, 10, 4), instances, MINUTE), &mut memory, &timings());
    assert_eq!(plan.available, 1);
    assert_eq!(plan.launch, 1);
}

#[test]
fn never_above_max() {
    let mut memory = ScalerMemory::default();
    let instances = vec![host("a", Phase::Active, 2, 2), host("b", Phase::Draining, 2, 1)];
    let plan = plan(&view(settings(10, 0, 3, 2), instances, MINUTE), &mut memory, &timings());
    assert_eq!(plan.launch, 1, "two live (draining counts) + one = max 3");
    assert!(plan.capped_by_max);
}

#[test]
fn min_instances_are_kept_even_without_buffer() {
    let mut memory = ScalerMemory::default();
    let plan = plan(&view(settings(0, 2, 10, 4), vec![host("a", Phase::Active, 4, 0)], 0), &mut memory, &timings());
    assert_eq!(plan.launch, 1);
}

#[test]
fn a_fixed_fleet_region_is_never_scaled_but_lost_hosts_are_cleaned_up() {
    let mut memory = ScalerMemory::default();
    let mut fixed = settings(10, 2, 10, 2);
    fixed.instance_types.clear();
    let plan = plan(&view(fixed, vec![host("lost", Phase::Lost, 2, 0)], 0), &mut memory, &timings());
    assert_eq!(plan.launch, 0);
    assert!(plan.drain.is_empty());
    assert_eq!(plan.terminate, vec![("lost".into(), TerminateReason::HostLost)]);
}

#[test]
fn unmanaged_hosts_count_but_are_never_touched() {
    let mut memory = ScalerMemory::default();
    let mut static_host = host("static", Phase::Active, 8, 0);
    static_host.managed = false;
    let mut lost_static = host("static-lost", Phase::Lost, 8, 0);
    lost_static.managed = false;
    let region = view(settings(2, 0, 10, 2), vec![static_host, lost_static], 0);
    for now in [0, 10 * MINUTE, 20 * MINUTE] {
        let plan = plan(&RegionView { now, ..region.clone() }, &mut memory, &timings());
        assert!(plan.is_empty(), "{plan:?}");
    }
}

#[test]
fn hosts_that_never_connect_lost_hosts_and_empty_draining_hosts_are_terminated() {
    let mut memory = ScalerMemory::default();
    let mut late = host("late", Phase::Launching, 2, 0);
    late.launched_at = 0;
    let mut fresh = host("fresh", Phase::Launching, 2, 0);
    fresh.launched_at = 9 * MINUTE;
    let instances = vec![
        late,
        fresh,
        host("lost", Phase::Lost, 2, 0),
        host("drained", Phase::Draining, 2, 0),
        host("busy-draining", Phase::Draining, 2, 1),
    ];
    let plan = plan(&view(settings(2, 0, 10, 2), instances, 11 * MINUTE), &mut memory, &timings());
    assert_eq!(
        plan.terminate,
        vec![
            ("late".into(), TerminateReason::NeverConnected),
            ("lost".into(), TerminateReason::HostLost),
            ("drained".into(), TerminateReason::Drained),
        ]
    );
    // The fresh launch still counts; the one that never connected does not.
    assert_eq!(plan.on_the_way, 2);
    assert_eq!(plan.launch, 0);
}

#[test]
fn a_lost_host_is_replaced() {
    let mut memory = ScalerMemory::default();
    let instances = vec![host("a", Phase::Active, 2, 0), host("b", Phase::Lost, 2, 0)];
    let plan = plan(&view(settings(4, 0, 10, 2), instances, MINUTE), &mut memory, &timings());
    assert_eq!(plan.terminate, vec![("b".into(), TerminateReason::HostLost)]);
    assert_eq!(plan.launch, 1);
}

#[test]
fn old_image_hosts_drain_and_new_capacity_replaces_them() {
    let mut memory = ScalerMemory::default();
    let mut old = host("old", Phase::Active, 2, 1);
    old.image = "ami-old".into();
    let plan = plan(&view(settings(2, 0, 10, 2), vec![old], MINUTE), &mut memory, &timings());
    assert_eq!(plan.drain, vec![("old".into(), DrainReason::OldImage)]);
    assert_eq!(plan.launch, 1);
}

#[test]
fn rollout_instances_are_neither_counted_nor_drained() {
    let mut memory = ScalerMemory::default();
    let mut surge = host("surge", Phase::Active, 4, 0);
    surge.image = "ami-next".into();
    surge.in_rollout = true;
    let instances = vec![host("a", Phase::Active, 2, 0), surge];
    let plan = plan(&view(settings(2, 0, 10, 2), instances, MINUTE), &mut memory, &timings());
    assert!(plan.is_empty(), "{plan:?}");
    assert_eq!(plan.available, 2);
}

#[test]
fn excess_is_drained_only_after_it_lasted_and_the_cooldown_passed() {
    let timings = timings();
    let mut memory = ScalerMemory { excess_since: None, last_launch: Some(0) };
    // Buffer 2; three empty hosts of 2 give 6 free: 4 too many = two hosts.
    let instances =
        vec![host("a", Phase::Active, 2, 0), host("b", Phase::Active, 2, 0), host("c", Phase::Active, 2, 1)];
    let region = view(settings(2, 0, 10, 2), instances, MINUTE);
    let first = plan(&region, &mut memory, &timings);
    assert!(first.drain.is_empty());
    assert_eq!(memory.excess_since, Some(MINUTE));
    // Lasted long enough, but a launch happened less than the cooldown ago.
    let second = plan(&RegionView { now: 4 * MINUTE, ..region.clone() }, &mut memory, &timings);
    assert!(second.drain.is_empty());
    // Both passed: "a" (free 2) goes; "b" would leave too little; "c" has a
    // session, so it is never drained for excess.
    let third = plan(&RegionView { now: 6 * MINUTE, ..region.clone() }, &mut memory, &timings);
    assert_eq!(third.drain, vec![("a".into(), DrainReason::Excess)]);
    assert_eq!(memory.excess_since, None);
}

#[test]
fn scale_down_drains_only_empty_hosts_and_keeps_the_buffer_and_min() {
    let timings = timings();
    let instances = vec![
        host("two-sessions", Phase::Active, 4, 2),
        host("one-session", Phase::Active, 4, 1),
        host("empty", Phase::Active, 4, 0),
        host("empty-too", Phase::Active, 4, 0),
    ];
    let drains = |buffer: u32, min: u32| {
        let mut memory = ScalerMemory { excess_since: Some(0), last_launch: None };
        let result = plan(&view(settings(buffer, min, 10, 4), instances.clone(), 10 * MINUTE), &mut memory, &timings);
        result.drain.into_iter().map(|(id, _)| id).collect::<Vec<String>>()
    };
    // free = 2 + 3 + 4 + 4 = 13. Buffer 3 → excess 10: both empty hosts go,
    // the ones with sessions stay however much excess is left.
    assert_eq!(drains(3, 0), vec!["empty".to_owned(), "empty-too".to_owned()]);
    // Buffer 7 → excess 6: one empty host. Buffer 9 → excess 4, exactly one
    // host's slots: it goes, leaving exactly the buffer. Buffer 10: none.
    assert_eq!(drains(7, 0), vec!["empty".to_owned()]);
    assert_eq!(drains(9, 0), vec!["empty".to_owned()]);
    assert!(drains(10, 0).is_empty());
    // Never below min_instances.
    assert!(drains(3, 4).is_empty());
    assert_eq!(drains(3, 3).len(), 1);
}

#[test]
fn a_short_dip_below_the_excess_restarts_the_delay() {
    let timings = timings();
    let mut memory = ScalerMemory::default();
    let idle = vec![host("a", Phase::Active, 2, 0), host("b", Phase::Active, 2, 0)];
    let busy = vec![host("a", Phase::Active, 2, 2), host("b", Phase::Active, 2, 1)];
    // A host with a session is never drained for excess, whatever the excess.
    let mut spare = ScalerMemory { excess_since: Some(0), last_launch: None };
    let partly = vec![host("a", Phase::Active, 8, 1), host("b", Phase::Active, 8, 1)];
    assert!(plan(&view(settings(1, 0, 10, 8), partly, 10 * MINUTE), &mut spare, &timings).drain.is_empty());
    plan(&view(settings(1, 0, 10, 2), idle.clone(), 0), &mut memory, &timings);
    assert_eq!(memory.excess_since, Some(0));
    plan(&view(settings(1, 0, 10, 2), busy, MINUTE), &mut memory, &timings);
    assert_eq!(memory.excess_since, None);
    let result = plan(&view(settings(1, 0, 10, 2), idle, 2 * MINUTE), &mut memory, &timings);
    assert!(result.drain.is_empty());
}

#[test]
fn an_operator_drained_host_is_kept_but_not_counted() {
    let mut memory = ScalerMemory::default();
    let instances = vec![host("cordoned", Phase::Cordoned, 2, 0), host("a", Phase::Active, 2, 0)];
    let plan = plan(&view(settings(4, 0, 3, 2), instances, MINUTE), &mut memory, &timings());
    assert!(plan.terminate.is_empty() && plan.drain.is_empty(), "{plan:?}");
    assert_eq!((plan.available, plan.live_instances, plan.launch), (2, 2, 1));
}
