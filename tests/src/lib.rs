//! Shared harness for the end-to-end tests: fresh databases, servers on port 0,
//! real hostagents.

pub mod db;
