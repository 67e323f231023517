//! Where each prompt prefix was sent: the memory behind `--balancer
//! cache-aware`.
//!
//! Every LLM server keeps a prompt cache (llama.cpp's slots, Ollama's
//! runner, vLLM's prefix cache), so a request whose prompt begins as an
//! earlier one did is cheap where that earlier one went. A prompt is cut
//! into blocks of [`BLOCK_BYTES`], each hashed with the hash of the blocks
//! before it (and the model), so that two prompts share their first n
//! block hashes exactly when they share their first n blocks. The index
//! maps a block hash to the few nodes it was sent to last; the longest
//! shared prefix with a node is the run of leading blocks that name it.
//! No tree to lock: a lookup is one short-held shard lock per block.
//!
//! Memory is bounded: each shard keeps two generations of entries; when
//! the current one reaches half the shard's share of the budget it becomes
//! the previous one and the old previous one is dropped. An entry used
//! again moves to the current generation, so what is in use stays and the
//! rest ages out (an approximation of LRU at no cost per lookup).

use std::collections::HashMap;
use std::sync::Mutex;

use nohash_hasher::BuildNoHashHasher;

/// Bytes of prompt per block: about 64 tokens of English.
pub const BLOCK_BYTES: usize = 256;
/// Nodes remembered per block, most recent first.
const NODES_PER_BLOCK: usize = 3;
/// Shards of the index: enough that event loops rarely meet on one lock.
const SHARDS: usize = 64;
/// Bytes an entry costs, with the map's own overhead, for the budget.
const ENTRY_BYTES: usize = 64;

/// A prompt's chained block hashes, made once per request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PromptKey {
    blocks: Vec<u64>,
}

impl PromptKey {
    /// The key of a prompt given as its parts in order (system prompt,
    /// messages or prompt, images), for one model. A last partial block
    /// counts, so short prompts have a key too.
    pub fn of(model: &str, parts: &[&[u8]]) -> Self {
        let total: usize = parts.iter().map(|part| part.len()).sum();
        let mut blocks = Vec::with_capacity(total.div_ceil(BLOCK_BYTES));
        let mut chain = xxhash_rust::xxh3::xxh3_64(model.as_bytes());
        let mut pending: Vec<u8> = Vec::new();
        for part in parts {
            let mut rest: &[u8] = part;
            if !pending.is_empty() {
                let take = (BLOCK_BYTES - pending.len()).min(rest.len());
                pending.extend_from_slice(&rest[..take]);
                rest = &rest[take..];
                if pending.len() == BLOCK_BYTES {
                    chain = xxhash_rust::xxh3::xxh3_64_with_seed(&pending, chain);
                    blocks.push(chain);
                    pending.clear();
                }
            }
            let mut whole = rest.chunks_exact(BLOCK_BYTES);
            for block in &mut whole {
                chain = xxhash_rust::xxh3::xxh3_64_with_seed(block, chain);
                blocks.push(chain);
            }
            pending.extend_from_slice(whole.remainder());
        }
        if !pending.is_empty() {
            blocks.push(xxhash_rust::xxh3::xxh3_64_with_seed(&pending, chain));
        }
        PromptKey { blocks }
    }

    pub fn blocks(&self) -> usize {
        self.blocks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }
}

/// The nodes a block went to, most recent first (0: an empty place).
type Nodes = [u64; NODES_PER_BLOCK];

#[derive(Default)]
struct Shard {
    current: HashMap<u64, Nodes, BuildNoHashHasher<u64>>,
    previous: HashMap<u64, Nodes, BuildNoHashHasher<u64>>,
}

impl Shard {
    fn get(&self, block: u64) -> Option<&Nodes> {
        self.current
            .get(&block)
            .or_else(|| self.previous.get(&block))
    }
}

pub struct PrefixIndex {
    shards: Box<[Mutex<Shard>]>,
    /// Entries one generation of one shard holds before it turns over.
    generation_entries: usize,
}

impl std::fmt::Debug for PrefixIndex {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("PrefixIndex")
            .field("generation_entries", &self.generation_entries)
            .finish()
    }
}

/// What the index knows of a prompt for a set of nodes: the node sharing
/// the longest prefix with it, and how many blocks long that prefix is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Match {
    /// Its position in the slice of nodes asked about.
    pub position: usize,
    pub blocks: usize,
}

impl PrefixIndex {
    /// An index that holds about `budget_bytes` at most.
    pub fn new(budget_bytes: usize) -> Self {
        let entries = (budget_bytes / ENTRY_BYTES).max(SHARDS * 2);
        PrefixIndex {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            generation_entries: entries / SHARDS / 2,
        }
    }

    fn shard(&self, block: u64) -> std::sync::MutexGuard<'_, Shard> {
        // Middle bits pick the shard: the map inside uses the key itself as
        // its hash, its low bits for the bucket and its top bits as tags.
        self.shards[(block >> 32) as usize % SHARDS]
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// The node among `nodes` (each a [`node_key`]) that was sent the
    /// longest run of this prompt's leading blocks; `None` when none was
    /// sent even the first. Among nodes with equally long runs, the one
    /// that was sent it last.
    pub fn longest_match(&self, key: &PromptKey, nodes: &[u64]) -> Option<Match> {
        self.matches(key, nodes).first().copied()
    }

    /// Every node among `nodes` that holds a prefix of this prompt (at
    /// most [`NODES_PER_BLOCK`], those named by its first block), longest
    /// first, and among equals the most recent first.
    pub fn matches(&self, key: &PromptKey, nodes: &[u64]) -> Vec<Match> {
        let mut found: Vec<Match> = Vec::with_capacity(NODES_PER_BLOCK);
        for (depth, &block) in key.blocks.iter().enumerate() {
            let Some(holders) = self.shard(block).get(block).copied() else {
                break;
            };
            let mut any = false;
            for holder in holders.iter().filter(|&&holder| holder != 0) {
                let Some(position) = nodes.iter().position(|node| node == holder) else {
                    continue;
                };
                if depth == 0 {
                    found.push(Match {
                        position,
                        blocks: 1,
                    });
                    any = true;
                } else if let Some(known) = found
                    .iter_mut()
                    .find(|m| m.position == position && m.blocks == depth)
                {
                    known.blocks = depth + 1;
                    any = true;
                }
            }
            if !any {
                break;
            }
        }
        // Stable: equals keep the order of the first block, most recent first.
        found.sort_by_key(|m| std::cmp::Reverse(m.blocks));
        found
    }

    /// Remembers that this prompt went to `node`.
    pub fn remember(&self, key: &PromptKey, node: u64) {
        for &block in &key.blocks {
            let mut shard = self.shard(block);
            let mut holders = match shard.current.get(&block) {
                Some(holders) => *holders,
                None => shard.previous.remove(&block).unwrap_or_default(),
            };
            if holders[0] != node {
                // Move `node` to the front, keeping the others in order.
                let at = holders
                    .iter()
                    .position(|&h| h == node)
                    .unwrap_or(NODES_PER_BLOCK - 1);
                holders.copy_within(0..at, 1);
                holders[0] = node;
            }
            if shard.current.len() >= self.generation_entries && !shard.current.contains_key(&block)
            {
                shard.previous = std::mem::take(&mut shard.current);
            }
            shard.current.insert(block, holders);
        }
    }

    /// Entries held now, over every shard.
    pub fn entries(&self) -> usize {
        self.shards
            .iter()
            .map(|shard| {
                let shard = shard.lock().unwrap_or_else(|poison| poison.into_inner());
                shard.current.len() + shard.previous.len()
            })
            .sum()
    }
}

/// A node's key in the index: never 0 (which marks an empty place).
pub fn node_key(id: &uuid::Uuid) -> u64 {
    let (high, low) = id.as_u64_pair();
    (high ^ low).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conversation(system: &str, turns: usize) -> Vec<u8> {
        let mut messages = format!(r#"[{{"role":"system","content":"{system}"}}"#);
        for turn in 0..turns {
            messages.push_str(&format!(
                r#",{{"role":"user","content":"question {turn}"}},{{"role":"assistant","content":"answer {turn}"}}"#
            ));
        }
        messages.push(']');
        messages.into_bytes()
    }

    #[test]
    fn a_later_turn_shares_the_earlier_turns_blocks() {
        let system = "You are a helpful assistant. ".repeat(60);
        let first = PromptKey::of("m", &[&conversation(&system, 1)]);
        let third = PromptKey::of("m", &[&conversation(&system, 3)]);
        let shared = first
            .blocks
            .iter()
            .zip(&third.blocks)
            .take_while(|(a, b)| a == b)
            .count();
        assert!(
            shared >= first.blocks() - 1,
            "{shared} of {}",
            first.blocks()
        );
        assert_ne!(
            PromptKey::of("other", &[&conversation(&system, 1)]),
            first,
            "the model is in the key"
        );
        // Parts split anywhere give the same key as the whole.
        let whole = conversation(&system, 2);
        let (a, b) = whole.split_at(1000);
        assert_eq!(PromptKey::of("m", &[a, b]), PromptKey::of("m", &[&whole]));
    }

    #[test]
    fn the_longest_match_wins_and_ties_go_to_the_latest() {
        let index = PrefixIndex::new(1 << 20);
        let system = "Context. ".repeat(200);
        let long = PromptKey::of("m", &[&conversation(&system, 4)]);
        let short = PromptKey::of("m", &[&conversation(&system, 0)]);
        index.remember(&short, 11);
        index.remember(&long, 22);
        let nodes = [11, 22, 33];
        let found = index.longest_match(&long, &nodes).expect("a match");
        assert_eq!(found.position, 1);
        assert_eq!(found.blocks, long.blocks());
        // The short prompt went whole to 11 only: 11 holds more of it.
        let found = index.longest_match(&short, &nodes).expect("a match");
        assert_eq!((nodes[found.position], found.blocks), (11, short.blocks()));
        // Another user with the same system prompt: both hold that much;
        // 22 had it last.
        let other_user = PromptKey::of(
            "m",
            &[format!(
                r#"[{{"role":"system","content":"{system}"}},{{"role":"user","content":"hello"}}]"#
            )
            .as_bytes()],
        );
        let found = index.longest_match(&other_user, &nodes).expect("a match");
        assert_eq!(nodes[found.position], 22);
        assert!(found.blocks >= 5 && found.blocks < other_user.blocks());
        // A node not asked about is not an answer.
        assert_eq!(index.longest_match(&long, &[33]), None);
        let unrelated = PromptKey::of("m", &[b"something else entirely"]);
        assert_eq!(index.longest_match(&unrelated, &nodes), None);
    }

    #[test]
    fn memory_stays_within_the_budget_and_what_is_used_stays() {
        let budget = 256 * 1024;
        let index = PrefixIndex::new(budget);
        let kept = PromptKey::of("m", &[b"kept in use"]);
        for n in 0..50_000u32 {
            index.remember(&PromptKey::of("m", &[&n.to_le_bytes()]), 7);
            if n % 100 == 0 {
                index.remember(&kept, 9);
            }
        }
        assert!(
            index.entries() * ENTRY_BYTES <= budget,
            "{} entries",
            index.entries()
        );
        assert!(index.longest_match(&kept, &[9]).is_some());
    }
}
