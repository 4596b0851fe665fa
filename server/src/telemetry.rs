//! Logging set-up: structured, lowercase messages with fields, on stderr (stdout
//! is for what a command prints for people and scripts).

use tracing_subscriber::{EnvFilter, fmt, prelude::*};

use crate::config::LogConfig;

/// Installs the global subscriber; RUST_LOG overrides the configured filter.
pub fn init(config: &LogConfig) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&config.filter));
    let registry = tracing_subscriber::registry().with(filter);
    let result = if config.format == "json" {
        registry.with(fmt::layer().json().with_current_span(true).with_writer(std::io::stderr)).try_init()
    } else {
        registry.with(fmt::layer().with_target(false).with_writer(std::io::stderr)).try_init()
    };
    // Already installed (tests, or dev mode calling twice) is fine.
    let _ = result;
}
