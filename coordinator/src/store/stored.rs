//! The one stored form: how an agent and a change look on disk, and the one
//! set of rules that applies a change to a set of records.
//!
//! `agents.json` is an array of [`StoredAgent`]; each line of
//! `agents.journal` is a [`Change`]. The same [`Records::apply`] replays the
//! journal at start and keeps the writer's copy as changes are committed,
//! so the two can never disagree on what a change means.

use std::borrow::Cow;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};

use chrono::{DateTime, Utc};
use common::{AgentStatus, BackendKind};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use uuid::Uuid;

use crate::auth::TokenDigest;
use crate::record::{NodeFacts, RecentlyInterned, Report};

/// An agent as the data files hold it. The API's `common::Agent` is another
/// type: it carries the live report and never the secret's hash.
///
/// Its strings borrow: from the record when it is written (a snapshot of
/// 100,000 agents copies no string to write them), and from the file's bytes
/// when it is read, unless a string holds an escape. Loading a large fleet
/// then allocates only what the registry keeps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredAgent<'a> {
    pub id: Uuid,
    #[serde(borrow)]
    pub machine_name: Cow<'a, str>,
    /// A stored address that does not parse (a hand-edited file) loads as
    /// `0.0.0.0`, which the registry never routes to, rather than making
    /// the whole file unreadable.
    #[serde(deserialize_with = "lenient_ip")]
    pub ip_address: IpAddr,
    pub port: u16,
    #[serde(borrow)]
    pub runtime_version: Cow<'a, str>,
    pub status: AgentStatus,
    #[serde(
        deserialize_with = "rfc3339",
        serialize_with = "common::rfc3339::serialize"
    )]
    pub registered_at: DateTime<Utc>,
    #[serde(
        deserialize_with = "rfc3339",
        serialize_with = "common::rfc3339::serialize"
    )]
    pub last_seen: DateTime<Utc>,
    #[serde(borrow)]
    pub system_info: StoredSystemInfo<'a>,
    #[serde(default, borrow, deserialize_with = "borrowed_strings")]
    pub models: Vec<Cow<'a, str>>,
    #[serde(default)]
    pub backend: BackendKind,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tls: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrency: Option<u32>,
    /// SHA-256 of the agent's secret, in hex.
    #[serde(
        default,
        borrow,
        deserialize_with = "borrowed_optional_string",
        skip_serializing_if = "Option::is_none"
    )]
    pub secret_hash: Option<Cow<'a, str>>,
}

/// `common::SystemInfo`'s fields, with borrowed strings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredSystemInfo<'a> {
    #[serde(borrow)]
    pub os: Cow<'a, str>,
    #[serde(borrow)]
    pub arch: Cow<'a, str>,
    pub cpu_cores: u32,
    /// Bytes.
    pub total_memory: u64,
}

/// A string that borrows from the input when it can. Serde's own `Cow`
/// borrows only as a field marked `borrow`, never inside a `Vec` or an
/// `Option`.
struct BorrowedString<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for BorrowedString<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Cow<'de, str>;
            fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
                formatter.write_str("a string")
            }
            fn visit_borrowed_str<E: serde::de::Error>(
                self,
                text: &'de str,
            ) -> Result<Self::Value, E> {
                Ok(Cow::Borrowed(text))
            }
            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Self::Value, E> {
                Ok(Cow::Owned(text.to_owned()))
            }
            fn visit_string<E: serde::de::Error>(self, text: String) -> Result<Self::Value, E> {
                Ok(Cow::Owned(text))
            }
        }
        deserializer.deserialize_str(Visitor).map(BorrowedString)
    }
}

fn borrowed_strings<'de: 'a, 'a, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Vec<Cow<'a, str>>, D::Error> {
    let strings = Vec::<BorrowedString<'a>>::deserialize(deserializer)?;
    Ok(strings.into_iter().map(|string| string.0).collect())
}

fn borrowed_optional_string<'de: 'a, 'a, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Cow<'a, str>>, D::Error> {
    let string = Option::<BorrowedString<'a>>::deserialize(deserializer)?;
    Ok(string.map(|string| string.0))
}

fn lenient_ip<'de, D: Deserializer<'de>>(deserializer: D) -> Result<IpAddr, D::Error> {
    let text = BorrowedString::deserialize(deserializer)?.0;
    Ok(text.trim().parse().unwrap_or(IpAddr::from([0, 0, 0, 0])))
}

/// The dates as the router writes them (RFC 3339) through chrono's
/// dedicated parser, several times faster than the general one its serde
/// support uses, which still reads any other form it accepts.
fn rfc3339<'de, D: Deserializer<'de>>(deserializer: D) -> Result<DateTime<Utc>, D::Error> {
    let text = BorrowedString::deserialize(deserializer)?.0;
    DateTime::parse_from_rfc3339(&text)
        .or_else(|_| text.parse::<DateTime<chrono::FixedOffset>>())
        .map(|date| date.with_timezone(&Utc))
        .map_err(serde::de::Error::custom)
}

impl<'a> From<&'a NodeFacts> for StoredAgent<'a> {
    fn from(facts: &'a NodeFacts) -> Self {
        StoredAgent {
            id: facts.id,
            machine_name: Cow::Borrowed(&facts.machine_name),
            ip_address: facts.ip_address,
            port: facts.port,
            runtime_version: Cow::Borrowed(&facts.runtime_version),
            status: facts.status,
            registered_at: facts.registered_at,
            last_seen: facts.last_seen,
            system_info: StoredSystemInfo {
                os: Cow::Borrowed(&facts.os),
                arch: Cow::Borrowed(&facts.arch),
                cpu_cores: facts.cpu_cores,
                total_memory: facts.total_memory,
            },
            models: facts
                .models
                .iter()
                .map(|model| Cow::Borrowed(&**model))
                .collect(),
            backend: facts.backend,
            tls: facts.tls,
            max_concurrency: facts.max_concurrency,
            secret_hash: facts
                .secret_digest
                .map(|digest| Cow::Owned(digest.to_hex())),
        }
    }
}

impl StoredAgent<'_> {
    /// The registry's compact form. The report is not stored: the next
    /// heartbeat brings it back. (A method of the stored form rather than a
    /// `From` impl on `NodeFacts`, so that records know nothing of storage.)
    pub fn into_facts(self) -> NodeFacts {
        self.into_facts_with(&mut RecentlyInterned::default())
    }

    /// `into_facts` for one agent of many read together (a whole file).
    pub fn into_facts_with(self, recent: &mut RecentlyInterned) -> NodeFacts {
        let agent = self;
        NodeFacts {
            id: agent.id,
            machine_name: agent.machine_name.into_owned().into_boxed_str(),
            ip_address: agent.ip_address,
            port: agent.port,
            runtime_version: recent.string(&agent.runtime_version),
            status: agent.status,
            registered_at: agent.registered_at,
            last_seen: agent.last_seen,
            os: recent.string(&agent.system_info.os),
            arch: recent.string(&agent.system_info.arch),
            cpu_cores: agent.system_info.cpu_cores,
            total_memory: agent.system_info.total_memory,
            models: recent.models(&agent.models),
            backend: agent.backend,
            tls: agent.tls,
            max_concurrency: agent.max_concurrency,
            report: Report::default(),
            secret_digest: agent.secret_hash.as_deref().and_then(TokenDigest::from_hex),
        }
    }
}

/// One durable change. A journal line is one of these, so replay is
/// idempotent: an upsert carries the whole record, a delete only the id, a
/// `seen` the liveness of the agents that moved since the last one.
#[derive(Debug, Clone)]
pub enum Change {
    /// The record, in the registry's own compact form: the writer keeps it
    /// as it is, and it takes its stored form only when written.
    Upsert(Arc<NodeFacts>),
    Delete(Uuid),
    Seen(Vec<Seen>),
}

impl Change {
    /// Its kind, as the journal and the metrics name it.
    pub fn kind(&self) -> &'static str {
        match self {
            Change::Upsert(_) => "upsert",
            Change::Delete(_) => "delete",
            Change::Seen(_) => "seen",
        }
    }
}

/// Liveness facts flushed every few seconds: journaled compactly, as
/// `[id, last_seen in epoch milliseconds, status]`, so that heartbeats never
/// make the store rewrite the whole snapshot nor format 100,000 dates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Seen(
    pub Uuid,
    #[serde(with = "chrono::serde::ts_milliseconds")] pub DateTime<Utc>,
    pub AgentStatus,
);

/// The journal line's shape: `{"op": "upsert", "agent": {...}}`,
/// `{"op": "delete", "id": "..."}`, `{"op": "seen", "agents": [...]}`.
#[derive(Serialize)]
#[serde(tag = "op", rename_all = "lowercase")]
enum LineOut<'a> {
    Upsert { agent: Box<StoredAgent<'a>> },
    Delete { id: &'a Uuid },
    Seen { agents: &'a [Seen] },
}

/// A journal line as read: every field the kinds use, each optional, so
/// that the line is read in one pass. (Serde's tagged enums, as `LineOut`,
/// first copy a whole line into a tree of values to find the tag, which
/// for a flush of 100,000 heartbeats cost more than reading it.)
#[derive(Deserialize)]
struct LineIn<'a> {
    op: LineKind,
    #[serde(borrow)]
    agent: Option<StoredAgent<'a>>,
    id: Option<Uuid>,
    agents: Option<Vec<Seen>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum LineKind {
    Upsert,
    Delete,
    Seen,
}

impl Serialize for Change {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Change::Upsert(facts) => LineOut::Upsert {
                agent: Box::new(StoredAgent::from(&**facts)),
            },
            Change::Delete(id) => LineOut::Delete { id },
            Change::Seen(agents) => LineOut::Seen { agents },
        }
        .serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Change {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error as _;
        let line = LineIn::<'de>::deserialize(deserializer)?;
        Ok(match line.op {
            LineKind::Upsert => {
                let agent = line.agent.ok_or_else(|| D::Error::missing_field("agent"))?;
                Change::Upsert(Arc::new(agent.into_facts()))
            }
            LineKind::Delete => {
                Change::Delete(line.id.ok_or_else(|| D::Error::missing_field("id"))?)
            }
            LineKind::Seen => Change::Seen(
                line.agents
                    .ok_or_else(|| D::Error::missing_field("agents"))?,
            ),
        })
    }
}

/// Records per page of [`Records`]. A snapshot's frozen view copies one
/// pointer per page; a change to a page that a snapshot still holds copies
/// that page's pointers once (4,096 of them, tens of microseconds).
const PAGE: usize = 4_096;

type Page = Vec<Option<Arc<NodeFacts>>>;

/// Runs of liveness at least this long are applied on every core
/// ([`Records::apply_seen`]); a thread's start costs what about a hundred
/// entries do.
const SEEN_ON_THREADS: usize = 16_384;

/// What a `seen` entry does to its agent's record, one by one or on
/// threads: the one place that says so.
fn seen_as(agent: &mut Arc<NodeFacts>, last_seen: DateTime<Utc>, status: AgentStatus) {
    let agent = Arc::make_mut(agent);
    agent.last_seen = last_seen;
    agent.status = status;
}

/// Agents by id, in the order they were first seen (so that a listing of a
/// loaded registry is stable): what replay builds and the writer keeps.
///
/// The records sit in pages shared with the snapshot being written beside
/// the writer. Taking that view used to clone every record's pointer on the
/// writer thread, and every commit waited for it: 12 to 35 ms at 160,000 to
/// 440,000 agents, a stop of the whole registration path every snapshot
/// (issue 16, eleventh session). Now it copies one pointer per page.
///
/// Hashed with foldhash, as the registry's own map: the keys are ids the
/// router made, and every flush of heartbeats looks up each agent seen.
#[derive(Debug, Default)]
pub struct Records {
    /// Every record in first-seen order; a deleted one leaves a hole.
    pages: Vec<Arc<Page>>,
    /// Where each kept id's record sits: `pages[at / PAGE][at % PAGE]`.
    /// Sharded, as the registry's maps: every commit waits for the writer,
    /// and the writer for any insert that grows the map.
    places: crate::sharded::ShardedMap<Uuid, usize, foldhash::fast::RandomState>,
}

/// A frozen view of [`Records`]: what a snapshot writes while the writer
/// goes on committing.
#[derive(Debug, Clone)]
pub struct SharedRecords {
    pages: Vec<Arc<Page>>,
}

impl SharedRecords {
    /// A view of exactly these records, duplicates included: for tests of
    /// what a snapshot file holds when a hand edit repeated an id.
    #[cfg(test)]
    pub fn listed(agents: Vec<Arc<NodeFacts>>) -> Self {
        let pages = agents
            .chunks(PAGE)
            .map(|page| Arc::new(page.iter().cloned().map(Some).collect()))
            .collect();
        SharedRecords { pages }
    }

    /// The records in first-seen order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<NodeFacts>> {
        self.pages.iter().flat_map(|page| page.iter().flatten())
    }

    /// How many records the view holds (only tests ask).
    #[cfg(test)]
    pub fn count(&self) -> usize {
        self.iter().count()
    }
}

impl Records {
    /// Loading indexes each agent as it reads it (`files::LoadedRecords`);
    /// tests build records from a list.
    #[cfg(test)]
    pub fn from_loaded(agents: Vec<NodeFacts>) -> Self {
        let mut records = Records::default();
        for agent in agents {
            records.apply(Change::Upsert(Arc::new(agent)));
        }
        records
    }

    /// Room for `agents` without growing (a load knows how many).
    pub fn with_capacity(agents: usize) -> Self {
        Records {
            pages: Vec::with_capacity(agents.div_ceil(PAGE)),
            places: crate::sharded::ShardedMap::with_capacity(agents),
        }
    }

    /// The one meaning of a change.
    pub fn apply(&mut self, change: Change) {
        match change {
            Change::Upsert(agent) => match self.places.get(&agent.id) {
                Some(&at) => *self.place_mut(at) = Some(agent),
                None => {
                    let at = self.slots();
                    self.places.insert(agent.id, at);
                    self.push(agent);
                }
            },
            Change::Delete(id) => {
                if let Some(at) = self.places.remove(&id) {
                    *self.place_mut(at) = None;
                }
            }
            Change::Seen(seen) => {
                for Seen(id, last_seen, status) in seen {
                    // An agent deleted since it was seen stays deleted.
                    let Some(&at) = self.places.get(&id) else {
                        continue;
                    };
                    if let Some(agent) = self.place_mut(at) {
                        seen_as(agent, last_seen, status);
                    }
                }
            }
        }
        // Deletes leave holes: compact before they outnumber the records,
        // so that the pages never grow without end.
        if self.slots() > 2 * self.places.len() + 1024 {
            self.compact();
        }
    }

    /// Changes in order, each as [`Records::apply`] applies it, with each
    /// run of liveness changes in a row applied together
    /// ([`Records::apply_seen`]).
    pub fn apply_all(&mut self, changes: impl IntoIterator<Item = Change>) {
        let mut run = Vec::new();
        for change in changes {
            match change {
                Change::Seen(seen) => run.push(seen),
                other => {
                    self.apply_seen(std::mem::take(&mut run));
                    self.apply(other);
                }
            }
        }
        self.apply_seen(run);
    }

    /// Liveness changes in a row: the records [`Records::apply`] gives
    /// applying them one by one, with a long run's work shared by every
    /// core. Each entry costs two reads of memory no cache holds (where its
    /// record sits, then the record): about 380 ns, and a restart after a
    /// fleet's heartbeats replays several flushes of the whole fleet
    /// (300,000 entries took 128 ms; issue 16, twelfth session).
    ///
    /// Liveness moves no record, so first each thread looks up the places
    /// of a share of the entries; then the touched pages are dealt out to
    /// the threads, and each thread walks every entry in order and writes
    /// those on its pages. An agent seen twice is written by one thread,
    /// in order, so the later time stays, as one by one.
    pub fn apply_seen(&mut self, runs: Vec<Vec<Seen>>) {
        // Asking for the cores reads the cgroup's files: only a long run
        // asks (every commit of a registration comes through here).
        let threads = if runs.iter().map(Vec::len).sum::<usize>() < SEEN_ON_THREADS {
            1
        } else {
            super::files::load_threads()
        };
        self.apply_seen_on(runs, threads);
    }

    /// [`Records::apply_seen`] on `threads` threads.
    fn apply_seen_on(&mut self, runs: Vec<Vec<Seen>>, threads: usize) {
        let entries: Vec<&Seen> = runs.iter().flatten().collect();
        if entries.len() < SEEN_ON_THREADS || threads < 2 {
            for seen in runs {
                self.apply(Change::Seen(seen));
            }
            return;
        }
        let places = &self.places;
        let shares: Vec<&[&Seen]> = entries.chunks(entries.len().div_ceil(threads)).collect();
        let located: Vec<Option<usize>> = super::files::on_each_share(shares.len(), |share| {
            shares[share]
                .iter()
                .map(|Seen(id, ..)| places.get(id).copied())
                .collect::<Vec<_>>()
        })
        .into_iter()
        .flatten()
        .collect();
        // Only a touched page is made writable: one a snapshot still holds
        // is copied, as `place_mut` would.
        let mut touched = vec![false; self.pages.len()];
        for at in located.iter().flatten() {
            touched[at / PAGE] = true;
        }
        let mut dealt: Vec<Vec<Option<&mut Page>>> = (0..threads).map(|_| Vec::new()).collect();
        for (index, page) in self.pages.iter_mut().enumerate() {
            dealt[index % threads].push(touched[index].then(|| Arc::make_mut(page)));
        }
        // Each share's pages behind a lock of their own, so that a share
        // whose thread could not start is done on this one.
        let dealt: Vec<Mutex<Vec<Option<&mut Page>>>> = dealt.into_iter().map(Mutex::new).collect();
        super::files::on_each_share(threads, |share| {
            let mut pages = dealt[share].lock().unwrap_or_else(PoisonError::into_inner);
            for (Seen(_, last_seen, status), at) in entries.iter().zip(&located) {
                let Some(at) = *at else {
                    continue;
                };
                let (page, offset) = (at / PAGE, at % PAGE);
                if page % threads != share {
                    continue;
                }
                let record = pages[page / threads]
                    .as_mut()
                    .and_then(|page| page[offset].as_mut());
                if let Some(agent) = record {
                    seen_as(agent, *last_seen, *status);
                }
            }
        });
    }

    /// The records as they are now, shared (a frozen view for a snapshot
    /// written beside the writer). Copies one pointer per page.
    pub fn shared(&self) -> SharedRecords {
        SharedRecords {
            pages: self.pages.clone(),
        }
    }

    /// How many agents are kept.
    pub fn len(&self) -> usize {
        self.places.len()
    }

    pub fn is_empty(&self) -> bool {
        self.places.is_empty()
    }

    /// The records in first-seen order (the store hands them out with
    /// `shared`; tests read them here).
    #[cfg(test)]
    pub fn iter(&self) -> impl Iterator<Item = &NodeFacts> {
        self.pages
            .iter()
            .flat_map(|page| page.iter().flatten())
            .map(|agent| &**agent)
    }

    /// Places used, holes included.
    fn slots(&self) -> usize {
        self.pages
            .last()
            .map_or(0, |last| (self.pages.len() - 1) * PAGE + last.len())
    }

    /// The place `at`, for writing: its page is copied first if a snapshot
    /// still holds it.
    fn place_mut(&mut self, at: usize) -> &mut Option<Arc<NodeFacts>> {
        &mut Arc::make_mut(&mut self.pages[at / PAGE])[at % PAGE]
    }

    fn push(&mut self, agent: Arc<NodeFacts>) {
        match self.pages.last_mut() {
            Some(last) if last.len() < PAGE => Arc::make_mut(last).push(Some(agent)),
            _ => {
                let mut page = Vec::with_capacity(PAGE);
                page.push(Some(agent));
                self.pages.push(Arc::new(page));
            }
        }
    }

    fn compact(&mut self) {
        let kept: Vec<Arc<NodeFacts>> = self.shared().iter().cloned().collect();
        self.pages.clear();
        self.places.clear();
        for (at, agent) in kept.into_iter().enumerate() {
            self.places.insert(agent.id, at);
            self.push(agent);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(name: &str) -> StoredAgent<'_> {
        StoredAgent {
            id: Uuid::new_v4(),
            machine_name: name.into(),
            ip_address: IpAddr::from([127, 0, 0, 2]),
            port: 11434,
            runtime_version: "0.5.7".into(),
            status: AgentStatus::Online,
            registered_at: Utc::now(),
            last_seen: Utc::now(),
            system_info: StoredSystemInfo {
                os: "Linux".into(),
                arch: "x86_64".into(),
                cpu_cores: 8,
                total_memory: 1 << 34,
            },
            models: vec!["a".into(), "b".into()],
            backend: BackendKind::Ollama,
            tls: true,
            max_concurrency: Some(3),
            secret_hash: Some(TokenDigest::of(b"a secret").to_hex().into()),
        }
    }

    /// Agent number `n`, in the registry's own form.
    fn named(n: usize) -> NodeFacts {
        let mut agent = stored("x").into_facts();
        agent.machine_name = format!("gpu-{n}").into();
        agent
    }

    #[test]
    fn the_stored_form_round_trips_every_field_and_the_secrets_hash() {
        let agent = stored("gpu-1");
        let facts = agent.clone().into_facts();
        assert_eq!(StoredAgent::from(&facts), agent);
        assert_eq!(facts.secret_digest, Some(TokenDigest::of(b"a secret")));
        let line = serde_json::to_string(&Change::Upsert(Arc::new(facts))).expect("json");
        let Change::Upsert(back) = serde_json::from_str::<Change>(&line).expect("parses") else {
            panic!("an upsert: {line}");
        };
        assert_eq!(StoredAgent::from(&*back), agent);
    }

    #[test]
    fn a_journal_line_reads_in_any_field_order_and_names_what_it_lacks() {
        let id = Uuid::new_v4();
        let seen = format!(r#"{{"agents":[["{id}",1700000000123,"Offline"]],"op":"seen"}}"#);
        let Change::Seen(agents) = serde_json::from_str::<Change>(&seen).expect("parses") else {
            panic!("a seen line: {seen}");
        };
        assert_eq!(agents.len(), 1);
        assert_eq!((agents[0].0, agents[0].2), (id, AgentStatus::Offline));
        assert_eq!(agents[0].1.timestamp_millis(), 1_700_000_000_123);
        let delete = format!(r#"{{"id":"{id}","op":"delete"}}"#);
        assert!(matches!(
            serde_json::from_str::<Change>(&delete),
            Ok(Change::Delete(deleted)) if deleted == id
        ));
        let error = serde_json::from_str::<Change>(r#"{"op":"delete"}"#).expect_err("no id");
        assert!(error.to_string().contains("missing field `id`"), "{error}");
        assert!(serde_json::from_str::<Change>(r#"{"op":"rename"}"#).is_err());
    }

    #[test]
    fn a_hand_edited_address_that_does_not_parse_loads_unroutable() {
        let mut json = serde_json::to_value(stored("gpu-2")).expect("json");
        json["ip_address"] = serde_json::json!("not an address");
        let agent = StoredAgent::deserialize(&json).expect("still loads");
        assert!(agent.ip_address.is_unspecified());
    }

    #[test]
    fn replay_and_commit_share_one_meaning_of_each_change() {
        let (first, second) = (stored("a"), stored("b"));
        let mut records = Records::from_loaded(vec![first.clone().into_facts()]);
        records.apply(Change::Upsert(Arc::new(second.clone().into_facts())));
        let later = Utc::now() + chrono::Duration::seconds(5);
        records.apply(Change::Seen(vec![
            Seen(first.id, later, AgentStatus::Offline),
            Seen(Uuid::new_v4(), later, AgentStatus::Online),
        ]));
        records.apply(Change::Delete(second.id));
        records.apply(Change::Seen(vec![Seen(
            second.id,
            later,
            AgentStatus::Online,
        )]));
        let left: Vec<_> = records.iter().collect();
        assert_eq!(left.len(), 1, "the deleted one stays deleted");
        assert_eq!(left[0].status, AgentStatus::Offline);
        assert_eq!(
            left[0].last_seen.timestamp_millis(),
            later.timestamp_millis()
        );
    }

    #[test]
    fn a_shared_view_stays_as_it_was_while_changes_land_on_every_page() {
        let mut records = Records::from_loaded((0..2 * PAGE + 10).map(named).collect());
        let ids: Vec<Uuid> = records.iter().map(|agent| agent.id).collect();
        let view = records.shared();

        // A change on the first page, a deletion on the second, a sign of
        // life on the third, and a new record after the last.
        let mut renamed = named(0);
        renamed.id = ids[0];
        renamed.machine_name = "renamed".into();
        records.apply(Change::Upsert(Arc::new(renamed)));
        records.apply(Change::Delete(ids[PAGE + 1]));
        let later = Utc::now() + chrono::Duration::seconds(5);
        records.apply(Change::Seen(vec![Seen(
            ids[2 * PAGE + 3],
            later,
            AgentStatus::Offline,
        )]));
        records.apply(Change::Upsert(Arc::new(named(99_999))));

        let frozen: Vec<&Arc<NodeFacts>> = view.iter().collect();
        assert_eq!((view.count(), frozen.len()), (2 * PAGE + 10, 2 * PAGE + 10));
        assert_eq!(&*frozen[0].machine_name, "gpu-0");
        assert_eq!(frozen[PAGE + 1].id, ids[PAGE + 1]);
        assert_eq!(frozen[2 * PAGE + 3].status, AgentStatus::Online);

        let now: Vec<&NodeFacts> = records.iter().collect();
        assert_eq!(now.len(), 2 * PAGE + 10);
        assert_eq!(&*now[0].machine_name, "renamed");
        assert!(now.iter().all(|agent| agent.id != ids[PAGE + 1]));
        assert_eq!(now[2 * PAGE + 2].status, AgentStatus::Offline);
        assert_eq!(&*now[2 * PAGE + 9].machine_name, "gpu-99999");
    }

    #[test]
    fn liveness_applied_on_threads_is_liveness_applied_one_by_one() {
        let agents: Vec<NodeFacts> = (0..4 * PAGE + 77).map(named).collect();
        let ids: Vec<Uuid> = agents.iter().map(|agent| agent.id).collect();
        let mut one_by_one = Records::from_loaded(agents.clone());
        let mut on_threads = Records::from_loaded(agents);
        // Holes, so that places are not simply the order of the ids.
        for id in ids.iter().step_by(5) {
            one_by_one.apply(Change::Delete(*id));
            on_threads.apply(Change::Delete(*id));
        }
        let view = on_threads.shared();

        // Two flushes of the whole fleet, the second with other times and
        // statuses for some, in an order unlike the records'; an agent
        // seen twice in one flush; an agent deleted; one never known.
        let base = Utc::now();
        let at = |seconds: i64| base + chrono::Duration::seconds(seconds);
        let mut first: Vec<Seen> = ids
            .iter()
            .map(|id| Seen(*id, at(1), AgentStatus::Online))
            .collect();
        first.push(Seen(ids[3], at(9), AgentStatus::Offline));
        first.push(Seen(Uuid::new_v4(), at(1), AgentStatus::Online));
        let second: Vec<Seen> = ids
            .iter()
            .enumerate()
            .rev()
            .filter(|(n, _)| n % 3 == 0)
            .map(|(n, id)| Seen(*id, at(2 + n as i64), AgentStatus::Offline))
            .collect();
        let mut third = vec![Seen(ids[6], at(-1), AgentStatus::Online)];
        third.push(Seen(ids[6], at(50), AgentStatus::Offline));
        let runs = vec![first, second, third];
        assert!(runs.iter().map(Vec::len).sum::<usize>() >= SEEN_ON_THREADS);

        for seen in runs.clone() {
            one_by_one.apply(Change::Seen(seen));
        }
        // Three threads: pages dealt unevenly, the last one part-full.
        on_threads.apply_seen_on(runs, 3);

        let liveness = |records: &Records| -> Vec<(Uuid, i64, AgentStatus)> {
            records
                .iter()
                .map(|agent| (agent.id, agent.last_seen.timestamp_millis(), agent.status))
                .collect()
        };
        assert_eq!(liveness(&on_threads), liveness(&one_by_one));
        let last = liveness(&on_threads);
        assert_eq!(last.len(), 4 * PAGE + 77 - (4 * PAGE + 77).div_ceil(5));
        let sixth = last.iter().find(|(id, ..)| *id == ids[6]).expect("kept");
        assert_eq!(
            (sixth.1, sixth.2),
            (at(50).timestamp_millis(), AgentStatus::Offline)
        );
        // The view taken before is as it was.
        assert!(view.iter().all(|agent| agent.last_seen < at(1)));
    }

    #[test]
    fn deletions_are_compacted_away_and_the_order_is_kept() {
        let mut records = Records::default();
        let mut ids = Vec::new();
        for n in 0..5_000 {
            let mut agent = stored("x").into_facts();
            agent.machine_name = format!("gpu-{n}").into();
            ids.push(agent.id);
            records.apply(Change::Upsert(Arc::new(agent)));
        }
        // Delete all but every tenth: holes then outnumber the records.
        for (n, id) in ids.iter().enumerate() {
            if n % 10 != 0 {
                records.apply(Change::Delete(*id));
            }
        }
        assert_eq!(records.len(), 500);
        assert!(
            records.slots() <= 2 * 500 + 1024,
            "{} places",
            records.slots()
        );
        let names: Vec<String> = records
            .iter()
            .map(|agent| agent.machine_name.to_string())
            .collect();
        let expected: Vec<String> = (0..5_000).step_by(10).map(|n| format!("gpu-{n}")).collect();
        assert_eq!(names, expected);
        // After compaction each id still finds its own record.
        let later = Utc::now() + chrono::Duration::seconds(5);
        records.apply(Change::Seen(vec![Seen(
            ids[4_990],
            later,
            AgentStatus::Offline,
        )]));
        let last = records.iter().last().expect("a record");
        assert_eq!((last.id, last.status), (ids[4_990], AgentStatus::Offline));
    }
}
