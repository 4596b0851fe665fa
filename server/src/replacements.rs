//! Warm replacements a host runs before the database holds them.
//!
//! A box's teardown names its replacement, which the host spawns in the freed
//! slot as part of the same command, with nothing written: the replacement
//! enters the database only with the dead box, in one bookkeeping write, once
//! its host confirms both (`Core::record_teardown`, `Store::recycle_torn_down`). That saves the
//! replacement's SPAWNING version and a write per allocation, but for those
//! milliseconds the host runs a box the database has no row for. An exit
//! notice for it would find nothing and be dropped, and the box would then
//! be written WAITING, dead. So each such box is listed here from its spawn
//! until it is written (or refused); an exit notice for a listed box is kept,
//! and the box is finished as soon as it is written.
//!
//! Why no exit is lost: the writer removes a box only after its write, and
//! an exit notice looks here before it reads the database. Either it finds
//! the box listed (and the writer, removing it under the same lock, sees the
//! exit), or the write had committed before it read.

use std::collections::HashMap;

use uuid::Uuid;

/// The replacements spawned and not yet written (a few per host at most).
#[derive(Default)]
pub struct UnrecordedReplacements {
    /// Box id → (its host, whether the host said it exited).
    boxes: std::sync::Mutex<HashMap<Uuid, (String, bool)>>,
}

impl UnrecordedReplacements {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, (String, bool)>> {
        // Every operation is one insert, lookup or removal: a panic cannot
        // leave the map half-updated, so poison is harmless.
        self.boxes.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A replacement is about to be spawned on `host_id`.
    pub fn spawning(&self, host_id: &str, id: Uuid) {
        self.lock().insert(id, (host_id.to_owned(), false));
    }

    /// The host says box `id` exited. True if it is a replacement not written
    /// yet: its exit is then applied once it is written.
    pub fn exited(&self, host_id: &str, id: Uuid) -> bool {
        match self.lock().get_mut(&id) {
            Some((host, exited)) if host == host_id => {
                *exited = true;
                true
            }
            _ => false,
        }
    }

    /// The replacement's write is done (or it was never spawned). True if its
    /// host said it exited meanwhile.
    pub fn settled(&self, id: Uuid) -> bool {
        self.lock().remove(&id).is_some_and(|(_, exited)| exited)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_exit_before_the_write_is_kept_for_the_writer() {
        let unrecorded = UnrecordedReplacements::default();
        let id = Uuid::now_v7();
        unrecorded.spawning("h1", id);
        assert!(unrecorded.exited("h1", id));
        assert!(unrecorded.settled(id));
        assert!(!unrecorded.settled(id), "the entry is gone once settled");
    }

    #[test]
    fn an_exit_after_the_write_is_left_to_the_database() {
        let unrecorded = UnrecordedReplacements::default();
        let id = Uuid::now_v7();
        unrecorded.spawning("h1", id);
        assert!(!unrecorded.settled(id));
        assert!(!unrecorded.exited("h1", id));
        assert!(!unrecorded.settled(id));
    }

    #[test]
    fn another_host_cannot_claim_the_exit() {
        let unrecorded = UnrecordedReplacements::default();
        let id = Uuid::now_v7();
        unrecorded.spawning("h1", id);
        assert!(!unrecorded.exited("h2", id));
        assert!(!unrecorded.settled(id));
    }
}
