//! Choosing a node among candidates.

use std::sync::atomic::{AtomicUsize, Ordering};

/// The seed's round-robin: an atomic cursor over the candidate list, so that
/// concurrent picks need no lock and spread evenly.
pub fn round_robin<'a, T>(candidates: &'a [T], cursor: &AtomicUsize) -> Option<&'a T> {
    if candidates.is_empty() {
        return None;
    }
    let turn = cursor.fetch_add(1, Ordering::Relaxed);
    candidates.get(turn % candidates.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_robin_visits_every_candidate_in_turn() {
        let cursor = AtomicUsize::new(0);
        let candidates = ["a", "b", "c"];
        let picks: Vec<&str> = (0..6)
            .filter_map(|_| round_robin(&candidates, &cursor).copied())
            .collect();
        assert_eq!(picks, ["a", "b", "c", "a", "b", "c"]);
    }

    #[test]
    fn round_robin_over_nothing_picks_nothing() {
        let cursor = AtomicUsize::new(0);
        assert!(round_robin::<u8>(&[], &cursor).is_none());
    }
}
