//! A hash map split into shards that each grow on their own.
//!
//! A `HashMap` that fills up doubles its table and moves every entry into
//! the new one, rehashing each key, inside the insert that found it full.
//! The registry's maps are changed under its write lock, so that insert
//! held up every registration and heartbeat: on the registration storm the
//! identity map's growth from 229,000 to 458,000 entries (SipHash over every
//! machine name) was the one thread running for over 10 ms while the rest
//! of the router waited (issue 16, eleventh session). Split 64 ways, each
//! growth moves a 64th of the entries.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};

const SHARDS: usize = 64;

#[derive(Debug)]
pub(crate) struct ShardedMap<K, V, S> {
    shards: Box<[HashMap<K, V, S>]>,
    /// Entries in all shards: counted here, since the registry and the
    /// writer ask on every change.
    len: usize,
    /// Picks a key's shard: seeded per map, as the shards' own hashers.
    pick: foldhash::fast::RandomState,
}

impl<K: Hash + Eq, V, S: BuildHasher + Default> ShardedMap<K, V, S> {
    /// Room for `entries` spread evenly, without growing.
    pub(crate) fn with_capacity(entries: usize) -> Self {
        let each = entries.div_ceil(SHARDS);
        ShardedMap {
            shards: (0..SHARDS)
                .map(|_| HashMap::with_capacity_and_hasher(each, S::default()))
                .collect(),
            len: 0,
            pick: foldhash::fast::RandomState::default(),
        }
    }

    fn shard_of<Q: Hash + ?Sized>(&self, key: &Q) -> usize {
        // The top bits: foldhash mixes them best.
        (self.pick.hash_one(key) >> (64 - SHARDS.trailing_zeros())) as usize
    }

    pub(crate) fn get<Q>(&self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.shards[self.shard_of(key)].get(key)
    }

    pub(crate) fn contains_key<Q>(&self, key: &Q) -> bool
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.get(key).is_some()
    }

    pub(crate) fn insert(&mut self, key: K, value: V) -> Option<V> {
        let shard = self.shard_of(&key);
        let replaced = self.shards[shard].insert(key, value);
        if replaced.is_none() {
            self.len += 1;
        }
        replaced
    }

    pub(crate) fn remove<Q>(&mut self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let shard = self.shard_of(key);
        let removed = self.shards[shard].remove(key);
        if removed.is_some() {
            self.len -= 1;
        }
        removed
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub(crate) fn clear(&mut self) {
        self.shards.iter_mut().for_each(HashMap::clear);
        self.len = 0;
    }

    pub(crate) fn values(&self) -> impl Iterator<Item = &V> {
        self.shards.iter().flat_map(HashMap::values)
    }

    #[cfg(test)]
    pub(crate) fn keys(&self) -> impl Iterator<Item = &K> {
        self.shards.iter().flat_map(HashMap::keys)
    }

    #[cfg(test)]
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.shards.iter().flat_map(HashMap::iter)
    }
}

impl<K: Hash + Eq, V, S: BuildHasher + Default> Default for ShardedMap<K, V, S> {
    fn default() -> Self {
        Self::with_capacity(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn it_behaves_as_one_map() {
        let mut map: ShardedMap<String, usize, std::hash::RandomState> = ShardedMap::default();
        for n in 0..10_000 {
            assert_eq!(map.insert(format!("node-{n}"), n), None);
        }
        assert_eq!(map.insert("node-7".into(), 70), Some(7));
        assert_eq!(map.len(), 10_000);
        assert_eq!(map.get("node-7"), Some(&70));
        assert!(map.contains_key("node-9999") && !map.contains_key("node-10000"));
        assert_eq!(map.remove("node-3"), Some(3));
        assert_eq!(map.remove("node-3"), None);
        assert_eq!(map.values().count(), 9_999);
        assert_eq!(
            map.keys().filter(|key| key.starts_with("node-1")).count(),
            1_111
        );
        assert_eq!(map.insert("node-3".into(), 33), None);
        assert_eq!(map.get("node-3"), Some(&33));
        assert_eq!(map.len(), 10_000);
        // Every shard takes a share: each holds between half and twice its
        // even share of the 10,000 keys.
        assert!(map
            .shards
            .iter()
            .all(|shard| (10_000 / SHARDS / 2..2 * 10_000 / SHARDS).contains(&shard.len())));
        map.clear();
        assert!(map.is_empty() && map.get("node-3").is_none());
    }
}
