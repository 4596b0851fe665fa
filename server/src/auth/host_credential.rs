//! Host credentials: `hc1.` + base64url(HMAC-SHA256(secret, host id)). A
//! credential is only valid for the host id it was made for, so a host cannot
//! claim another's identity, and the control plane stores nothing per host.
//! EC2 user data (or `switchboard dev`) installs the credential on the host.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::config::Secret;

const PREFIX: &str = "hc1.";

#[derive(Clone)]
pub struct HostCredentials {
    secret: Secret,
}

impl HostCredentials {
    pub fn new(secret: Secret) -> Self {
        HostCredentials { secret }
    }

    fn mac(&self, host_id: &str) -> Hmac<Sha256> {
        // HMAC accepts keys of any length; this cannot fail.
        let mut mac = match Hmac::<Sha256>::new_from_slice(self.secret.expose().as_bytes()) {
            Ok(mac) => mac,
            Err(_) => unreachable!("hmac takes keys of any length"),
        };
        mac.update(b"switchboard-host:");
        mac.update(host_id.as_bytes());
        mac
    }

    pub fn issue(&self, host_id: &str) -> String {
        format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(self.mac(host_id).finalize().into_bytes()))
    }

    /// Constant-time check that `credential` was issued for `host_id`.
    pub fn verify(&self, host_id: &str, credential: &str) -> bool {
        let Some(encoded) = credential.strip_prefix(PREFIX) else {
            return false;
        };
        let Ok(tag) = URL_SAFE_NO_PAD.decode(encoded) else {
            return false;
        };
        self.mac(host_id).verify_slice(&tag).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credential_is_bound_to_its_host() {
        let credentials = HostCredentials::new(Secret::new("s3cret"));
        let issued = credentials.issue("host-a");
        assert!(credentials.verify("host-a", &issued));
        assert!(!credentials.verify("host-b", &issued));
        assert!(!credentials.verify("host-a", "hc1.AAAA"));
        assert!(!credentials.verify("host-a", ""));
        let other = HostCredentials::new(Secret::new("other"));
        assert!(!other.verify("host-a", &issued));
    }
}
