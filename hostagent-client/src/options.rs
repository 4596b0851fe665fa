//! What the agent tells the control plane about its host, and where to find it.

use std::fmt;

use crate::backoff::Backoff;

/// Settings of a [`HostAgent`](crate::HostAgent).
#[derive(Clone)]
pub struct AgentOptions {
    /// Control-plane URL, e.g. `http://127.0.0.1:50051`.
    pub endpoint: String,
    pub host_id: String,
    pub region: String,
    /// Image / AMI version the host runs.
    pub image: String,
    /// How many mandelboxes the host can run at once.
    pub capacity: u32,
    /// Address clients use to reach this host's mandelboxes, e.g. `127.0.0.1`.
    pub address: String,
    /// Host credential bound to `host_id`. Never logged.
    pub credential: String,
    pub backoff: Backoff,
}

impl AgentOptions {
    /// Options with image `dev`, capacity 4, address `127.0.0.1` and the default backoff.
    pub fn new(
        endpoint: impl Into<String>,
        host_id: impl Into<String>,
        region: impl Into<String>,
        credential: impl Into<String>,
    ) -> Self {
        Self {
            endpoint: endpoint.into(),
            host_id: host_id.into(),
            region: region.into(),
            image: "dev".to_owned(),
            capacity: 4,
            address: "127.0.0.1".to_owned(),
            credential: credential.into(),
            backoff: Backoff::default(),
        }
    }
}

impl fmt::Debug for AgentOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentOptions")
            .field("endpoint", &self.endpoint)
            .field("host_id", &self.host_id)
            .field("region", &self.region)
            .field("image", &self.image)
            .field("capacity", &self.capacity)
            .field("address", &self.address)
            .field("credential", &"<redacted>")
            .field("backoff", &self.backoff)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_fills_defaults_and_debug_hides_the_credential() {
        let o = AgentOptions::new("http://cp:1", "h1", "us-east-1", "s3cr3t-cred");
        assert_eq!(o.image, "dev");
        assert_eq!(o.capacity, 4);
        assert_eq!(o.address, "127.0.0.1");
        assert_eq!(o.backoff, Backoff::default());
        let debug = format!("{o:?}");
        assert!(!debug.contains("s3cr3t-cred"), "{debug}");
        assert!(debug.contains("h1"));
    }
}
