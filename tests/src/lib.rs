//! Shared harness for the end-to-end tests: fresh databases, servers on port 0,
//! real hostagents.
//!
//! Tracing output is shown only with `TEST_LOG=1`.

pub mod app;
pub mod cloud;
pub mod cluster;
pub mod db;
pub mod jwks;
pub mod runtime;
pub mod stripe;

pub use app::{HostSpec, TestApp, TestOptions};
pub use db::Backend;

/// Installs a test subscriber when `TEST_LOG` is set.
pub fn init_test_log() {
    switchboard::install_tls_provider();
    if std::env::var_os("TEST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
            .with_test_writer()
            .try_init();
    }
}

/// Runs each named `async fn(Backend)` test against PostgreSQL and SQLite.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),+ $(,)?) => {
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::Backend::Postgres).await
                }
            )+
        }
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::Backend::Sqlite).await
                }
            )+
        }
    };
}
