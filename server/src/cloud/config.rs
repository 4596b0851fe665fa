//! The `[cloud]` configuration section.
//!
//! ```toml
//! [cloud]
//! provider = "ec2"
//! cluster = "switchboard-prod"
//!
//! # Where hosts go in each region; what they run (image, instance types) and how
//! # many (buffer, min, max) are region settings in the database (AdminService.PutRegion).
//! [cloud.regions.us-east-1]
//! subnet_id = "subnet-0abc"
//! security_group_ids = ["sg-0abc"]
//!
//! [cloud.ec2]
//! # endpoint_url = "http://127.0.0.1:5000"   # an EC2 emulator (moto) in tests
//! # access_key_id / secret_access_key: static credentials; empty = the default
//! # AWS chain (environment, profile, instance role / IRSA)
//! ```

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};

use crate::config::Secret;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    /// Hostagents in this process (`switchboard dev`, tests).
    #[default]
    Local,
    Ec2,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CloudConfig {
    pub provider: ProviderKind,
    /// Value of the `switchboard:cluster` tag on every instance this deployment
    /// launches; reconciliation owns every instance carrying it.
    pub cluster: String,
    /// Per region: network placement and instance profile of the hosts.
    pub regions: BTreeMap<String, RegionCloudConfig>,
    pub ec2: Ec2Config,
}

impl Default for CloudConfig {
    fn default() -> Self {
        CloudConfig {
            provider: ProviderKind::Local,
            cluster: "switchboard-dev".into(),
            regions: BTreeMap::new(),
            ec2: Ec2Config::default(),
        }
    }
}

impl CloudConfig {
    pub fn region(&self, name: &str) -> Option<&RegionCloudConfig> {
        self.regions.get(name)
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegionCloudConfig {
    /// Subnet to launch into; empty = the default VPC's.
    pub subnet_id: String,
    pub security_group_ids: Vec<String>,
    /// IAM instance profile (name) for the hosts; empty = none.
    pub instance_profile: String,
}

/// An instance type and how many mandelboxes one instance of it runs.
pub use crate::model::InstanceType as InstanceTypeConfig;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Ec2Config {
    /// Endpoint override (an EC2 emulator in tests); empty = the real EC2 endpoint of each region.
    pub endpoint_url: String,
    /// Static credentials; both empty = the default AWS credential chain.
    pub access_key_id: Secret,
    pub secret_access_key: Secret,
    /// Attempts per API call on throttling or transient errors.
    pub max_attempts: u32,
    /// First backoff delay; doubles per attempt (with jitter) up to `max_backoff_ms`.
    pub initial_backoff_ms: u64,
    pub max_backoff_ms: u64,
    /// User data template; empty = the built-in `deploy/ec2-user-data.sh.tmpl`.
    pub user_data_template: Option<PathBuf>,
    /// How many RunInstances calls (one per host) run at once.
    pub launch_concurrency: usize,
}

impl Default for Ec2Config {
    fn default() -> Self {
        Ec2Config {
            endpoint_url: String::new(),
            access_key_id: Secret::default(),
            secret_access_key: Secret::default(),
            max_attempts: 5,
            initial_backoff_ms: 200,
            max_backoff_ms: 10_000,
            user_data_template: None,
            launch_concurrency: 4,
        }
    }
}

impl Ec2Config {
    pub fn initial_backoff(&self) -> Duration {
        Duration::from_millis(self.initial_backoff_ms)
    }

    pub fn max_backoff(&self) -> Duration {
        Duration::from_millis(self.max_backoff_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_cloud_section_and_hides_credentials() {
        let text = r#"
            provider = "ec2"
            cluster = "prod"
            [regions.us-east-1]
            subnet_id = "subnet-1"
            security_group_ids = ["sg-1", "sg-2"]
            [ec2]
            endpoint_url = "http://127.0.0.1:5000"
            access_key_id = "AKIDEXAMPLE"
            secret_access_key = "wJalrXUtnFEMI"
        "#;
        let config: CloudConfig =
            match figment::Figment::from(figment::providers::Serialized::defaults(CloudConfig::default()))
                .merge(<figment::providers::Toml as figment::providers::Format>::string(text))
                .extract()
            {
                Ok(config) => config,
                Err(e) => panic!("{e}"),
            };
        assert_eq!(config.provider, ProviderKind::Ec2);
        let region = config.region("us-east-1").map(|r| r.security_group_ids.len());
        assert_eq!(region, Some(2));
        assert_eq!(config.ec2.max_attempts, 5);
        let debug = format!("{config:?}");
        assert!(!debug.contains("wJalrXUtnFEMI") && !debug.contains("AKIDEXAMPLE"), "{debug}");
    }
}
