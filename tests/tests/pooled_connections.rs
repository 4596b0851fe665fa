//! What the PostgreSQL store relies on from sqlx's pool: a request cancelled
//! mid-query (a client that hangs up drops its handler's future) or a
//! transaction dropped without commit leaves nothing behind for the next
//! user of the same pooled connection.
#![allow(clippy::unwrap_used)]

use std::str::FromStr as _;

use futures::TryStreamExt as _;
use sqlx::{
    Row as _,
    postgres::{PgConnectOptions, PgPool, PgPoolOptions},
};
use switchboard_tests::db::{TestDatabase, fresh_postgres};

/// One connection, so that every use of the pool is a reuse of it.
async fn one_connection_pool(options: PgConnectOptions) -> PgPool {
    PgPoolOptions::new().max_connections(1).test_before_acquire(false).connect_with(options).await.unwrap()
}

async fn database() -> (TestDatabase, PgConnectOptions) {
    let db = fresh_postgres().await.unwrap();
    let options = PgConnectOptions::from_str(db.url()).unwrap();
    (db, options)
}

/// The backend's process id: the same on every use of a one-connection pool.
async fn backend_pid(pool: &PgPool) -> i32 {
    sqlx::query_scalar("SELECT pg_backend_pid()").fetch_one(pool).await.unwrap()
}

#[tokio::test]
async fn a_query_dropped_mid_reply_leaves_nothing_for_the_next_user() {
    let (_db, options) = database().await;
    let pool = one_connection_pool(options).await;
    let pid = backend_pid(&pool).await;
    {
        let mut rows = sqlx::query("SELECT g FROM generate_series(1, 200000) AS g").fetch(&pool);
        let first: i32 = rows.try_next().await.unwrap().unwrap().get("g");
        assert_eq!(first, 1);
        // Dropped with most of the reply unread.
    }
    let answer: i32 = sqlx::query_scalar("SELECT 42").fetch_one(&pool).await.unwrap();
    assert_eq!(answer, 42, "the next query read its own reply, not the rest of the dropped one");
    assert_eq!(backend_pid(&pool).await, pid, "the connection was kept, not replaced");
}

#[tokio::test]
async fn a_transaction_dropped_without_commit_is_rolled_back_before_reuse() {
    let (_db, options) = database().await;
    let pool = one_connection_pool(options).await;
    sqlx::query("CREATE TABLE written (id INT)").execute(&pool).await.unwrap();
    let pid = backend_pid(&pool).await;
    {
        let mut tx = pool.begin().await.unwrap();
        sqlx::query("INSERT INTO written VALUES (1)").execute(&mut *tx).await.unwrap();
        // Dropped: neither committed nor rolled back.
    }
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM written").fetch_one(&pool).await.unwrap();
    assert_eq!(rows, 0);
    // Not inside the dropped transaction any more: this commits for real.
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("INSERT INTO written VALUES (2)").execute(&mut *tx).await.unwrap();
    tx.commit().await.unwrap();
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM written").fetch_one(&pool).await.unwrap();
    assert_eq!(rows, 1);
    assert_eq!(backend_pid(&pool).await, pid);
}
