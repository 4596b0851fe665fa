//! Fresh databases for tests: every test gets its own PostgreSQL database or
//! SQLite file, removed again when the `TestDatabase` is dropped.
//!
//! PostgreSQL must be running: a test that cannot reach it fails with a message
//! saying how to start it, it is never skipped.

use std::thread;

use anyhow::Context as _;
use sqlx::Connection as _;
use switchboard::store::{self, DynStore};
use tempfile::TempDir;

/// Admin URL of the test server; override with this variable.
pub const POSTGRES_URL_VARIABLE: &str = "SWITCHBOARD_TEST_POSTGRES_URL";
const DEFAULT_POSTGRES_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Sqlite,
}

/// A database that exists as long as this value does.
pub struct TestDatabase {
    url: String,
    backend: Backend,
    cleanup: Cleanup,
}

enum Cleanup {
    /// Someone else's database (a private server the test stops and starts).
    None,
    /// Dropped through the admin connection; a database cannot drop itself.
    Postgres { admin_url: String, name: String },
    /// Removing the directory removes the file and its WAL companions.
    Sqlite { _dir: TempDir },
}

impl TestDatabase {
    /// A PostgreSQL database this value does not own (nothing is dropped).
    pub fn external_postgres(url: &str) -> TestDatabase {
        TestDatabase { url: url.to_owned(), backend: Backend::Postgres, cleanup: Cleanup::None }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Runs a query that returns one integer (typically `SELECT count(*) …`)
    /// on a connection of its own, to check the stored rows behind the store's
    /// back.
    pub async fn query_i64(&self, sql: &str) -> anyhow::Result<i64> {
        match self.backend {
            Backend::Postgres => {
                let mut conn = sqlx::PgConnection::connect(&self.url).await?;
                Ok(sqlx::query_scalar(sql).fetch_one(&mut conn).await?)
            }
            Backend::Sqlite => {
                let mut conn = sqlx::SqliteConnection::connect(&self.url).await?;
                Ok(sqlx::query_scalar(sql).fetch_one(&mut conn).await?)
            }
        }
    }

    /// Runs a statement on a connection of its own (e.g. to corrupt a row on
    /// purpose); returns the number of rows it changed.
    pub async fn execute(&self, sql: &str) -> anyhow::Result<u64> {
        match self.backend {
            Backend::Postgres => {
                let mut conn = sqlx::PgConnection::connect(&self.url).await?;
                Ok(sqlx::query(sql).execute(&mut conn).await?.rows_affected())
            }
            Backend::Sqlite => {
                let mut conn = sqlx::SqliteConnection::connect(&self.url).await?;
                Ok(sqlx::query(sql).execute(&mut conn).await?.rows_affected())
            }
        }
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let Cleanup::Postgres { admin_url, name } = &self.cleanup else {
            return;
        };
        let (admin_url, name) = (admin_url.clone(), name.clone());
        // Drop runs inside the test's runtime, which cannot block on a future;
        // a thread with a runtime of its own can. Joined so that the database
        // is gone before the test reports; failures only leave a database
        // behind, which is not worth failing a test for.
        let dropper = thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
                return;
            };
            runtime.block_on(async move {
                if let Ok(mut conn) = sqlx::PgConnection::connect(&admin_url).await {
                    let statement = format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)");
                    let _ = sqlx::query(&statement).execute(&mut conn).await;
                    let _ = conn.close().await;
                }
            });
        });
        let _ = dropper.join();
    }
}

/// Creates an empty, uniquely named database on the test PostgreSQL server.
pub async fn fresh_postgres() -> anyhow::Result<TestDatabase> {
    let admin_url = std::env::var(POSTGRES_URL_VARIABLE).unwrap_or_else(|_| DEFAULT_POSTGRES_URL.to_owned());
    let mut admin = sqlx::PgConnection::connect(&admin_url).await.with_context(|| {
        format!(
            "PostgreSQL is not reachable at {admin_url}: start it (e.g. `pg_ctlcluster \
             --skip-systemctl-redirect $(ls /etc/postgresql) main start`) or point \
             {POSTGRES_URL_VARIABLE} at a server where this user may create databases"
        )
    })?;
    let name = format!("sb_test_{}", uuid::Uuid::new_v4().simple());
    sqlx::query(&format!("CREATE DATABASE \"{name}\""))
        .execute(&mut admin)
        .await
        .with_context(|| format!("creating test database {name}"))?;
    admin.close().await?;
    Ok(TestDatabase {
        url: database_url(&admin_url, &name)?,
        backend: Backend::Postgres,
        cleanup: Cleanup::Postgres { admin_url, name },
    })
}

/// A SQLite database file in a fresh temporary directory (the file itself is
/// created when the store opens it).
pub fn fresh_sqlite() -> anyhow::Result<TestDatabase> {
    let dir = tempfile::Builder::new().prefix("switchboard-test-").tempdir()?;
    let path = dir.path().join("switchboard.db");
    let path = path.to_str().context("temporary directory path is not UTF-8")?;
    Ok(TestDatabase {
        url: format!("sqlite://{path}"),
        backend: Backend::Sqlite,
        cleanup: Cleanup::Sqlite { _dir: dir },
    })
}

pub async fn fresh(backend: Backend) -> anyhow::Result<TestDatabase> {
    match backend {
        Backend::Postgres => fresh_postgres().await,
        Backend::Sqlite => fresh_sqlite(),
    }
}

/// Opens the store for `db` with the backend its URL names and migrates it.
pub async fn open_store(db: &TestDatabase) -> anyhow::Result<DynStore> {
    store::connect(db.url()).await.with_context(|| format!("opening the {:?} store", db.backend()))
}

/// `admin_url` with its database (the URL path) replaced by `name`.
fn database_url(admin_url: &str, name: &str) -> anyhow::Result<String> {
    let (base, query) = match admin_url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (admin_url, None),
    };
    let authority_start =
        base.find("://").map(|index| index + 3).with_context(|| format!("{POSTGRES_URL_VARIABLE} is not a URL"))?;
    let authority_end = base[authority_start..].find('/').map_or(base.len(), |index| authority_start + index);
    let mut url = format!("{}/{name}", &base[..authority_end]);
    if let Some(query) = query {
        url.push('?');
        url.push_str(query);
    }
    Ok(url)
}

/// A PostgreSQL server of the test's own (initdb in a temporary directory,
/// trust auth, on `port`), so that it can be stopped and started without
/// disturbing the other tests' shared server.
pub struct PrivatePostgres {
    dir: TempDir,
    pub port: u16,
}

impl PrivatePostgres {
    fn bin(tool: &str) -> anyhow::Result<std::path::PathBuf> {
        let root = std::path::Path::new("/usr/lib/postgresql");
        let mut versions: Vec<_> = std::fs::read_dir(root)
            .with_context(|| format!("no PostgreSQL server binaries under {}", root.display()))?
            .filter_map(|entry| entry.ok().map(|entry| entry.path()))
            .collect();
        versions.sort();
        let path = versions.last().context("no PostgreSQL version installed")?.join("bin").join(tool);
        anyhow::ensure!(path.exists(), "{} not found", path.display());
        Ok(path)
    }

    /// Runs a server tool as `postgres` when this process is root (the server
    /// refuses to run as root), as this user otherwise.
    fn run(tool: &str, args: &[&str]) -> anyhow::Result<()> {
        let bin = Self::bin(tool)?;
        let is_root = std::process::Command::new("id").arg("-u").output().map(|o| o.stdout == b"0\n").unwrap_or(false);
        let mut command = if is_root {
            let mut command = std::process::Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(&bin);
            command
        } else {
            std::process::Command::new(&bin)
        };
        let output = command.args(args).output().with_context(|| format!("running {tool}"))?;
        anyhow::ensure!(output.status.success(), "{tool} failed: {}", String::from_utf8_lossy(&output.stderr));
        Ok(())
    }

    pub fn start_new(port: u16) -> anyhow::Result<PrivatePostgres> {
        let dir = tempfile::Builder::new().prefix("switchboard-pg-").tempdir()?;
        let data = dir.path().join("data");
        std::fs::create_dir(&data)?;
        let is_root = std::process::Command::new("id").arg("-u").output().map(|o| o.stdout == b"0\n").unwrap_or(false);
        if is_root {
            let owner =
                std::process::Command::new("chown").arg("-R").arg("postgres:postgres").arg(dir.path()).status()?;
            anyhow::ensure!(owner.success(), "chown of {} failed", dir.path().display());
        }
        let data_dir = data.to_string_lossy().into_owned();
        Self::run("initdb", &["-D", &data_dir, "-A", "trust", "-U", "postgres", "--no-sync"])?;
        let server = PrivatePostgres { dir, port };
        server.start()?;
        Ok(server)
    }

    fn data_dir(&self) -> String {
        self.dir.path().join("data").to_string_lossy().into_owned()
    }

    /// Starts (again) on the same data: nothing written before is lost.
    pub fn start(&self) -> anyhow::Result<()> {
        let options =
            format!("-p {} -c listen_addresses=127.0.0.1 -k {} -c fsync=off", self.port, self.dir.path().display());
        Self::run(
            "pg_ctl",
            &["-D", &self.data_dir(), "-o", &options, "-w", "-l", &format!("{}/log", self.data_dir()), "start"],
        )
    }

    /// Stops at once, as a crash would (connections are cut, no checkpoint).
    pub fn stop(&self) -> anyhow::Result<()> {
        Self::run("pg_ctl", &["-D", &self.data_dir(), "-m", "immediate", "-w", "stop"])
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::database_url;

    #[test]
    fn database_url_replaces_the_path_only() {
        assert_eq!(
            database_url("postgres://postgres@127.0.0.1:5432/postgres", "sb_test_1").ok(),
            Some("postgres://postgres@127.0.0.1:5432/sb_test_1".to_owned())
        );
        assert_eq!(
            database_url("postgres://u:p@db/admin?sslmode=disable", "x").ok(),
            Some("postgres://u:p@db/x?sslmode=disable".to_owned())
        );
        assert_eq!(database_url("postgres://db:5432", "x").ok(), Some("postgres://db:5432/x".to_owned()));
    }
}
