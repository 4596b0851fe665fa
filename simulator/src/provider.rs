//! The simulated cloud: launches that take a while to boot, some refused for
//! lack of capacity, some that boot but whose host never connects, and
//! terminations that take effect a little later (billed until then).

use std::time::Duration;

use rand::{SeedableRng, rngs::StdRng};

use planner::Millis;

use crate::dist;

/// How the simulated cloud behaves.
#[derive(Debug, Clone, PartialEq)]
pub struct ProviderModel {
    /// From launch until the host's agent connects (uniform in this range).
    pub boot_min: Duration,
    pub boot_max: Duration,
    /// Launches refused outright (EC2's InsufficientInstanceCapacity): nothing
    /// is created or billed, the scaler asks again at its next plan.
    pub launch_failure_rate: f64,
    /// Launches that create (and bill) an instance whose host never connects:
    /// a bad AMI, a broken user-data script, a network that does not route.
    pub never_connect_rate: f64,
    /// From a terminate call until billing stops (uniform in this range).
    pub terminate_min: Duration,
    pub terminate_max: Duration,
}

impl Default for ProviderModel {
    fn default() -> Self {
        // A g4dn from RunInstances to a running hostagent: about 1.5 min for
        // the instance, up to 2.5 more for the GPU driver and a cold image
        // pull. The failure rates are a bad day's, not an average one's.
        ProviderModel {
            boot_min: Duration::from_secs(90),
            boot_max: Duration::from_secs(240),
            launch_failure_rate: 0.03,
            never_connect_rate: 0.02,
            terminate_min: Duration::from_secs(30),
            terminate_max: Duration::from_secs(90),
        }
    }
}

/// What came of one launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LaunchOutcome {
    Refused,
    /// An instance exists (and is billed); its host connects at `connects_at`,
    /// or never.
    Launched {
        connects_at: Option<Millis>,
    },
}

/// The provider's own generator, so that how often the scaler launches does
/// not shift the demand's or the hosts' draws.
pub(crate) struct Provider {
    model: ProviderModel,
    rng: StdRng,
}

impl Provider {
    pub(crate) fn new(model: ProviderModel, seed: u64) -> Self {
        Provider { model, rng: StdRng::seed_from_u64(seed) }
    }

    pub(crate) fn launch(&mut self, now: Millis) -> LaunchOutcome {
        if dist::chance(&mut self.rng, self.model.launch_failure_rate) {
            return LaunchOutcome::Refused;
        }
        // Drawn even for an instance that will never connect, so that the
        // failure rate does not change every later instance's boot time.
        let boot = dist::uniform_millis(&mut self.rng, self.model.boot_min, self.model.boot_max);
        let connects = !dist::chance(&mut self.rng, self.model.never_connect_rate);
        LaunchOutcome::Launched { connects_at: connects.then_some(now + boot) }
    }

    /// When billing stops for an instance terminated at `now`.
    pub(crate) fn terminate(&mut self, now: Millis) -> Millis {
        now + dist::uniform_millis(&mut self.rng, self.model.terminate_min, self.model.terminate_max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn launches_fail_and_never_connect_at_their_rates_and_boot_in_range() {
        let mut provider = Provider::new(
            ProviderModel { launch_failure_rate: 0.1, never_connect_rate: 0.2, ..ProviderModel::default() },
            9,
        );
        let outcomes: Vec<LaunchOutcome> = (0..10_000).map(|_| provider.launch(1_000)).collect();
        let refused = outcomes.iter().filter(|o| **o == LaunchOutcome::Refused).count();
        let silent = outcomes.iter().filter(|o| **o == LaunchOutcome::Launched { connects_at: None }).count();
        assert!((800..1200).contains(&refused), "{refused} refused");
        assert!((1500..2100).contains(&silent), "{silent} never connect");
        assert!(outcomes.iter().all(|o| match o {
            LaunchOutcome::Launched { connects_at: Some(at) } => (91_000..=241_000).contains(at),
            _ => true,
        }));
    }

    #[test]
    fn a_perfect_cloud_never_fails() {
        let model = ProviderModel { launch_failure_rate: 0.0, never_connect_rate: 0.0, ..ProviderModel::default() };
        let mut provider = Provider::new(model, 1);
        assert!((0..1000).all(|_| matches!(provider.launch(0), LaunchOutcome::Launched { connects_at: Some(_) })));
    }
}
