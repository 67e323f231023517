//! The listing, a page at a time: agents in a stable order (oldest
//! registration first, then id), each page a range of an ordered index
//! read under the map's read lock. A full listing is these pages one after
//! another, so that neither a page nor the whole ever copies the fleet.

use std::ops::Bound;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use chrono::{DateTime, Utc};
use common::{AgentStatus, AgentView};
use uuid::Uuid;

use super::{lock, AgentRecord, HoldOut, IdsByIdentity, Maps, Registry, SlotsById};
use crate::record::NodeFacts;

/// An agent's place in the listing. As a cursor it names where a page
/// ended: the next page starts after it, whether that agent is still here
/// or not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ListCursor {
    registered_at: DateTime<Utc>,
    id: Uuid,
}

impl ListCursor {
    fn of(record: &AgentRecord) -> Self {
        ListCursor {
            registered_at: record.agent.registered_at,
            id: record.agent.id,
        }
    }

    /// The cursor as a client sees it: opaque, URL-safe.
    pub fn encode(&self) -> String {
        format!(
            "{}.{:09}.{}",
            self.registered_at.timestamp(),
            self.registered_at.timestamp_subsec_nanos(),
            self.id.simple()
        )
    }

    /// A cursor this router handed out, or `None`.
    pub fn decode(text: &str) -> Option<Self> {
        let mut parts = text.split('.');
        let seconds: i64 = parts.next()?.parse().ok()?;
        let nanos: u32 = parts.next()?.parse().ok()?;
        let id = Uuid::try_parse(parts.next()?).ok()?;
        if parts.next().is_some() {
            return None;
        }
        Some(ListCursor {
            registered_at: DateTime::from_timestamp(seconds, nanos)?,
            id,
        })
    }
}

/// Each loaded agent's record, by id, and its place in the listing; a
/// record at an address `hold_out` refuses is kept out of rotation.
fn records_of(
    agents: &[Arc<NodeFacts>],
    now: Instant,
    hold_out: &HoldOut,
) -> (SlotsById, Vec<ListCursor>) {
    let mut by_id = crate::sharded::ShardedMap::with_capacity(agents.len());
    let mut places = Vec::with_capacity(agents.len());
    for agent in agents {
        let mut record = AgentRecord::new(Arc::clone(agent), now, 0);
        if let Some(reason) = hold_out(record.address()) {
            tracing::warn!(agent_id = %agent.id, machine_name = &*agent.machine_name, "Kept out of rotation: {reason}.");
            record.unreachable = true;
        }
        places.push(ListCursor::of(&record));
        // The store holds one record per id, so none is replaced here.
        by_id.insert(record.agent.id, Arc::new(Mutex::new(record)));
    }
    (by_id, places)
}

/// The identity map of loaded agents, and the ids of agents that share an
/// identity with a later one (which is kept).
fn identities_of(agents: &[Arc<NodeFacts>]) -> (IdsByIdentity, Vec<Uuid>) {
    let mut by_identity = crate::sharded::ShardedMap::with_capacity(agents.len());
    let mut dropped = Vec::new();
    for agent in agents {
        if let Some(previous) = by_identity.insert(agent.identity(), agent.id) {
            // Cannot come from our own writes; keep the later record.
            tracing::warn!(agent_id = %previous, "Two stored agents share a name and port; keeping the later one.");
            dropped.push(previous);
        }
    }
    (by_identity, dropped)
}

/// One page of the listing.
pub struct ListPage {
    pub agents: Vec<AgentView>,
    /// Where the next page starts, when another agent follows this page.
    pub next: Option<ListCursor>,
}

impl Maps {
    /// The maps of a registry loaded from the store. The listing order is
    /// built once at the end, sorted and then filled in bulk, where
    /// inserting 100,000 cursors one at a time took a tenth of start-up.
    ///
    /// Indexing a large fleet is bound by memory, not instructions (100,000
    /// agents took 70 ms for 105 M instructions: each agent's facts, its
    /// new record and two hash table slots are cache misses), so the
    /// identity map is built on a second thread beside the records.
    pub(super) fn loaded(agents: Vec<Arc<NodeFacts>>, now: Instant, hold_out: &HoldOut) -> Maps {
        let two_threads = agents.len() >= Self::INDEX_ON_TWO_THREADS;
        Self::loaded_on(agents, now, hold_out, two_threads)
    }

    fn loaded_on(
        agents: Vec<Arc<NodeFacts>>,
        now: Instant,
        hold_out: &HoldOut,
        two_threads: bool,
    ) -> Maps {
        let (by_identity, dropped, (mut by_id, mut places)) = if two_threads {
            std::thread::scope(|scope| {
                let identities = crate::store::spawn_loader(scope, || identities_of(&agents));
                let records = records_of(&agents, now, hold_out);
                // Built here instead if the thread could not be started,
                // or failed (it only inserts into a map).
                let (by_identity, dropped) = identities
                    .and_then(|identities| identities.join().ok())
                    .unwrap_or_else(|| identities_of(&agents));
                (by_identity, dropped, records)
            })
        } else {
            let (by_identity, dropped) = identities_of(&agents);
            (by_identity, dropped, records_of(&agents, now, hold_out))
        };
        for previous in dropped {
            by_id.remove(&previous);
        }
        // The file lists agents in this order already, which the sort finds
        // in one pass; the places of agents dropped above are left out.
        places.retain(|place| by_id.contains_key(&place.id));
        Maps {
            by_id,
            by_identity,
            listing_order: places.into_iter().collect(),
        }
    }

    /// Below this many agents, a thread's start costs more than it saves.
    const INDEX_ON_TWO_THREADS: usize = 10_000;

    /// Adds an agent (its slot must not be locked by the caller).
    pub(super) fn add(&mut self, slot: Arc<Mutex<AgentRecord>>) {
        let place = ListCursor::of(&lock(&slot));
        self.listing_order.insert(place);
        if let Some(replaced) = self.by_id.insert(place.id, slot) {
            let replaced = ListCursor::of(&lock(&replaced));
            if replaced != place {
                self.listing_order.remove(&replaced);
            }
        }
    }

    /// Removes an agent (its slot must not be locked by the caller).
    pub(super) fn take(&mut self, id: Uuid) -> Option<Arc<Mutex<AgentRecord>>> {
        let slot = self.by_id.remove(&id)?;
        self.listing_order.remove(&ListCursor::of(&lock(&slot)));
        Some(slot)
    }

    /// An agent's registration time changed (news from another router):
    /// its place in the listing moves with it.
    pub(super) fn reorder(&mut self, id: Uuid, was: DateTime<Utc>, now: DateTime<Utc>) {
        if self.listing_order.remove(&ListCursor {
            registered_at: was,
            id,
        }) && self.by_id.contains_key(&id)
        {
            self.listing_order.insert(ListCursor {
                registered_at: now,
                id,
            });
        }
    }
}

impl Registry {
    /// Up to `limit` agents after `after` (from the start without it),
    /// optionally of one status. Holds the map's read lock for the page
    /// only: registrations wait at most one page, and an agent added or
    /// removed between pages shows up, or not, by its own place.
    pub fn list_page(
        &self,
        status: Option<AgentStatus>,
        after: Option<ListCursor>,
        limit: usize,
    ) -> ListPage {
        let start = after.map_or(Bound::Unbounded, Bound::Excluded);
        let maps = self.read_maps();
        let mut agents = Vec::with_capacity(limit.min(maps.by_id.len()));
        let mut last = None;
        let mut next = None;
        for place in maps.listing_order.range((start, Bound::Unbounded)) {
            let Some(slot) = maps.by_id.get(&place.id) else {
                continue;
            };
            let record = lock(slot);
            if status.is_some_and(|wanted| record.agent.status != wanted) {
                continue;
            }
            if agents.len() == limit {
                // One more agent follows: the page says where to go on.
                next = last;
                break;
            }
            agents.push(record.view());
            last = Some(*place);
        }
        ListPage { agents, next }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(name: &str, port: u16, seconds: i64) -> Arc<NodeFacts> {
        let registration = crate::record::Registration::for_test(name, port);
        let registered_at = DateTime::from_timestamp(1_800_000_000 - seconds, 0).expect("date");
        Arc::new(NodeFacts::registered(
            Uuid::new_v4(),
            &registration,
            registered_at,
        ))
    }

    /// Indexed on one thread or two, a load gives the same maps: the
    /// earlier of two agents under one name and port dropped from all three,
    /// the listing ordered by registration.
    #[test]
    fn a_load_indexed_on_two_threads_is_the_load_on_one() {
        let mut agents: Vec<Arc<NodeFacts>> = (0..50)
            .map(|n| agent(&format!("node-{}", n % 40), 11434 + (n % 3) as u16, n))
            .collect();
        // Same name, other port: another identity, kept.
        agents.push(agent("node-1", 9999, 60));
        let now = Instant::now();
        let one = Maps::loaded_on(agents.clone(), now, &|_| None, false);
        let two = Maps::loaded_on(agents.clone(), now, &|_| None, true);
        let ids = |maps: &Maps| {
            let mut ids: Vec<Uuid> = maps.by_id.keys().copied().collect();
            ids.sort();
            ids
        };
        let identities = |maps: &Maps| {
            let mut pairs: Vec<((String, u16), Uuid)> = maps
                .by_identity
                .iter()
                .map(|(k, v)| (k.clone(), *v))
                .collect();
            pairs.sort();
            pairs
        };
        let order = |maps: &Maps| maps.listing_order.iter().map(|c| c.id).collect::<Vec<_>>();
        assert_eq!(ids(&one), ids(&two));
        assert_eq!(identities(&one), identities(&two));
        assert_eq!(order(&one), order(&two));
        // Agents n and n + 40 differ in port (40 is not a multiple of 3).
        assert_eq!(ids(&two).len(), 51);
        // Now a true duplicate: the same name and port later in the load.
        agents.push(agent("node-7", 11434 + 7 % 3, 70));
        let one = Maps::loaded_on(agents.clone(), now, &|_| None, false);
        let two = Maps::loaded_on(agents.clone(), now, &|_| None, true);
        assert_eq!(ids(&one), ids(&two));
        assert_eq!(identities(&one), identities(&two));
        assert_eq!(order(&one), order(&two));
        assert_eq!(ids(&two).len(), 51, "the earlier node-7 dropped");
        assert!(!two.by_id.contains_key(&agents[7].id));
        assert!(two.by_id.contains_key(&agents[51].id));
        assert_eq!(order(&two).len(), 51);
        assert_eq!(
            order(&two).first(),
            Some(&agents[51].id),
            "the earliest registration lists first"
        );
    }
}
