//! Configuration, layered: defaults < file < the database `config` table <
//! `SWITCHBOARD__*` environment variables (`SWITCHBOARD__ALLOCATION__MAX_SESSIONS_PER_USER=5`).

use std::{net::SocketAddr, path::Path, time::Duration};

use figment::{
    Figment,
    providers::{Env, Format, Serialized, Toml},
};
use serde::{Deserialize, Serialize};

/// A secret that never prints: Debug, Display and Serialize all show `[redacted]`.
#[derive(Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The value, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(if self.0.is_empty() { "" } else { "[redacted]" })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address the gRPC, gRPC-web and HTTP endpoints listen on (port 0 picks one).
    pub listen: SocketAddr,
    /// URL hosts and mandelboxes use to reach this server; derived from the
    /// bound address when empty.
    pub public_endpoint: String,
    pub database: DatabaseConfig,
    pub auth: AuthConfig,
    pub hosts: HostsConfig,
    pub allocation: AllocationConfig,
    pub log: LogConfig,
    pub billing: BillingConfig,
    pub redis: RedisConfig,
    /// Where hosts come from (EC2, or local hostagents); see `cloud/`.
    pub cloud: crate::cloud::CloudConfig,
    /// The scaler's timings; per-region settings live in the database.
    pub scaling: crate::scaling::ScalingConfig,
    /// Time allowed for in-flight work after SIGTERM.
    pub shutdown_grace_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseConfig {
    /// `postgres://...` or `sqlite://path`.
    pub url: Secret,
    pub max_connections: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Expected `iss` of user tokens.
    pub issuer: String,
    /// Expected `aud` of user tokens.
    pub audience: String,
    /// Clock skew allowed on `exp` and `nbf`.
    pub leeway_secs: u64,
    /// The tenant's JWKS, e.g. `https://TENANT.auth0.com/.well-known/jwks.json`.
    pub jwks_url: String,
    /// With no `jwks_url`, find it in `{issuer}/.well-known/openid-configuration`.
    pub oidc_discovery: bool,
    /// Signing algorithms accepted (RS256, ES256).
    pub algorithms: Vec<String>,
    /// How long fetched keys are used before they are fetched again.
    pub jwks_ttl_secs: u64,
    /// An unknown key id triggers a fetch at most this often.
    pub jwks_min_refresh_interval_ms: u64,
    pub jwks_fetch_timeout_ms: u64,
    /// Custom claim that carries the user's Stripe customer id.
    pub stripe_customer_claim: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HostsConfig {
    /// Key that host credentials are derived from (HMAC of the host id).
    pub credential_secret: Secret,
    pub heartbeat_interval_ms: u64,
    /// A connected host that misses this many heartbeat intervals is unhealthy.
    pub missed_heartbeats: u32,
    /// How long a disconnected host keeps its mandelboxes before they are lost.
    pub reconnect_grace_ms: u64,
    pub hello_timeout_ms: u64,
    /// How long a command waits for its host's result.
    pub command_timeout_ms: u64,
    /// How often hosts are checked against the warm target and the sweeps run.
    pub maintenance_interval_ms: u64,
    /// How often the heartbeat times of this replica's hosts are written, in
    /// one batch (liveness itself is decided in memory).
    pub heartbeat_write_interval_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AllocationConfig {
    /// Clients older than this semantic version are refused (CLIENT_OUTDATED).
    pub min_client_version: String,
    pub max_sessions_per_user: u32,
    /// How long Allocate waits for a host to confirm an assignment before it
    /// releases the claim and tries the next box.
    pub assign_timeout_ms: u64,
    pub max_assign_attempts: u32,
    /// How long Allocate waits for an on-demand spawn.
    pub spawn_timeout_ms: u64,
    /// A pending session that finds no box in this time ends (NO_CAPACITY).
    pub pending_timeout_ms: u64,
    pub max_client_data_bytes: usize,
    pub max_regions: usize,
    /// App that warm boxes are started with; other apps are spawned on demand.
    pub warm_app: String,
    /// Keep hosts filled with warm boxes. Off, every session waits for a cold
    /// start (cheaper hosts, slower sessions).
    pub warm_pool: bool,
    /// How long the warm pool's bookkeeping (a host confirmed a spawn or a
    /// teardown) waits for more of its kind to write in the same batch. 0
    /// writes at once whatever is queued.
    pub bookkeeping_linger_ms: u64,
    /// Write the session ends of concurrent ReportDisconnects in one
    /// statement and commit (a group commit, no waiting). Off, each is
    /// written alone.
    pub group_disconnect_reports: bool,
    /// How many of those group commits may be written at once (at least
    /// one). With two, a report that arrives while a batch is being written
    /// does not wait for that batch's commit, but batches are smaller: on
    /// one machine with PostgreSQL local, two writers were 3–14% slower than
    /// one (BENCHMARKS.md, run L). A database further away may gain.
    pub disconnect_writers: usize,
    /// Write the claims of concurrent Allocates in one statement and commit
    /// (a group commit, no waiting; `crate::session_claims`). Off, each is
    /// written alone.
    pub group_claims: bool,
    /// How many of those group commits may be written at once (at least
    /// one): with two, a claim that arrives while a batch is written is
    /// taken at once by the other writer, in a smaller batch. On one machine
    /// with PostgreSQL local, two were no faster than one (BENCHMARKS.md,
    /// run V).
    pub claim_writers: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BillingConfig {
    /// `stripe`, or `dev` (no Stripe; every user counts as a subscriber — only
    /// for `switchboard dev` and tests).
    pub provider: String,
    pub stripe_secret_key: Secret,
    /// Overrides Stripe's API URL (tests point it at an emulator).
    pub stripe_api_base: String,
    /// Price a Checkout session subscribes to.
    pub price_id: String,
    pub trial_days: u32,
    /// Signing secret of the webhook endpoint (`whsec_…`); webhooks are refused without it.
    pub webhook_secret: Secret,
    pub webhook_tolerance_secs: u64,
    /// A cached status is used without asking Stripe for this long...
    pub status_ttl_secs: u64,
    /// ...and, when Stripe is slow or down, up to this long.
    pub max_staleness_secs: u64,
    /// Deadline of one Stripe call.
    pub request_timeout_ms: u64,
}

impl Default for BillingConfig {
    fn default() -> Self {
        BillingConfig {
            provider: "stripe".into(),
            stripe_secret_key: Secret::default(),
            stripe_api_base: String::new(),
            price_id: String::new(),
            trial_days: 14,
            webhook_secret: Secret::default(),
            webhook_tolerance_secs: 300,
            status_ttl_secs: 300,
            max_staleness_secs: 3_600,
            request_timeout_ms: 2_000,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://host:6379`; empty means no Redis (caches and the maintenance
    /// flag stay in process).
    pub url: Secret,
    /// Prefix of the keys this deployment uses (several deployments may share a Redis).
    pub namespace: String,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig { url: Secret::default(), namespace: "switchboard".into() }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `text` or `json`.
    pub format: String,
    /// tracing filter, e.g. `info,switchboard=debug`; RUST_LOG wins when set.
    pub filter: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 7400)),
            public_endpoint: String::new(),
            database: DatabaseConfig::default(),
            auth: AuthConfig::default(),
            hosts: HostsConfig::default(),
            allocation: AllocationConfig::default(),
            log: LogConfig::default(),
            billing: BillingConfig::default(),
            redis: RedisConfig::default(),
            cloud: crate::cloud::CloudConfig::default(),
            scaling: crate::scaling::ScalingConfig::default(),
            shutdown_grace_ms: 10_000,
        }
    }
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig { url: Secret::new("sqlite://switchboard.db"), max_connections: 16 }
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            issuer: "https://switchboard.dev.local/".into(),
            audience: "switchboard".into(),
            leeway_secs: 30,
            jwks_url: String::new(),
            oidc_discovery: false,
            algorithms: vec!["RS256".into(), "ES256".into()],
            jwks_ttl_secs: 3600,
            jwks_min_refresh_interval_ms: 30_000,
            jwks_fetch_timeout_ms: 5_000,
            stripe_customer_claim: "https://switchboard.dev/stripe_customer_id".into(),
        }
    }
}

impl Default for HostsConfig {
    fn default() -> Self {
        HostsConfig {
            credential_secret: Secret::default(),
            heartbeat_interval_ms: 5_000,
            missed_heartbeats: 3,
            reconnect_grace_ms: 30_000,
            hello_timeout_ms: 5_000,
            command_timeout_ms: 5_000,
            maintenance_interval_ms: 1_000,
            heartbeat_write_interval_ms: 15_000,
        }
    }
}

impl Default for AllocationConfig {
    fn default() -> Self {
        AllocationConfig {
            min_client_version: "0.0.0".into(),
            max_sessions_per_user: 3,
            assign_timeout_ms: 5_000,
            max_assign_attempts: 3,
            spawn_timeout_ms: 15_000,
            pending_timeout_ms: 120_000,
            max_client_data_bytes: 16 * 1024,
            max_regions: 16,
            warm_app: "chrome".into(),
            warm_pool: true,
            bookkeeping_linger_ms: 5,
            group_disconnect_reports: true,
            disconnect_writers: 1,
            group_claims: true,
            claim_writers: 1,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig { format: "text".into(), filter: "info".into() }
    }
}

impl HostsConfig {
    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_millis(self.heartbeat_interval_ms)
    }

    /// Silence after which a connected host is unhealthy.
    pub fn heartbeat_deadline(&self) -> Duration {
        self.heartbeat_interval() * self.missed_heartbeats.max(1)
    }
}

/// Sources of configuration, in the order they override each other.
#[derive(Debug, Clone, Default)]
pub struct ConfigSources {
    pub file: Option<std::path::PathBuf>,
    /// `(dotted.key, JSON value)` rows from the database `config` table.
    pub database: Vec<(String, String)>,
    /// Values set by the program itself (e.g. `switchboard dev` flags); they sit
    /// just below the environment.
    pub overrides: Option<serde_json::Value>,
}

impl ConfigSources {
    pub fn load(&self) -> anyhow::Result<Config> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(file) = &self.file {
            figment = figment.merge(Toml::file_exact(file));
        }
        figment = figment.merge(Serialized::defaults(nest_dotted(&self.database).map_err(anyhow::Error::msg)?));
        if let Some(overrides) = &self.overrides {
            figment = figment.merge(Serialized::defaults(overrides.clone()));
        }
        Ok(figment.merge(Env::prefixed("SWITCHBOARD__").split("__")).extract()?)
    }
}

/// Turns `[("allocation.max_sessions_per_user", "5")]` into
/// `{"allocation": {"max_sessions_per_user": 5}}`.
fn nest_dotted(rows: &[(String, String)]) -> Result<serde_json::Value, String> {
    let mut root = serde_json::Map::new();
    for (key, raw) in rows {
        let value: serde_json::Value = serde_json::from_str(raw)
            .map_err(|error| format!("config table key {key:?}: value is not JSON: {error}"))?;
        let mut parts = key.split('.').peekable();
        let mut node = &mut root;
        while let Some(part) = parts.next() {
            if parts.peek().is_none() {
                node.insert(part.to_owned(), value.clone());
                break;
            }
            let entry =
                node.entry(part.to_owned()).or_insert_with(|| serde_json::Value::Object(serde_json::Map::new()));
            match entry {
                serde_json::Value::Object(map) => node = map,
                _ => {
                    return Err(format!("config table key {key:?} nests under a non-table value"));
                }
            }
        }
    }
    Ok(serde_json::Value::Object(root))
}

impl Config {
    /// The configuration as TOML with secrets redacted, for `--dump-config`.
    pub fn dump(&self) -> String {
        toml_like(&serde_json::to_value(self).unwrap_or_default())
    }

    pub fn from_file(path: &Path) -> anyhow::Result<Config> {
        ConfigSources { file: Some(path.to_owned()), ..Default::default() }.load()
    }
}

/// Renders a JSON object as TOML-style sections (enough for a human to read).
fn toml_like(value: &serde_json::Value) -> String {
    let mut top = String::new();
    let mut sections = String::new();
    if let serde_json::Value::Object(map) = value {
        for (key, value) in map {
            match value {
                serde_json::Value::Object(inner) => {
                    sections.push_str(&format!("\n[{key}]\n"));
                    for (inner_key, inner_value) in inner {
                        sections.push_str(&format!("{inner_key} = {inner_value}\n"));
                    }
                }
                other => top.push_str(&format!("{key} = {other}\n")),
            }
        }
    }
    top + &sections
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn secrets_never_print() {
        let mut config = Config::default();
        config.hosts.credential_secret = Secret::new("hunter2");
        config.database.url = Secret::new("postgres://user:pw@db/x");
        let dumped = config.dump();
        assert!(!dumped.contains("hunter2"), "{dumped}");
        assert!(!dumped.contains("pw@db"), "{dumped}");
        assert!(!format!("{config:?}").contains("hunter2"));
        assert!(dumped.contains("credential_secret = \"[redacted]\""), "{dumped}");
    }

    #[test]
    fn database_rows_override_defaults_and_file_but_not_env() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("switchboard.toml");
        std::fs::write(&file, "[allocation]\nmax_sessions_per_user = 7\nmax_regions = 4\n").unwrap();
        let sources = ConfigSources {
            file: Some(file),
            database: vec![("allocation.max_regions".into(), "9".into())],
            overrides: None,
        };
        let config = sources.load().unwrap();
        assert_eq!(config.allocation.max_sessions_per_user, 7, "file beats defaults");
        assert_eq!(config.allocation.max_regions, 9, "database beats file");
    }

    #[test]
    fn bad_database_rows_are_reported() {
        let sources = ConfigSources {
            database: vec![("allocation.max_regions".into(), "not json".into())],
            ..Default::default()
        };
        let error = sources.load().unwrap_err().to_string();
        assert!(error.contains("allocation.max_regions"), "{error}");
    }
}
