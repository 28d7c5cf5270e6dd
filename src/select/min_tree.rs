//! A segment tree of `u64` keys by index that finds, in O(log n), the
//! lowest index whose key is at most a bound, and the lowest index holding
//! the smallest key. The client table uses it to pick slots as Pen's linear
//! scan does, without scanning.

/// Keys for indices `0..len`, each inner node holding its subtree's minimum.
#[derive(Clone, Debug)]
pub(super) struct MinTree {
    /// Leaf count: `len` rounded up to a power of two.
    leaves: usize,
    /// `nodes[1]` is the root, `nodes[2k]`/`nodes[2k+1]` the children of `k`,
    /// leaf `i` at `leaves + i`. Padding leaves hold `u64::MAX` and, being to
    /// the right of every real leaf, are never the leftmost match.
    nodes: Vec<u64>,
}

impl MinTree {
    /// `len` (at least 1) indices, all with key `fill`.
    pub(super) fn new(len: usize, fill: u64) -> Self {
        let len = len.max(1);
        let leaves = len.next_power_of_two();
        let mut nodes = vec![u64::MAX; 2 * leaves];
        nodes[leaves..leaves + len].fill(fill);
        for node in (1..leaves).rev() {
            nodes[node] = nodes[2 * node].min(nodes[2 * node + 1]);
        }
        MinTree { leaves, nodes }
    }

    pub(super) fn set(&mut self, index: usize, key: u64) {
        let mut node = self.leaves + index;
        self.nodes[node] = key;
        while node > 1 {
            node /= 2;
            let min = self.nodes[2 * node].min(self.nodes[2 * node + 1]);
            if self.nodes[node] == min {
                break; // nothing above changes either
            }
            self.nodes[node] = min;
        }
    }

    /// The lowest index whose key is `<= bound`.
    pub(super) fn first_at_most(&self, bound: u64) -> Option<usize> {
        if self.nodes[1] > bound {
            return None;
        }
        let mut node = 1;
        while node < self.leaves {
            node = if self.nodes[2 * node] <= bound {
                2 * node
            } else {
                2 * node + 1
            };
        }
        Some(node - self.leaves)
    }

    /// The lowest index holding the smallest key.
    pub(super) fn first_min(&self) -> usize {
        let mut node = 1;
        while node < self.leaves {
            node = if self.nodes[2 * node] == self.nodes[node] {
                2 * node
            } else {
                2 * node + 1
            };
        }
        node - self.leaves
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The answers by brute force, to compare with.
    fn naive_at_most(keys: &[u64], bound: u64) -> Option<usize> {
        keys.iter().position(|&k| k <= bound)
    }

    fn naive_min(keys: &[u64]) -> usize {
        let min = keys.iter().min().unwrap();
        keys.iter().position(|k| k == min).unwrap()
    }

    #[test]
    fn single_index() {
        let mut t = MinTree::new(1, 7);
        assert_eq!(
            (t.first_at_most(6), t.first_at_most(7), t.first_min()),
            (None, Some(0), 0)
        );
        t.set(0, 3);
        assert_eq!(t.first_at_most(3), Some(0));
    }

    #[test]
    fn matches_a_linear_scan() {
        // A small deterministic pseudo-random walk over keys and bounds.
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let mut rand = move |n: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % n
        };
        for len in [1, 2, 3, 5, 8, 13] {
            let mut keys = vec![0u64; len];
            let mut t = MinTree::new(len, 0);
            for _ in 0..500 {
                let i = rand(len as u64) as usize;
                keys[i] = rand(10);
                t.set(i, keys[i]);
                let bound = rand(10);
                assert_eq!(t.first_at_most(bound), naive_at_most(&keys, bound));
                assert_eq!(t.first_min(), naive_min(&keys));
            }
        }
    }

    #[test]
    fn keys_at_the_maximum_still_beat_padding() {
        let mut t = MinTree::new(3, u64::MAX);
        assert_eq!((t.first_min(), t.first_at_most(u64::MAX)), (0, Some(0)));
        t.set(0, 5);
        t.set(2, 5);
        assert_eq!(t.first_at_most(u64::MAX - 1), Some(0));
        t.set(0, u64::MAX);
        assert_eq!(t.first_min(), 2);
    }
}
