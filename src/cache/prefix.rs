//! The prefix store: a radix index over token ids whose entries are KV
//! snapshots at token boundaries, bounded by bytes with LRU eviction.
//!
//! Two calls carry it: [`PrefixCache::fetch_nearest`] (the deepest usable
//! entry for a prompt, trimmed back to the common prefix when a longer entry
//! beats a shorter one) and [`PrefixCache::insert`]. Nodes live in an arena;
//! an entry that is a strict prefix of another is redundant (trimming the
//! longer one gives it) and is dropped. Entries handed out by a fetch are
//! pinned until released and are never evicted.
//!
//! An [`exact`](PrefixCache::exact) cache holds states that cannot be
//! trimmed (a model with recurrent layers): an entry serves only prompts it
//! is a whole prefix of, and shorter entries on a longer one's path are kept.

use std::collections::{BTreeSet, HashMap};

/// What the cache stores: something with a size in bytes, which may have a
/// cheaper form to fall back to when evicted (a copy on disk).
pub trait Cached: Clone {
    /// Bytes it holds in memory (counted against the budget).
    fn bytes(&self) -> usize;
    /// The form to keep instead of dropping it on eviction (0 bytes), if any.
    fn demote(&self) -> Option<Self> {
        None
    }
}

/// Identifies an entry for [`PrefixCache::release`] and [`PrefixCache::replace`].
pub type EntryId = u64;

/// The result of [`PrefixCache::fetch_nearest`].
#[derive(Clone)]
pub struct Hit<S> {
    pub id: EntryId,
    pub value: S,
    /// Tokens the entry holds.
    pub entry_len: usize,
    /// Tokens of the query it serves (≤ `entry_len`): trim the snapshot to this.
    pub usable: usize,
}

/// Counters for `/v1/cache/stats` and metrics.
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq, serde::Serialize)]
pub struct CacheStats {
    pub entries: usize,
    /// Entries with a snapshot file complete on disk (set by the engine's policy).
    pub on_disk: usize,
    /// Snapshots still to be written, or being written (set by the engine's policy).
    pub disk_busy: bool,
    pub bytes: usize,
    pub budget_bytes: usize,
    pub hits: u64,
    pub misses: u64,
    pub tokens_saved: u64,
    pub evictions: u64,
}

struct Entry<S> {
    id: EntryId,
    value: S,
    bytes: usize,
    last_used: u64,
    pins: u32,
}

struct Node<S> {
    /// Tokens on the edge from the parent.
    edge: Vec<u32>,
    parent: usize,
    /// Tokens from the root to the end of this node's edge.
    depth: usize,
    children: HashMap<u32, usize>,
    entry: Option<Entry<S>>,
}

pub struct PrefixCache<S: Cached> {
    nodes: Vec<Option<Node<S>>>,
    free: Vec<usize>,
    /// Entry id -> node holding it.
    where_is: HashMap<EntryId, usize>,
    /// (last_used, entry id) of every entry, oldest first.
    lru: BTreeSet<(u64, EntryId)>,
    budget: usize,
    bytes: usize,
    clock: u64,
    next_id: EntryId,
    stats: CacheStats,
    /// Values removed (not demoted) since the last [`take_removed`](Self::take_removed).
    removed: Vec<S>,
    /// Entries are served only whole (see the module's documentation).
    exact: bool,
}

const ROOT: usize = 0;

impl<S: Cached> PrefixCache<S> {
    /// An empty cache holding at most `budget` bytes.
    pub fn new(budget: usize) -> Self {
        let root = Node { edge: vec![], parent: ROOT, depth: 0, children: HashMap::new(), entry: None };
        PrefixCache {
            nodes: vec![Some(root)],
            free: vec![],
            where_is: HashMap::new(),
            lru: BTreeSet::new(),
            budget,
            bytes: 0,
            clock: 0,
            next_id: 1,
            stats: CacheStats::default(),
            removed: vec![],
            exact: false,
        }
    }

    /// An empty cache of `budget` bytes whose entries cannot be trimmed:
    /// each serves only a prompt it is a whole prefix of, and no entry is
    /// redundant because a longer one covers it.
    pub fn exact(budget: usize) -> Self {
        PrefixCache { exact: true, ..Self::new(budget) }
    }

    pub fn is_exact(&self) -> bool {
        self.exact
    }

    fn node(&self, i: usize) -> &Node<S> {
        self.nodes[i].as_ref().expect("live node")
    }
    fn node_mut(&mut self, i: usize) -> &mut Node<S> {
        self.nodes[i].as_mut().expect("live node")
    }

    pub fn budget(&self) -> usize {
        self.budget
    }
    pub fn bytes(&self) -> usize {
        self.bytes
    }
    pub fn len(&self) -> usize {
        self.where_is.len()
    }
    pub fn is_empty(&self) -> bool {
        self.where_is.is_empty()
    }
    pub fn stats(&self) -> CacheStats {
        CacheStats { entries: self.len(), bytes: self.bytes, budget_bytes: self.budget, ..self.stats }
    }

    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    fn touch(&mut self, id: EntryId) {
        let t = self.tick();
        let n = self.where_is[&id];
        let e = self.node_mut(n).entry.as_mut().expect("entry at its node");
        let old = e.last_used;
        e.last_used = t;
        self.lru.remove(&(old, id));
        self.lru.insert((t, id));
    }

    /// Walk `tokens` from the root: the deepest node reached by whole edges,
    /// the child whose edge matched partly (if any), and the tokens matched.
    fn walk(&self, tokens: &[u32]) -> (usize, Option<usize>, usize) {
        let mut at = ROOT;
        let mut m = 0;
        loop {
            let Some(&c) = tokens.get(m).and_then(|t| self.node(at).children.get(t)) else {
                return (at, None, m);
            };
            let edge = &self.node(c).edge;
            let common = edge.iter().zip(&tokens[m..]).take_while(|(a, b)| a == b).count();
            if common < edge.len() {
                return (at, Some(c), m + common);
            }
            at = c;
            m += common;
        }
    }

    /// Any entry in the subtree under `n` (itself included), preferring the
    /// most recently used.
    fn entry_below(&self, n: usize) -> Option<usize> {
        let mut best: Option<(u64, usize)> = None;
        let mut stack = vec![n];
        while let Some(i) = stack.pop() {
            let node = self.node(i);
            if let Some(e) = &node.entry {
                if best.is_none_or(|(t, _)| e.last_used > t) {
                    best = Some((e.last_used, i));
                }
            }
            stack.extend(node.children.values());
        }
        best.map(|(_, i)| i)
    }

    /// The node of the entry [`fetch_nearest`](Self::fetch_nearest) would hand out, and the tokens it serves.
    fn nearest(&self, tokens: &[u32], max_usable: usize) -> Option<(usize, usize)> {
        let tokens = &tokens[..tokens.len().min(max_usable)];
        let (at, partial, m) = self.walk(tokens);
        // Deepest entry on the path (at `at` or above).
        let mut exact = None;
        let mut i = at;
        loop {
            if self.node(i).entry.is_some() {
                exact = Some(i);
                break;
            }
            if i == ROOT {
                break;
            }
            i = self.node(i).parent;
        }
        let exact_len = exact.map_or(0, |i| self.node(i).depth);
        let below = if m > exact_len && !self.exact { self.entry_below(partial.unwrap_or(at)) } else { None };
        match (below, exact) {
            (Some(b), _) => Some((b, m)),
            (None, Some(e)) if exact_len > 0 => Some((e, exact_len)),
            _ => None,
        }
    }

    /// Whether an entry holds exactly `tokens`.
    pub fn holds(&self, tokens: &[u32]) -> bool {
        let (at, partial, m) = self.walk(tokens);
        partial.is_none() && m == tokens.len() && self.node(at).entry.is_some()
    }

    /// How many tokens of `tokens` (at most `max_usable`) a fetch would serve
    /// now; no pin, no statistics.
    pub fn usable(&self, tokens: &[u32], max_usable: usize) -> usize {
        self.nearest(tokens, max_usable).map_or(0, |(_, u)| u)
    }

    /// The deepest entry usable for `tokens`, serving at most `max_usable`
    /// tokens, pinned until [`release`](Self::release)d. An entry on the path
    /// serves its whole length; an entry past the point where `tokens`
    /// leaves the index serves the common prefix (trim it) when that is longer.
    pub fn fetch_nearest(&mut self, tokens: &[u32], max_usable: usize) -> Option<Hit<S>> {
        let Some((node, usable)) = self.nearest(tokens, max_usable) else {
            self.stats.misses += 1;
            return None;
        };
        let entry = self.node_mut(node).entry.as_mut().expect("entry found above");
        entry.pins += 1;
        let (id, value) = (entry.id, entry.value.clone());
        let entry_len = self.node(node).depth;
        self.touch(id);
        self.stats.hits += 1;
        self.stats.tokens_saved += usable as u64;
        Some(Hit { id, value, entry_len, usable })
    }

    /// Unpin an entry a fetch handed out (no-op if it is gone). An entry
    /// that a longer one now covers (it was kept only because it was pinned
    /// when that one was inserted) is dropped as redundant.
    pub fn release(&mut self, id: EntryId) {
        let Some(&n) = self.where_is.get(&id) else { return };
        let Some(e) = self.node_mut(n).entry.as_mut() else { return };
        e.pins = e.pins.saturating_sub(1);
        // Every leaf holds an entry, so a node with children has one below it.
        if e.pins == 0 && !self.exact && !self.node(n).children.is_empty() {
            self.remove(id);
        }
    }

    /// Replace an entry's value (a snapshot read back from disk), keeping its
    /// place; false if the entry is gone or the budget cannot make room.
    pub fn replace(&mut self, id: EntryId, value: S) -> bool {
        let Some(&n) = self.where_is.get(&id) else { return false };
        let new = value.bytes();
        let e = self.node_mut(n).entry.as_mut().expect("entry at its node");
        let old = e.bytes;
        e.value = value;
        e.bytes = new;
        self.bytes = self.bytes - old + new;
        self.evict_to(self.budget, Some(id));
        self.bytes <= self.budget || {
            self.remove(id);
            false
        }
    }

    /// Store `value` as the state after `tokens`. Returns its id, or `None`
    /// when it is redundant (a longer entry already holds these tokens), empty,
    /// or larger than the whole budget. Entries that are strict prefixes of
    /// it are dropped unless pinned; least recently used ones are evicted
    /// until the budget holds.
    pub fn insert(&mut self, tokens: &[u32], value: S) -> Option<EntryId> {
        let bytes = value.bytes();
        if tokens.is_empty() || bytes > self.budget {
            return None;
        }
        let (at, partial, m) = self.walk(tokens);
        if m == tokens.len() {
            // The path exists: an entry at or below it makes this redundant
            // (or, at exactly this node, is replaced by it).
            let n = match partial {
                None => at,
                Some(c) => c,
            };
            if partial.is_none() {
                if let Some(e) = &self.node(at).entry {
                    let id = e.id;
                    let old = e.bytes;
                    let e = self.node_mut(at).entry.as_mut().expect("checked");
                    e.value = value;
                    e.bytes = bytes;
                    self.bytes = self.bytes - old + bytes;
                    self.touch(id);
                    self.evict_to(self.budget, Some(id));
                    return Some(id);
                }
            }
            if let Some(b) = self.entry_below(n).filter(|_| !self.exact) {
                let id = self.node(b).entry.as_ref().expect("found").id;
                self.touch(id);
                return None;
            }
        }
        let n = self.make_node(tokens, at, partial, m);
        let id = self.next_id;
        self.next_id += 1;
        let t = self.tick();
        self.node_mut(n).entry = Some(Entry { id, value, bytes, last_used: t, pins: 0 });
        self.where_is.insert(id, n);
        self.lru.insert((t, id));
        self.bytes += bytes;
        // Drop redundant prefixes (entries on the path above), unless pinned.
        let mut i = if self.exact { ROOT } else { self.node(n).parent };
        while i != ROOT {
            let up = self.node(i).parent;
            if let Some(e) = &self.node(i).entry {
                if e.pins == 0 {
                    let eid = e.id;
                    self.remove(eid);
                }
            }
            i = up;
        }
        self.evict_to(self.budget, Some(id));
        Some(id)
    }

    /// Create the node for `tokens` given where [`walk`](Self::walk) stopped.
    fn make_node(&mut self, tokens: &[u32], at: usize, partial: Option<usize>, m: usize) -> usize {
        let mut parent = at;
        if let Some(c) = partial {
            // Split c's edge at the divergence point.
            let depth_at = self.node(at).depth;
            let cut = m - depth_at;
            let child = self.node_mut(c);
            let rest = child.edge.split_off(cut);
            let head = std::mem::replace(&mut child.edge, rest);
            let mid = self.alloc(Node { edge: head, parent: at, depth: m, children: HashMap::new(), entry: None });
            let first_rest = self.node(c).edge[0];
            self.node_mut(mid).children.insert(first_rest, c);
            self.node_mut(c).parent = mid;
            let first_head = self.node(mid).edge[0];
            self.node_mut(at).children.insert(first_head, mid);
            parent = mid;
        }
        if m == tokens.len() {
            return parent;
        }
        let leaf = self.alloc(Node {
            edge: tokens[m..].to_vec(),
            parent,
            depth: tokens.len(),
            children: HashMap::new(),
            entry: None,
        });
        self.node_mut(parent).children.insert(tokens[m], leaf);
        leaf
    }

    fn alloc(&mut self, node: Node<S>) -> usize {
        match self.free.pop() {
            Some(i) => {
                self.nodes[i] = Some(node);
                i
            }
            None => {
                self.nodes.push(Some(node));
                self.nodes.len() - 1
            }
        }
    }

    /// Evict least recently used, unpinned entries (except `keep`) until
    /// `bytes <= target`. Entries with a cheaper form are demoted instead.
    fn evict_to(&mut self, target: usize, keep: Option<EntryId>) {
        let order: Vec<EntryId> = self.lru.iter().map(|&(_, id)| id).collect();
        for id in order {
            if self.bytes <= target {
                break;
            }
            if Some(id) == keep {
                continue;
            }
            let n = self.where_is[&id];
            let e = self.node(n).entry.as_ref().expect("entry at its node");
            if e.pins > 0 || e.bytes == 0 {
                continue;
            }
            let cheap = e.value.demote();
            self.stats.evictions += 1;
            match cheap {
                Some(cheap) => {
                    let new = cheap.bytes();
                    let e = self.node_mut(n).entry.as_mut().expect("checked");
                    let old = std::mem::replace(&mut e.bytes, new);
                    e.value = cheap;
                    self.bytes = self.bytes - old + new;
                }
                None => self.remove(id),
            }
        }
    }

    /// Remove an entry (pinned or not) and prune nodes left without purpose.
    pub fn remove(&mut self, id: EntryId) {
        let Some(n) = self.where_is.remove(&id) else { return };
        let e = self.node_mut(n).entry.take().expect("entry at its node");
        self.lru.remove(&(e.last_used, id));
        self.bytes -= e.bytes;
        self.removed.push(e.value);
        self.prune(n);
    }

    /// The values removed since the last call (to delete their files).
    pub fn take_removed(&mut self) -> Vec<S> {
        std::mem::take(&mut self.removed)
    }

    /// Remove every unpinned entry.
    pub fn clear(&mut self) -> usize {
        let ids: Vec<EntryId> = self.where_is.keys().copied().collect();
        let mut removed = 0;
        for id in ids {
            let n = self.where_is[&id];
            if self.node(n).entry.as_ref().is_some_and(|e| e.pins == 0) {
                self.remove(id);
                removed += 1;
            }
        }
        removed
    }

    /// Drop `n` if it has no entry and no children; merge it into its only
    /// child if it has no entry and one child; then look at its parent.
    fn prune(&mut self, mut n: usize) {
        while n != ROOT && self.node(n).entry.is_none() {
            let parent = self.node(n).parent;
            match self.node(n).children.len() {
                0 => {
                    let first = self.node(n).edge[0];
                    self.node_mut(parent).children.remove(&first);
                    self.nodes[n] = None;
                    self.free.push(n);
                    n = parent;
                }
                1 => {
                    // Merge the only child into n (n keeps its slot in the parent).
                    let c = *self.node(n).children.values().next().expect("one child");
                    let child = self.nodes[c].take().expect("live child");
                    self.free.push(c);
                    let node = self.node_mut(n);
                    node.edge.extend_from_slice(&child.edge);
                    node.depth = child.depth;
                    node.children = child.children;
                    node.entry = child.entry;
                    let kids: Vec<usize> = self.node(n).children.values().copied().collect();
                    for k in kids {
                        self.node_mut(k).parent = n;
                    }
                    if let Some(e) = &self.node(n).entry {
                        self.where_is.insert(e.id, n);
                    }
                    return;
                }
                _ => return,
            }
        }
    }

    /// Entry `id`'s value, if it is still stored.
    pub fn value(&self, id: EntryId) -> Option<&S> {
        let n = *self.where_is.get(&id)?;
        self.node(n).entry.as_ref().map(|e| &e.value)
    }

    /// The tokens from the root to entry `id`.
    pub fn tokens_of(&self, id: EntryId) -> Option<Vec<u32>> {
        let mut n = *self.where_is.get(&id)?;
        let mut parts = vec![];
        while n != ROOT {
            parts.push(self.node(n).edge.clone());
            n = self.node(n).parent;
        }
        Some(parts.into_iter().rev().flatten().collect())
    }

    /// Every entry: id, tokens held, bytes, pinned.
    pub fn entries(&self) -> Vec<(EntryId, usize, usize, bool)> {
        let mut v: Vec<_> = self
            .where_is
            .iter()
            .map(|(&id, &n)| {
                let node = self.node(n);
                let e = node.entry.as_ref().expect("entry at its node");
                (id, node.depth, e.bytes, e.pins > 0)
            })
            .collect();
        v.sort_unstable();
        v
    }

    /// Check the structure's invariants; `Err` says which one broke.
    pub fn check(&self) -> Result<(), String> {
        let mut bytes = 0;
        for (&id, &n) in &self.where_is {
            let node = self.nodes.get(n).and_then(Option::as_ref).ok_or(format!("entry {id} at dead node {n}"))?;
            let e = node.entry.as_ref().ok_or(format!("entry {id}: node {n} has none"))?;
            if e.id != id {
                return Err(format!("node {n} holds {} not {id}", e.id));
            }
            if !self.lru.contains(&(e.last_used, id)) {
                return Err(format!("entry {id} missing from the LRU order"));
            }
            bytes += e.bytes;
            // Its path resolves back to it.
            let tokens = self.tokens_of(id).expect("listed");
            if tokens.len() != node.depth {
                return Err(format!("entry {id}: path has {} tokens, depth {}", tokens.len(), node.depth));
            }
            let (at, partial, m) = self.walk(&tokens);
            if at != n || partial.is_some() || m != tokens.len() {
                return Err(format!("entry {id}: its tokens do not lead back to it"));
            }
        }
        if self.lru.len() != self.where_is.len() {
            return Err(format!("{} in LRU order, {} entries", self.lru.len(), self.where_is.len()));
        }
        if bytes != self.bytes {
            return Err(format!("byte count {} but entries sum to {bytes}", self.bytes));
        }
        for (i, node) in self.nodes.iter().enumerate() {
            let Some(node) = node else { continue };
            for (&t, &c) in &node.children {
                let child = self.node(c);
                if child.parent != i || child.edge.first() != Some(&t) || child.depth != node.depth + child.edge.len() {
                    return Err(format!("node {c} is not a proper child of {i}"));
                }
            }
            if i != ROOT && node.entry.is_none() && node.children.len() < 2 {
                return Err(format!("node {i} has no entry and {} children", node.children.len()));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Debug, PartialEq)]
    struct Blob {
        tokens: Vec<u32>,
        bytes: usize,
    }
    impl Cached for Blob {
        fn bytes(&self) -> usize {
            self.bytes
        }
    }
    fn blob(tokens: &[u32]) -> Blob {
        Blob { tokens: tokens.to_vec(), bytes: tokens.len() * 10 }
    }

    #[test]
    fn nearest_exact_trimmed_and_redundant() {
        let mut c = PrefixCache::new(10_000);
        let a = c.insert(&[1, 2, 3, 4], blob(&[1, 2, 3, 4])).unwrap();
        // Exact prefix of the query.
        let h = c.fetch_nearest(&[1, 2, 3, 4, 5, 6], usize::MAX).unwrap();
        assert_eq!((h.id, h.usable, h.entry_len), (a, 4, 4));
        c.release(a);
        // A query leaving the path at token 3: the longer entry trimmed to 2.
        let h = c.fetch_nearest(&[1, 2, 9], usize::MAX).unwrap();
        assert_eq!((h.id, h.usable), (a, 2));
        c.release(a);
        // The cap applies (a prompt must leave its last token to compute).
        let h = c.fetch_nearest(&[1, 2, 3, 4], 3).unwrap();
        assert_eq!(h.usable, 3);
        c.release(a);
        assert!(c.fetch_nearest(&[7, 8], usize::MAX).is_none());
        // A prefix of an existing entry is redundant.
        assert_eq!(c.insert(&[1, 2], blob(&[1, 2])), None);
        // A longer entry replaces its prefix.
        let b = c.insert(&[1, 2, 3, 4, 5], blob(&[1, 2, 3, 4, 5])).unwrap();
        assert_eq!(c.entries().iter().map(|e| e.0).collect::<Vec<_>>(), vec![b]);
        // A pinned prefix survives a longer insert until it is released.
        let h = c.fetch_nearest(&[1, 2, 3, 4, 5], usize::MAX).unwrap();
        assert_eq!(h.id, b);
        let longer = c.insert(&[1, 2, 3, 4, 5, 6], blob(&[1, 2, 3, 4, 5, 6])).unwrap();
        assert!(c.tokens_of(b).is_some(), "pinned entry kept");
        c.release(b);
        assert!(c.tokens_of(b).is_none(), "redundant once released");
        assert_eq!(c.entries().iter().map(|e| e.0).collect::<Vec<_>>(), vec![longer]);
        // A branch keeps both.
        let d = c.insert(&[1, 2, 7], blob(&[1, 2, 7])).unwrap();
        assert_eq!(c.len(), 2);
        let h = c.fetch_nearest(&[1, 2, 7, 8], usize::MAX).unwrap();
        assert_eq!((h.id, h.usable), (d, 3));
        c.release(d);
        c.check().unwrap();
        let s = c.stats();
        assert_eq!((s.hits, s.misses, s.bytes), (5, 1, 90));
    }

    #[test]
    fn an_exact_cache_serves_whole_entries_and_keeps_prefixes() {
        let mut c = PrefixCache::exact(10_000);
        let short = c.insert(&[1, 2], blob(&[1, 2])).unwrap();
        let long = c.insert(&[1, 2, 3, 4, 5], blob(&[1, 2, 3, 4, 5])).unwrap();
        // The shorter entry is not redundant: it is what a prompt leaving at token 3 can use.
        assert_eq!(c.len(), 2);
        let h = c.fetch_nearest(&[1, 2, 3, 9], usize::MAX).unwrap();
        assert_eq!((h.id, h.usable, h.entry_len), (short, 2, 2), "never the longer one trimmed");
        c.release(short);
        assert_eq!(c.len(), 2, "released, it stays though a longer entry passes through it");
        let h = c.fetch_nearest(&[1, 2, 3, 4, 5, 6], usize::MAX).unwrap();
        assert_eq!((h.id, h.usable), (long, 5));
        c.release(long);
        // The cap: a prompt equal to the long entry must leave its last token to compute.
        let h = c.fetch_nearest(&[1, 2, 3, 4, 5], 4).unwrap();
        assert_eq!((h.id, h.usable), (short, 2));
        c.release(short);
        assert!(c.fetch_nearest(&[1, 9], usize::MAX).is_none());
        assert_eq!(c.usable(&[1, 2, 3, 4, 7], usize::MAX), 2);
        // A prefix inserted after the longer entry is kept too.
        let mid = c.insert(&[1, 2, 3], blob(&[1, 2, 3])).unwrap();
        assert_eq!(c.len(), 3);
        assert_eq!(c.fetch_nearest(&[1, 2, 3, 8], usize::MAX).unwrap().id, mid);
        c.release(mid);
        c.check().unwrap();
        // Removing the long entry leaves the prefixes.
        c.remove(long);
        assert_eq!(c.len(), 2);
        c.check().unwrap();
    }

    #[test]
    fn budget_evicts_least_recent_but_never_pinned() {
        let mut c = PrefixCache::new(100);
        let a = c.insert(&[1; 4], blob(&[1; 4])).unwrap(); // 40 bytes
        let b = c.insert(&[2; 4], blob(&[2; 4])).unwrap();
        let h = c.fetch_nearest(&[1; 5], usize::MAX).unwrap(); // pins a, makes it recent
        assert_eq!(h.id, a);
        let d = c.insert(&[3; 4], blob(&[3; 4])).unwrap(); // 120 > 100: evicts b
        assert!(c.tokens_of(b).is_none() && c.tokens_of(a).is_some() && c.tokens_of(d).is_some());
        // a is pinned: the next insert evicts d instead even though a is older now.
        if let Some(h) = c.fetch_nearest(&[3; 5], usize::MAX) { c.release(h.id) }
        let e = c.insert(&[4; 4], blob(&[4; 4])).unwrap();
        assert!(c.tokens_of(a).is_some() && c.tokens_of(d).is_none() && c.tokens_of(e).is_some());
        assert!(c.bytes() <= 100);
        // Larger than the whole budget: refused.
        assert_eq!(c.insert(&[5; 11], blob(&[5; 11])), None);
        c.check().unwrap();
    }

    /// A tiny deterministic generator (SplitMix64).
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    #[test]
    fn random_operations_keep_every_invariant() {
        for seed in 0..8 {
            let mut r = Rng(seed);
            let budget = 2_000 + r.below(3_000) as usize;
            let mut c: PrefixCache<Blob> = PrefixCache::new(budget);
            // Sequences share prefixes: built from a few stems with tails.
            let stems: Vec<Vec<u32>> = (0..6).map(|_| (0..r.below(40) + 1).map(|_| r.below(4) as u32).collect()).collect();
            let mut pinned: Vec<EntryId> = vec![];
            for _ in 0..2_500 {
                let mut t = stems[r.below(6) as usize].clone();
                t.extend((0..r.below(30)).map(|_| r.below(5) as u32));
                match r.below(10) {
                    0..=4 => {
                        if let Some(id) = c.insert(&t, blob(&t)) {
                            assert_eq!(c.tokens_of(id).unwrap(), t);
                        } else {
                            // Refused: too big, or a longer entry holds t.
                            let held = c.fetch_nearest(&t, usize::MAX);
                            if let Some(h) = held {
                                c.release(h.id);
                                assert!(t.len() * 10 > budget || h.usable == t.len(), "refused {t:?}");
                            } else {
                                assert!(t.len() * 10 > budget || t.is_empty());
                            }
                        }
                    }
                    5..=7 => {
                        let cap = r.below(t.len() as u64 + 1) as usize;
                        if let Some(h) = c.fetch_nearest(&t, cap) {
                            // The value is the entry's, and it really shares `usable` tokens.
                            assert!(h.usable <= cap && h.usable <= h.entry_len && h.usable > 0);
                            assert_eq!(h.value.tokens.len(), h.entry_len);
                            assert_eq!(&h.value.tokens[..h.usable], &t[..h.usable]);
                            assert_eq!(c.tokens_of(h.id).unwrap(), h.value.tokens);
                            if r.below(3) == 0 && pinned.len() < 3 {
                                pinned.push(h.id);
                            } else {
                                c.release(h.id);
                            }
                        } else {
                            // A miss means no entry shares a first token with t (within the cap).
                            for (id, _, _, _) in c.entries() {
                                let toks = c.tokens_of(id).unwrap();
                                assert!(cap == 0 || toks.first() != t.first(), "missed {t:?} though {toks:?} is held");
                            }
                        }
                    }
                    8 => {
                        if !pinned.is_empty() {
                            let id = pinned.swap_remove(r.below(pinned.len() as u64) as usize);
                            c.release(id);
                        }
                    }
                    _ => {
                        if r.below(50) == 0 {
                            c.clear();
                        }
                    }
                }
                c.check().unwrap();
                assert!(c.bytes() <= budget, "{} over budget {budget}", c.bytes());
                for &id in &pinned {
                    assert!(c.tokens_of(id).is_some(), "pinned entry {id} was evicted");
                }
            }
        }
    }
}
