//! The fleet simulator: replays a day of demand against the scaler's real
//! decisions (`planner::plan`) with a simulated clock and a simulated cloud,
//! and reports what the day cost (instance-hours, idle warm boxes) and how
//! users fared (allocations that found no warm box, waits, give-ups).
//!
//! - [`demand`]: the day's arrivals and session lengths.
//! - `provider`: launches (boot delay, refusals, hosts that never connect)
//!   and terminations.
//! - `fleet`: hosts and their mandelbox slots; allocation; the scaler's view
//!   and its plans applied.
//! - [`sim`]: the clock, the users waiting, the scaler's schedule.
//! - [`report`], [`sweep`]: the figures, and a grid of configurations.

pub mod config;
pub mod demand;
mod dist;
mod fleet;
mod provider;
pub mod report;
pub mod sim;
pub mod sweep;

pub use config::{SimConfig, WhatIf};
pub use fleet::HostModel;
pub use provider::ProviderModel;
