//! The data files themselves: loading with the corrupt-file policy, journal
//! appends, journal rotation, atomic snapshots. Only the writer thread
//! calls into this after start-up, but for [`write_snapshot`], which runs
//! on a thread of its own from a frozen view.
//!
//! The journal is `agents.journal` and, while a snapshot is being written,
//! the closed segments it was rotated out to (`agents.journal.<n>`): the
//! snapshot holds everything up to the rotation, and the segments it covers
//! are deleted only once it is in place. Loading replays the segments in
//! order, then the live journal, over the snapshot; replaying changes the
//! snapshot already holds is harmless (each sets whole values).

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::AgentStatus;
use uuid::Uuid;

use crate::record::{NodeFacts, RecentlyInterned};

use super::{Change, Records, SharedRecords, StoreError, StoredAgent};

const SNAPSHOT_FILE: &str = "agents.json";
const BACKUP_FILE: &str = "agents.json.bak";
const JOURNAL_FILE: &str = "agents.journal";
const SNAPSHOT_TEMP: &str = "agents.json.tmp";
const BACKUP_TEMP: &str = "agents.json.bak.tmp";
/// Locked by the router that uses the dir, for its whole life; holds its PID.
pub const LOCK_FILE: &str = "llm-router.lock";

/// What loading found, for the log and for tests.
#[derive(Debug, Default, Clone)]
pub struct LoadReport {
    /// The file the agents came from, if any.
    pub loaded_from: Option<PathBuf>,
    /// Where a snapshot that did not parse was moved, byte for byte.
    pub corrupt_moved_to: Option<PathBuf>,
    /// Journal records replayed over the snapshot.
    pub journal_replayed: usize,
    /// Journal lines that did not parse and were skipped (a torn tail after a
    /// crash, or a write that failed and was never acknowledged).
    pub journal_skipped: usize,
}

impl LoadReport {
    /// A fresh snapshot is due when loading had to repair or replay anything.
    pub fn needs_snapshot(&self) -> bool {
        self.corrupt_moved_to.is_some() || self.journal_replayed > 0 || self.journal_skipped > 0
    }
}

pub struct DataFiles {
    dir: PathBuf,
    /// The dir's lock, held while this value lives (the writer thread's
    /// life); the kernel releases it if the process dies.
    _lock: File,
    journal: File,
    journal_len: u64,
    journal_records: usize,
    /// Closed journal segments no snapshot covers yet, oldest first.
    closed: Vec<(u64, PathBuf)>,
    next_segment: u64,
}

impl DataFiles {
    /// Opens (creating if need be) the data dir, loads the snapshot, replays
    /// the journal. A dir that cannot be created, read or written is an error:
    /// the router must not run on a silently empty registry.
    pub fn open(dir: &Path) -> Result<(Self, Records, LoadReport), StoreError> {
        let dir_error = |source| StoreError::DataDir {
            path: dir.to_path_buf(),
            source,
        };
        if dir.exists() && !dir.is_dir() {
            return Err(StoreError::DataDirIsFile {
                path: dir.to_path_buf(),
            });
        }
        fs::create_dir_all(dir).map_err(dir_error)?;
        let lock = lock_dir(dir)?;
        let mut report = LoadReport::default();
        let mut agents = load_snapshot(dir, &mut report).map_err(dir_error)?;
        let closed = closed_segments(dir).map_err(dir_error)?;
        for (_, segment) in &closed {
            let bytes = fs::read(segment).map_err(dir_error)?;
            replay_journal(&bytes, &mut agents, &mut report);
        }
        let next_segment = closed.last().map_or(1, |(n, _)| n + 1);

        let journal_path = dir.join(JOURNAL_FILE);
        let journal = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(&journal_path)
            .map_err(dir_error)?;
        let journal_bytes = fs::read(&journal_path).map_err(dir_error)?;
        replay_journal(&journal_bytes, &mut agents, &mut report);
        // Prove the dir is writable now rather than at the first registration.
        let probe = dir.join(".write-probe");
        File::create(&probe)
            .and_then(|mut file| file.write_all(b"ok"))
            .and_then(|()| fs::remove_file(&probe))
            .map_err(dir_error)?;

        let files = DataFiles {
            dir: dir.to_path_buf(),
            _lock: lock,
            journal,
            journal_len: journal_bytes.len() as u64,
            journal_records: report.journal_replayed,
            closed,
            next_segment,
        };
        Ok((files, agents, report))
    }

    pub fn journal_records(&self) -> usize {
        self.journal_records
    }

    pub fn journal_bytes(&self) -> u64 {
        self.journal_len
    }

    /// The size of `agents.json` as it is (0 when there is none yet).
    pub fn snapshot_bytes(&self) -> u64 {
        fs::metadata(self.dir.join(SNAPSHOT_FILE)).map_or(0, |metadata| metadata.len())
    }

    /// Appends the changes in one write and one fsync. On failure the journal
    /// is cut back to its previous length, so nothing is half-written.
    pub fn append(&mut self, changes: &[Change]) -> Result<(), StoreError> {
        let mut buffer = Vec::with_capacity(changes.len() * 512);
        for change in changes {
            match change {
                Change::Seen(agents) => write_seen_line(&mut buffer, agents),
                // Serializing our own types cannot fail; skip defensively if it does.
                change => {
                    if serde_json::to_writer(&mut buffer, change).is_err() {
                        continue;
                    }
                }
            }
            buffer.push(b'\n');
        }
        let result = self
            .journal
            .write_all(&buffer)
            .and_then(|()| self.journal.sync_data());
        match result {
            Ok(()) => {
                self.journal_len += buffer.len() as u64;
                self.journal_records += changes.len();
                Ok(())
            }
            Err(error) => {
                let _ = self.journal.set_len(self.journal_len);
                Err(StoreError::Journal(error))
            }
        }
    }

    /// Whether closed segments wait for a snapshot to cover them.
    pub fn has_closed_segments(&self) -> bool {
        !self.closed.is_empty()
    }

    /// Closes the live journal as the next segment and starts an empty one.
    /// Returns every closed segment: a snapshot of the records as they are
    /// now covers them all. The new journal's directory entry is made
    /// durable before anything is appended to it.
    pub fn rotate(&mut self) -> Result<Vec<PathBuf>, StoreError> {
        let live = self.dir.join(JOURNAL_FILE);
        let segment = self
            .dir
            .join(format!("{JOURNAL_FILE}.{}", self.next_segment));
        fs::rename(&live, &segment).map_err(StoreError::Journal)?;
        let opened = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(&live);
        let journal = match opened {
            Ok(journal) => journal,
            Err(error) => {
                // Appends would go on into the segment a snapshot is about
                // to cover and delete: put it back as the live journal.
                let _ = fs::rename(&segment, &live);
                return Err(StoreError::Journal(error));
            }
        };
        self.journal = journal;
        self.closed.push((self.next_segment, segment));
        self.next_segment += 1;
        sync_dir(&self.dir).map_err(StoreError::Journal)?;
        self.journal_len = 0;
        self.journal_records = 0;
        Ok(self.closed.iter().map(|(_, path)| path.clone()).collect())
    }

    /// A snapshot is in place and its covered segments are gone.
    pub fn forget_segments(&mut self, covered: &[PathBuf]) {
        self.closed.retain(|(_, path)| !covered.contains(path));
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// Writes `agents.json` atomically from a frozen view of the records (oldest
/// registration first), keeps the previous one as `.bak`, then deletes the
/// journal segments the new one covers. Runs beside the writer: commits go
/// on into the live journal meanwhile.
pub fn write_snapshot(
    dir: &Path,
    agents: SharedRecords,
    covered: &[PathBuf],
) -> Result<(), StoreError> {
    let mut agents: Vec<&NodeFacts> = agents.iter().map(|agent| &**agent).collect();
    agents.sort_by(|a, b| a.registered_at.cmp(&b.registered_at).then(a.id.cmp(&b.id)));
    let snapshot = dir.join(SNAPSHOT_FILE);
    let temp = dir.join(SNAPSHOT_TEMP);
    // Streamed one agent at a time: a large fleet's snapshot is never
    // held whole in memory.
    let write_temp = || -> std::io::Result<()> {
        let mut file = std::io::BufWriter::with_capacity(1 << 20, File::create(&temp)?);
        serde_json::to_writer_pretty(&mut file, &StoredAgents(&agents))?;
        file.write_all(b"\n")?;
        file.into_inner()
            .map_err(|error| error.into_error())?
            .sync_all()
    };
    if let Err(error) = write_temp() {
        let _ = fs::remove_file(&temp);
        return Err(StoreError::Snapshot(error));
    }
    // Keep the previous good snapshot: link it to the backup name first,
    // so that `agents.json` itself is never missing, not even for a moment.
    if snapshot.exists() {
        let backup_temp = dir.join(BACKUP_TEMP);
        let _ = fs::remove_file(&backup_temp);
        fs::hard_link(&snapshot, &backup_temp)
            .and_then(|()| fs::rename(&backup_temp, dir.join(BACKUP_FILE)))
            .map_err(StoreError::Snapshot)?;
    }
    fs::rename(&temp, &snapshot).map_err(StoreError::Snapshot)?;
    sync_dir(dir).map_err(StoreError::Snapshot)?;
    // The snapshot holds everything the segments did. Were a deletion to
    // fail, replaying them over the new snapshot is harmless.
    for segment in covered {
        let _ = fs::remove_file(segment);
    }
    sync_dir(dir).map_err(StoreError::Snapshot)?;
    Ok(())
}

/// The journal's closed segments in the data dir, oldest first.
fn closed_segments(dir: &Path) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let prefix = format!("{JOURNAL_FILE}.");
    let mut segments: Vec<(u64, PathBuf)> = fs::read_dir(dir)?
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            let number = name.strip_prefix(&prefix)?.parse::<u64>().ok()?;
            Some((number, entry.path()))
        })
        .collect();
    segments.sort();
    Ok(segments)
}

/// Takes the data dir's lock, so that no second router ever appends to the
/// same journal or overwrites the same snapshot. It is an advisory `flock`
/// on a file of its own: the kernel releases it when the holder exits or is
/// killed, so a crash never leaves a stale lock behind. The file holds the
/// holder's PID, for the message a second router prints.
fn lock_dir(dir: &Path) -> Result<File, StoreError> {
    let path = dir.join(LOCK_FILE);
    let dir_error = |source| StoreError::DataDir {
        path: dir.to_path_buf(),
        source,
    };
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(dir_error)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(fs::TryLockError::WouldBlock) => {
            let holder = fs::read_to_string(&path)
                .ok()
                .and_then(|text| text.trim().parse::<u32>().ok());
            return Err(StoreError::DataDirInUse {
                path: dir.to_path_buf(),
                holder,
            });
        }
        Err(fs::TryLockError::Error(error)) => return Err(dir_error(error)),
    }
    file.set_len(0)
        .and_then(|()| writeln!(file, "{}", std::process::id()))
        .map_err(dir_error)?;
    Ok(file)
}

/// The snapshot's array, each agent converted to its stored form as it is
/// written.
struct StoredAgents<'a>(&'a [&'a NodeFacts]);

impl serde::Serialize for StoredAgents<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.0.iter().map(|facts| StoredAgent::from(*facts)))
    }
}

/// The snapshot's array read one agent at a time, each made compact as it
/// is read, so that a large fleet never exists in memory as a list of wire
/// records.
struct LoadedAgents(Vec<Arc<NodeFacts>>);

impl<'de> serde::Deserialize<'de> for LoadedAgents {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = LoadedAgents;
            fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
                formatter.write_str("an array of agents")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<LoadedAgents, A::Error> {
                let mut agents = Vec::with_capacity(seq.size_hint().unwrap_or(0));
                let mut recent = RecentlyInterned::default();
                while let Some(agent) = seq.next_element::<StoredAgent>()? {
                    agents.push(Arc::new(agent.into_facts_with(&mut recent)));
                }
                Ok(LoadedAgents(agents))
            }
        }
        deserializer.deserialize_seq(Visitor)
    }
}

/// A `seen` line, byte for byte as serde_json writes `Change::Seen`, at a
/// fifth of its cost: serde_json escapes every string it writes, and a line
/// holds three per agent. A flush of 100,000 agents' liveness took 24 to
/// 38 ms to serialize, on the writer, with that batch's commits waiting
/// (issue 16, twelfth session). Ids, numbers and status names never need
/// escaping; the status names are still serde's, written once a line.
fn write_seen_line(buffer: &mut Vec<u8>, agents: &[super::Seen]) {
    let name = |status: AgentStatus| serde_json::to_vec(&status).unwrap_or_default();
    let (online, offline) = (name(AgentStatus::Online), name(AgentStatus::Offline));
    let mut id_text = Uuid::encode_buffer();
    let mut millis_text = itoa::Buffer::new();
    buffer.reserve(agents.len() * 64 + 32);
    buffer.extend_from_slice(br#"{"op":"seen","agents":["#);
    for (n, super::Seen(id, last_seen, status)) in agents.iter().enumerate() {
        if n > 0 {
            buffer.push(b',');
        }
        buffer.extend_from_slice(b"[\"");
        buffer.extend_from_slice(id.hyphenated().encode_lower(&mut id_text).as_bytes());
        buffer.extend_from_slice(b"\",");
        buffer.extend_from_slice(millis_text.format(last_seen.timestamp_millis()).as_bytes());
        buffer.push(b',');
        buffer.extend_from_slice(match status {
            AgentStatus::Online => &online,
            AgentStatus::Offline => &offline,
        });
        buffer.push(b']');
    }
    buffer.extend_from_slice(b"]}");
}

/// A file smaller than this (snapshot or journal) is read on one thread:
/// a thread's start would cost more than it saves.
const PART_BYTES: usize = 4 << 20;
/// At most this many threads read one file.
const MOST_PARTS: usize = 8;
/// Where one agent ends and the next begins in the file the router writes
/// (`to_writer_pretty`, two spaces a level). A JSON string cannot hold a
/// raw newline, so these bytes are whitespace and punctuation between
/// values, and `},` at this indent closes an element of the top-level array
/// in any file the router wrote. In a file indented otherwise by hand, a
/// match could be inside an agent: then a part does not parse (its braces
/// do not balance), and the file is read whole instead.
const AGENT_BOUNDARY: &[u8] = b"\n  },\n  {";

/// The snapshot's agents, in the file's order. Parsing is the start-up's
/// largest cost (11,600 instructions an agent), so a large file is split
/// at agent boundaries and its parts parsed on as many threads as there are
/// cores: each boundary's `,` becomes the `]` that ends one part and the
/// newline after it the `[` that begins the next, in place, so that each
/// part is an array of its own and nothing is copied. If a part does not
/// parse, the two bytes are put back and the file is parsed whole, which
/// gives the same records or the error that names the right position.
fn parse_snapshot(bytes: Vec<u8>) -> Result<Records, serde_json::Error> {
    let parts = parts_for(bytes.len());
    parse_snapshot_in(bytes, parts)
}

/// How many parts a file of `bytes` is read in: one per core, at most
/// [`MOST_PARTS`], none under [`PART_BYTES`] (at least one).
fn parts_for(bytes: usize) -> usize {
    load_threads().min(bytes / PART_BYTES).max(1)
}

/// How many threads a large load's work is shared by: one per core, at
/// most [`MOST_PARTS`].
pub(crate) fn load_threads() -> usize {
    std::thread::available_parallelism()
        .map_or(1, std::num::NonZeroUsize::get)
        .min(MOST_PARTS)
}

/// [`parse_snapshot`] in at most `parts` parts.
fn parse_snapshot_in(mut bytes: Vec<u8>, parts: usize) -> Result<Records, serde_json::Error> {
    let agents = match parse_agents_in_parts(&mut bytes, parts) {
        Some(agents) => agents,
        None => parse_json::<LoadedAgents>(&bytes)?.0,
    };
    let mut records = Records::with_capacity(agents.len());
    for agent in agents {
        records.apply(Change::Upsert(agent));
    }
    Ok(records)
}

/// The agents of a file in the router's layout, its parts parsed on
/// threads of their own (the first on this one); `None`, with the bytes as
/// they were, when the file has no agent boundary or a part does not parse.
fn parse_agents_in_parts(bytes: &mut [u8], parts: usize) -> Option<Vec<Arc<NodeFacts>>> {
    let cuts = agent_cuts(bytes, parts);
    if cuts.is_empty() {
        return None;
    }
    let mark = |bytes: &mut [u8], (end, begin): (u8, u8)| {
        for &cut in &cuts {
            bytes[cut - 1] = end;
            bytes[cut] = begin;
        }
    };
    mark(bytes, (b']', b'['));
    let parsed = on_each_part(&parts_between(bytes, &cuts), |part| {
        parse_json::<LoadedAgents>(part).ok().map(|loaded| loaded.0)
    });
    let agents = parsed.into_iter().try_fold(Vec::new(), |mut agents, part| {
        agents.extend(part?);
        Some(agents)
    });
    if agents.is_none() {
        mark(bytes, (b',', b'\n'));
    }
    agents
}

/// Where a snapshot in the router's layout is cut: on the newline just
/// after a boundary's `,` (its fifth byte, after a newline, two spaces and
/// the brace).
fn agent_cuts(bytes: &[u8], parts: usize) -> Vec<usize> {
    let finder = memchr::memmem::Finder::new(AGENT_BOUNDARY);
    cuts_into_parts(bytes, parts, |rest| {
        finder.find(rest).map(|found| found + 5)
    })
}

/// Where a file is cut into at most `parts` parts of about equal size: for
/// each share after the first, the first cut `next_cut` finds at or past
/// its start (an offset into the bytes it is given). A part ends just
/// before its cut and the next begins on it. Fewer cuts when no more are
/// found; none when the file is too small or has no place to cut.
fn cuts_into_parts(
    bytes: &[u8],
    parts: usize,
    next_cut: impl Fn(&[u8]) -> Option<usize>,
) -> Vec<usize> {
    let mut cuts: Vec<usize> = Vec::with_capacity(parts.saturating_sub(1));
    for part in 1..parts {
        let from = (bytes.len() / parts * part).max(cuts.last().copied().unwrap_or(0));
        match next_cut(&bytes[from..]) {
            Some(offset) if from + offset < bytes.len() => cuts.push(from + offset),
            _ => break,
        }
    }
    cuts
}

/// The bytes between the cuts, in order.
fn parts_between<'a>(bytes: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
    let mut parts = Vec::with_capacity(cuts.len() + 1);
    let mut start = 0;
    for &cut in cuts {
        parts.push(&bytes[start..cut]);
        start = cut;
    }
    parts.push(&bytes[start..]);
    parts
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Reads `agents.json`. One that does not parse is moved aside byte for byte
/// and `.bak` is used instead (or nothing), as the log says.
fn load_snapshot(dir: &Path, report: &mut LoadReport) -> std::io::Result<Records> {
    let snapshot = dir.join(SNAPSHOT_FILE);
    let backup = dir.join(BACKUP_FILE);
    match read_agents(&snapshot)? {
        Some(Ok(agents)) => {
            report.loaded_from = Some(snapshot);
            return Ok(agents);
        }
        Some(Err(parse_error)) => {
            let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%S%.3fZ");
            let aside = dir.join(format!("{SNAPSHOT_FILE}.corrupt-{stamp}"));
            fs::rename(&snapshot, &aside)?;
            tracing::error!(
                file = %snapshot.display(),
                moved_to = %aside.display(),
                error = %parse_error,
                "The registry file does not parse; it was moved aside and the backup is used."
            );
            report.corrupt_moved_to = Some(aside);
        }
        None => {}
    }
    match read_agents(&backup)? {
        Some(Ok(agents)) => {
            tracing::warn!(file = %backup.display(), agents = agents.len(), "Loaded the registry from the backup file.");
            report.loaded_from = Some(backup);
            Ok(agents)
        }
        Some(Err(parse_error)) => {
            tracing::error!(file = %backup.display(), error = %parse_error, "The backup file does not parse either; starting from the journal alone.");
            Ok(Records::default())
        }
        None => {
            if report.corrupt_moved_to.is_some() {
                tracing::error!("No backup file; starting from the journal alone.");
            }
            Ok(Records::default())
        }
    }
}

/// `None` when the file does not exist; an I/O error other than that is the
/// caller's (a data dir it cannot read).
fn read_agents(path: &Path) -> std::io::Result<Option<Result<Records, serde_json::Error>>> {
    match fs::read(path) {
        Ok(bytes) => Ok(Some(parse_snapshot(bytes))),
        Err(error) if error.kind() == ErrorKind::NotFound => Ok(None),
        Err(error) => Err(error),
    }
}

/// JSON checked as UTF-8 in one pass first, so that the parser need not
/// check it string by string (a seventh of a large fleet's load); bytes that
/// are not UTF-8 are parsed as they are, for the error's position.
fn parse_json<'a, T: serde::Deserialize<'a>>(bytes: &'a [u8]) -> serde_json::Result<T> {
    match std::str::from_utf8(bytes) {
        Ok(text) => serde_json::from_str(text),
        Err(_) => serde_json::from_slice(bytes),
    }
}

fn replay_journal(bytes: &[u8], agents: &mut Records, report: &mut LoadReport) {
    let changes = parse_journal_in(bytes, parts_for(bytes.len()))
        .into_iter()
        .filter_map(|change| match change {
            Ok(change) => {
                report.journal_replayed += 1;
                Some(change)
            }
            Err(error) => {
                // Only a write that was never acknowledged can be torn.
                tracing::warn!(%error, "Skipped a journal line that does not parse.");
                report.journal_skipped += 1;
                None
            }
        });
    agents.apply_all(changes);
    if report.journal_replayed > 0 {
        tracing::info!(records = report.journal_replayed, "Replayed the journal.");
    }
}

/// Each line of a journal parsed, in order (blank lines left out). Its
/// lines are independent until they are applied, so a large journal (a
/// `seen` line of 100,000 heartbeats takes 140 M instructions) is cut at
/// newlines into `parts` runs of lines, each parsed on a thread of its own.
fn parse_journal_in(bytes: &[u8], parts: usize) -> Vec<serde_json::Result<Change>> {
    let parse_lines = |run: &[u8]| -> Vec<serde_json::Result<Change>> {
        run.split(|byte| *byte == b'\n')
            .filter(|line| !line.iter().all(u8::is_ascii_whitespace))
            .map(parse_json::<Change>)
            .collect()
    };
    // A cut is just after a newline: each run but the last ends in one.
    let cuts = cuts_into_parts(bytes, parts, |rest| {
        memchr::memchr(b'\n', rest).map(|newline| newline + 1)
    });
    on_each_part(&parts_between(bytes, &cuts), parse_lines)
        .into_iter()
        .flatten()
        .collect()
}

/// `work` done on each part, the results in the parts' order (see
/// [`on_each_share`]).
fn on_each_part<'a, T: Send>(parts: &[&'a [u8]], work: impl Fn(&'a [u8]) -> T + Sync) -> Vec<T> {
    on_each_share(parts.len(), |share| work(parts[share]))
}

/// `work(share)` for each share in `0..shares`, the results in that order:
/// the first on this thread, each other on a load thread of its own. A
/// share whose thread could not be started, or failed (a parse does not
/// panic on bad input), is done here.
pub(crate) fn on_each_share<T: Send>(shares: usize, work: impl Fn(usize) -> T + Sync) -> Vec<T> {
    if shares == 0 {
        return Vec::new();
    }
    let work = &work;
    std::thread::scope(|scope| {
        let others: Vec<_> = (1..shares)
            .map(|share| (share, spawn_loader(scope, move || work(share))))
            .collect();
        let mut done = vec![work(0)];
        done.extend(others.into_iter().map(|(share, other)| {
            other
                .and_then(|other| other.join().ok())
                .unwrap_or_else(|| work(share))
        }));
        done
    })
}

/// A thread of the load (or of the writer's long runs of liveness, which
/// share its work the same way), or `None` when the system cannot start
/// one (a thread limit): the caller then does the work itself rather than
/// fail.
pub(crate) fn spawn_loader<'scope, T: Send + 'scope>(
    scope: &'scope std::thread::Scope<'scope, '_>,
    work: impl FnOnce() -> T + Send + 'scope,
) -> Option<std::thread::ScopedJoinHandle<'scope, T>> {
    std::thread::Builder::new()
        .name("load".into())
        .spawn_scoped(scope, work)
        .ok()
}

#[cfg(test)]
mod tests {

    use super::*;
    use crate::record::Registration;

    fn facts(name: &str) -> NodeFacts {
        let registration = Registration::for_test(name, 11434);
        NodeFacts::registered(uuid::Uuid::new_v4(), &registration, chrono::Utc::now())
    }

    /// The journal's `seen` line, written without serde, is serde's own
    /// line byte for byte: old and new journals read the same.
    #[test]
    fn a_seen_line_is_written_as_serde_writes_it() {
        use super::super::Seen;
        use chrono::TimeZone;
        let at = |millis: i64| {
            chrono::Utc
                .timestamp_millis_opt(millis)
                .single()
                .expect("a time")
        };
        let lists = [
            vec![],
            vec![Seen(
                Uuid::new_v4(),
                at(1_764_000_000_123),
                AgentStatus::Online,
            )],
            vec![
                Seen(Uuid::nil(), at(0), AgentStatus::Offline),
                Seen(Uuid::max(), at(-86_400_001), AgentStatus::Online),
                Seen(
                    Uuid::new_v4(),
                    at(253_402_300_799_999),
                    AgentStatus::Offline,
                ),
            ],
        ];
        for agents in lists {
            let mut written = Vec::new();
            write_seen_line(&mut written, &agents);
            let by_serde = serde_json::to_vec(&Change::Seen(agents.clone())).expect("json");
            assert_eq!(
                String::from_utf8_lossy(&written),
                String::from_utf8_lossy(&by_serde)
            );
            let Change::Seen(back) = serde_json::from_slice::<Change>(&written).expect("parses")
            else {
                panic!("a seen line");
            };
            assert_eq!(back, agents);
        }
    }

    /// Every stored field of every record, in the records' order.
    fn stored_text(records: &Records) -> Vec<String> {
        records
            .iter()
            .map(|facts| serde_json::to_string(&StoredAgent::from(facts)).expect("json"))
            .collect()
    }

    /// The parse in parts, against the same bytes parsed whole: the same
    /// records in the same order, or the same error.
    fn parses_as_whole(bytes: &[u8], parts: usize) {
        let whole = parse_snapshot_in(bytes.to_vec(), 1);
        let in_parts = parse_snapshot_in(bytes.to_vec(), parts);
        match (whole, in_parts) {
            (Ok(whole), Ok(in_parts)) => {
                assert_eq!(stored_text(&whole), stored_text(&in_parts), "{parts} parts");
            }
            (Err(whole), Err(in_parts)) => {
                assert_eq!(whole.to_string(), in_parts.to_string(), "{parts} parts");
            }
            (whole, in_parts) => panic!(
                "{parts} parts: whole {:?}, in parts {:?}",
                whole.map(|r| r.len()),
                in_parts.map(|r| r.len())
            ),
        }
    }

    /// A snapshot as the router writes it, read in 2 to 7 parts (each
    /// boundary a place where one agent ends), gives what one parse gives:
    /// every agent, in order, an id that appears twice kept once, at its
    /// first place, with its later record.
    #[test]
    fn a_snapshot_read_in_parts_reads_as_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut agents: Vec<Arc<NodeFacts>> = (0..40)
            .map(|n| Arc::new(facts(&format!("node-{n}"))))
            .collect();
        let mut again = (*agents[3]).clone();
        again.machine_name = "node-3-renamed".into();
        agents.push(Arc::new(again));
        write_snapshot(dir.path(), SharedRecords::listed(agents), &[]).expect("snapshot");
        let bytes = fs::read(dir.path().join(SNAPSHOT_FILE)).expect("read");
        for parts in 2..=7 {
            assert_eq!(agent_cuts(&bytes, parts).len(), parts - 1);
            let mut split = bytes.clone();
            let agents =
                parse_agents_in_parts(&mut split, parts).expect("each part parses on its own");
            assert_eq!(agents.len(), 41);
            parses_as_whole(&bytes, parts);
        }
        let records = parse_snapshot_in(bytes, 5).expect("parse");
        assert_eq!(records.len(), 40);
        let names: Vec<String> = records.iter().map(|f| f.machine_name.to_string()).collect();
        assert_eq!(names[3], "node-3-renamed", "{names:?}");
        assert_eq!(names[4], "node-4");
    }

    /// Files the router did not write: compact, indented otherwise, with
    /// the boundary's bytes inside an agent (an unknown field holding
    /// objects), torn, or not UTF-8. Each reads as a single parse reads it,
    /// records or error alike.
    #[test]
    fn a_file_laid_out_otherwise_reads_as_one() {
        let facts: Vec<NodeFacts> = (0..12).map(|n| facts(&format!("node-{n}"))).collect();
        let agents: Vec<StoredAgent> = facts.iter().map(StoredAgent::from).collect();
        let compact = serde_json::to_vec(&agents).expect("json");
        let mut four_spaces = Vec::new();
        let formatter = serde_json::ser::PrettyFormatter::with_indent(b"    ");
        let mut serializer = serde_json::Serializer::with_formatter(&mut four_spaces, formatter);
        serde::Serialize::serialize(&agents, &mut serializer).expect("json");
        let pretty = serde_json::to_string_pretty(&agents).expect("json");
        // An agent whose unknown field is an array of objects at the
        // top level's indent: the boundary's bytes inside one agent.
        let inner = pretty.replacen(
            "\"backend\"",
            "\"extra\": [\n  {\"a\": 1\n  },\n  {\"b\": 2}],\n    \"backend\"",
            6,
        );
        assert!(inner.contains("\n  },\n  {\"b\""));
        let torn = &pretty.as_bytes()[..pretty.len() * 2 / 3];
        let mut not_utf8 = pretty.clone().into_bytes();
        let at = not_utf8.len() * 3 / 4;
        not_utf8[at] = 0xff;
        for bytes in [
            compact.as_slice(),
            four_spaces.as_slice(),
            inner.as_bytes(),
            torn,
            not_utf8.as_slice(),
        ] {
            for parts in 2..=4 {
                parses_as_whole(bytes, parts);
            }
        }
    }

    /// A journal cut into runs of lines parsed on threads gives the lines
    /// in their order, each as one parse gives it: upserts, deletes, `seen`
    /// lines, blank lines left out, and a torn line an error in its place,
    /// whether a cut falls in a run of blank lines or not.
    #[test]
    fn a_journal_read_in_parts_reads_as_one() {
        let agents: Vec<NodeFacts> = (0..30).map(|n| facts(&format!("node-{n}"))).collect();
        let mut text = String::new();
        for (n, agent) in agents.iter().enumerate() {
            let change = match n % 3 {
                0 => Change::Upsert(Arc::new(agent.clone())),
                1 => Change::Seen(vec![super::super::Seen(
                    agent.id,
                    chrono::Utc::now(),
                    common::AgentStatus::Online,
                )]),
                _ => Change::Delete(agents[n - 2].id),
            };
            text.push_str(&serde_json::to_string(&change).expect("json"));
            text.push('\n');
            if n % 7 == 0 {
                text.push_str("\n  \n");
            }
        }
        text.push_str("{\"op\":\"upsert\",\"agent\":{\"id\":");
        let bytes = text.as_bytes();
        let shown = |changes: Vec<serde_json::Result<Change>>| -> Vec<String> {
            changes
                .into_iter()
                .map(|change| match change {
                    Ok(change) => serde_json::to_string(&change).expect("json"),
                    Err(error) => format!("error: {error}"),
                })
                .collect()
        };
        let whole = shown(parse_journal_in(bytes, 1));
        assert_eq!(whole.len(), 31);
        assert!(whole[30].starts_with("error: "), "{}", whole[30]);
        for parts in 2..=9 {
            assert_eq!(
                shown(parse_journal_in(bytes, parts)),
                whole,
                "{parts} parts"
            );
        }
    }

    fn names(records: &Records) -> Vec<String> {
        let mut names: Vec<String> = records.iter().map(|f| f.machine_name.to_string()).collect();
        names.sort();
        names
    }

    /// Whatever moment a crash picks around a snapshot written beside the
    /// writer (after the rotation, before the snapshot is in place, after
    /// it but before its segments are deleted), loading finds every change.
    #[test]
    fn every_change_survives_a_crash_at_any_step_of_a_background_snapshot() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (a, b, c) = (facts("a"), facts("b"), facts("c"));
        {
            let (mut files, _, _) = DataFiles::open(dir.path()).expect("open");
            files
                .append(&[Change::Upsert(Arc::new(a.clone()))])
                .expect("append");
            let covered = files.rotate().expect("rotate");
            assert_eq!(covered.len(), 1);
            files
                .append(&[Change::Upsert(Arc::new(b.clone()))])
                .expect("append");
            // Crash: rotated, no snapshot yet.
        }
        let (mut files, records, _) = DataFiles::open(dir.path()).expect("reopen");
        assert_eq!(names(&records), ["a", "b"]);
        assert!(files.has_closed_segments());
        // A snapshot in place whose segments were not deleted yet (a crash
        // between the two): replaying them again changes nothing.
        let covered = files.rotate().expect("rotate");
        files
            .append(&[Change::Delete(a.id), Change::Upsert(Arc::new(c.clone()))])
            .expect("append");
        write_snapshot(dir.path(), records.shared(), &[]).expect("snapshot");
        drop(files);
        let (mut files, records, _) = DataFiles::open(dir.path()).expect("reopen");
        assert_eq!(
            names(&records),
            ["b", "c"],
            "a's deletion after the rotation stands"
        );
        // And once the segments go, the snapshot and the live journal hold it all.
        write_snapshot(dir.path(), records.shared(), &covered).expect("snapshot");
        let covered_now = files.rotate().expect("rotate");
        write_snapshot(dir.path(), records.shared(), &covered_now).expect("snapshot");
        files.forget_segments(&covered_now);
        assert!(!files.has_closed_segments());
        drop(files);
        let (_, records, _) = DataFiles::open(dir.path()).expect("reopen");
        assert_eq!(names(&records), ["b", "c"]);
        let left: Vec<String> = fs::read_dir(dir.path())
            .expect("dir")
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|name| name.starts_with("agents.journal."))
            .collect();
        assert!(left.is_empty(), "segments left: {left:?}");
    }
}
