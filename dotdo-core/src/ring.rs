//! A consistent-hash ring for routing-affinity hints.
//!
//! The ring only says which node *should* run an object, so that calls for one object tend to
//! land where its lease and caches are warm. It is a hint: correctness comes from the
//! [`ConsistencyGuard`](crate::ConsistencyGuard), never from the ring. Each node is placed at
//! `vnodes` points (xxh3 of `"{node}#{i}"`); an object belongs to the first point at or after
//! the hash of its id. Adding or removing one node moves only the objects of that node's points
//! (about `1/n` of all objects).

use std::collections::BTreeMap;

use xxhash_rust::xxh3::xxh3_64;

use crate::error::{Error, Result};
use crate::ids::{NodeId, ObjectId};

/// Default number of virtual points per node.
pub const DEFAULT_VNODES: u32 = 160;

/// A consistent-hash ring of [`NodeId`]s.
///
/// ```
/// use dotdo_core::{HashRing, NodeId, ObjectId};
/// let mut ring = HashRing::new(64)?;
/// ring.add(NodeId::new("a")?);
/// ring.add(NodeId::new("b")?);
/// let owner = ring.node_for(&ObjectId::new("user:1")?).expect("ring is not empty");
/// assert!(owner.as_str() == "a" || owner.as_str() == "b");
/// # Ok::<(), dotdo_core::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct HashRing {
    vnodes: u32,
    points: BTreeMap<u64, NodeId>,
    nodes: Vec<NodeId>,
}

impl HashRing {
    /// An empty ring placing each node at `vnodes` points (1..=4096).
    pub fn new(vnodes: u32) -> Result<Self> {
        if vnodes == 0 || vnodes > 4096 {
            return Err(Error::invalid(format!("vnodes must be 1..=4096, got {vnodes}")));
        }
        Ok(HashRing { vnodes, points: BTreeMap::new(), nodes: Vec::new() })
    }

    fn point(node: &NodeId, i: u32) -> u64 {
        xxh3_64(format!("{node}#{i}").as_bytes())
    }

    /// Add a node (no-op if present).
    pub fn add(&mut self, node: NodeId) {
        if self.nodes.contains(&node) {
            return;
        }
        for i in 0..self.vnodes {
            // On a (vanishingly rare) collision the smaller node id wins, deterministically.
            let p = Self::point(&node, i);
            match self.points.get(&p) {
                Some(existing) if existing <= &node => {}
                _ => {
                    self.points.insert(p, node.clone());
                }
            }
        }
        self.nodes.push(node);
        self.nodes.sort();
    }

    /// Remove a node (no-op if absent).
    pub fn remove(&mut self, node: &NodeId) {
        if !self.nodes.contains(node) {
            return;
        }
        self.nodes.retain(|n| n != node);
        self.points.retain(|_, n| n != node);
        // Restore points that a collision had given to the removed node.
        let others = self.nodes.clone();
        for n in others {
            for i in 0..self.vnodes {
                self.points.entry(Self::point(&n, i)).or_insert_with(|| n.clone());
            }
        }
    }

    /// The nodes on the ring, sorted.
    pub fn nodes(&self) -> &[NodeId] {
        &self.nodes
    }

    /// The preferred node for `object`, `None` on an empty ring.
    pub fn node_for(&self, object: &ObjectId) -> Option<&NodeId> {
        let h = xxh3_64(object.as_str().as_bytes());
        self.points.range(h..).next().or_else(|| self.points.iter().next()).map(|(_, n)| n)
    }

    /// Up to `n` distinct nodes for `object` in ring order (the preferred one first), for
    /// fallbacks.
    pub fn preference_list(&self, object: &ObjectId, n: usize) -> Vec<NodeId> {
        let h = xxh3_64(object.as_str().as_bytes());
        let mut out: Vec<NodeId> = Vec::with_capacity(n.min(self.nodes.len()));
        for (_, node) in self.points.range(h..).chain(self.points.range(..h)) {
            if out.len() >= n.min(self.nodes.len()) {
                break;
            }
            if !out.contains(node) {
                out.push(node.clone());
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn ring(n: usize) -> HashRing {
        let mut r = HashRing::new(DEFAULT_VNODES).expect("valid");
        for i in 0..n {
            r.add(NodeId::new(format!("node-{i}")).expect("valid"));
        }
        r
    }

    fn objects(n: usize) -> Vec<ObjectId> {
        (0..n).map(|i| ObjectId::new(format!("obj-{i}")).expect("valid")).collect()
    }

    #[test]
    fn load_is_balanced_across_nodes() {
        let r = ring(8);
        let objs = objects(80_000);
        let mut counts: HashMap<NodeId, usize> = HashMap::new();
        for o in &objs {
            *counts.entry(r.node_for(o).expect("non-empty").clone()).or_default() += 1;
        }
        assert_eq!(counts.len(), 8);
        let mean = objs.len() as f64 / 8.0;
        for (node, c) in counts {
            let dev = (c as f64 - mean).abs() / mean;
            assert!(dev < 0.20, "{node} has {c} objects, {:.1}% off the mean", dev * 100.0);
        }
    }

    #[test]
    fn adding_a_node_moves_only_about_one_nth_and_only_to_it() {
        let before = ring(8);
        let mut after = before.clone();
        let new = NodeId::new("node-new").expect("valid");
        after.add(new.clone());
        let objs = objects(50_000);
        let mut moved = 0;
        for o in &objs {
            let (a, b) = (before.node_for(o), after.node_for(o));
            if a != b {
                moved += 1;
                assert_eq!(b, Some(&new), "an object moved between two old nodes");
            }
        }
        let frac = moved as f64 / objs.len() as f64;
        assert!((0.07..0.16).contains(&frac), "moved {:.3} of objects, expected about 1/9", frac);
    }

    #[test]
    fn removing_a_node_moves_only_its_objects() {
        let before = ring(8);
        let mut after = before.clone();
        let gone = NodeId::new("node-3").expect("valid");
        after.remove(&gone);
        for o in &objects(20_000) {
            let a = before.node_for(o).expect("non-empty");
            let b = after.node_for(o).expect("non-empty");
            if a != &gone {
                assert_eq!(a, b, "object {o} moved although its node stayed");
            } else {
                assert_ne!(b, &gone);
            }
        }
        // Removing and re-adding gives the same ring.
        after.add(gone);
        for o in &objects(2_000) {
            assert_eq!(before.node_for(o), after.node_for(o));
        }
    }

    #[test]
    fn preference_list_is_distinct_and_starts_with_owner() {
        let r = ring(4);
        let o = ObjectId::new("x").expect("valid");
        let list = r.preference_list(&o, 10);
        assert_eq!(list.len(), 4);
        assert_eq!(Some(&list[0]), r.node_for(&o));
        assert!(HashRing::new(0).is_err());
        assert!(HashRing::new(64).expect("valid").node_for(&o).is_none());
    }
}
