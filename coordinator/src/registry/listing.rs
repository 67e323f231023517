//! The listing, a page at a time: agents in a stable order (oldest
//! registration first, then id), each page a range of an ordered index
//! read under the map's read lock. A full listing is these pages one after
//! another, so that neither a page nor the whole ever copies the fleet.

use std::collections::{BTreeSet, HashMap};
use std::ops::Bound;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use chrono::{DateTime, Utc};
use common::{AgentStatus, AgentView};
use uuid::Uuid;

use super::{lock, AgentRecord, Maps, Registry};
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
    pub(super) fn loaded(agents: Vec<Arc<NodeFacts>>, now: Instant) -> Maps {
        let mut maps = Maps {
            by_id: foldhash::HashMap::with_capacity_and_hasher(agents.len(), Default::default()),
            by_identity: HashMap::with_capacity(agents.len()),
            listing_order: BTreeSet::new(),
        };
        let mut places = Vec::with_capacity(agents.len());
        for agent in agents {
            let identity = agent.identity();
            if let Some(previous) = maps.by_identity.insert(identity, agent.id) {
                // Cannot come from our own writes; keep the later record.
                tracing::warn!(agent_id = %previous, "Two stored agents share a name and port; keeping the later one.");
                maps.by_id.remove(&previous);
            }
            let record = AgentRecord::new(agent, now, 0);
            places.push(ListCursor::of(&record));
            // The store holds one record per id, so none is replaced here.
            maps.by_id
                .insert(record.agent.id, Arc::new(Mutex::new(record)));
        }
        // The file lists agents in this order already, which the sort finds
        // in one pass; the places of agents dropped above are left out.
        places.retain(|place| maps.by_id.contains_key(&place.id));
        maps.listing_order = places.into_iter().collect();
        maps
    }

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
