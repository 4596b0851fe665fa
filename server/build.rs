//! `sqlx::migrate!` embeds the migrations at compile time; this makes a new or
//! changed migration rebuild the crate (sqlx's documented recipe).
fn main() {
    println!("cargo:rerun-if-changed=../migrations");
}
