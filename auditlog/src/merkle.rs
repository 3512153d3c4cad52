//! RFC 6962 / RFC 9162 Merkle trees over a writer's rows: the leaf of a row is
//! `SHA-256(0x00 || row hash)` and an inner node `SHA-256(0x01 || left || right)`, so that any
//! Certificate Transparency or C2SP `tlog` tool checks keygate's roots and proofs.
//!
//! Invariants: the tree of a writer's table holds its rows in `seq` order as they are in the lake,
//! leaf `i` being the `i`-th row (`seq - 1` while the chain has no gap); a [`Frontier`] (the
//! roots of the perfect subtrees covering leaves `0..size`, largest first, one per set bit of
//! `size`) is all the writer keeps, so appending a leaf costs one leaf hash plus on average one
//! node hash and no memory grows with the tree.
//!
//! Why not Cloudflare's `tlog_tiles` / `signed_note` crates: they would bring a second `base64`
//! (0.21, the workspace has 0.22) and `thiserror` 1 into keygate itself, and keygate needs only
//! the four algorithms below (append, root, inclusion and consistency proofs with their checks),
//! which RFC 9162 §2.1 specifies in a page each; the RFC 6962 reference tree's known answers are
//! among the tests.

use sha2::{Digest, Sha256};

/// A SHA-256 tree hash.
pub type Hash = [u8; 32];

/// The hash of a leaf whose data is `data` (a row's 32-byte chain hash).
pub fn leaf_hash(data: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update([0u8]);
    h.update(data);
    h.finalize().into()
}

/// The hash of an inner node.
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update([1u8]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// The root of the empty tree, `SHA-256("")`.
pub fn empty_root() -> Hash {
    Sha256::digest([]).into()
}

/// The compact range `[0, size)` of a tree: enough to append leaves and compute the root.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Frontier {
    size: u64,
    /// Roots of the perfect subtrees, largest (leftmost) first.
    nodes: Vec<Hash>,
}

impl Frontier {
    /// The empty tree.
    pub fn new() -> Frontier {
        Frontier::default()
    }

    /// A frontier as stored (size and subtree roots); `None` when the number of roots does not
    /// match the size.
    pub fn from_parts(size: u64, nodes: Vec<Hash>) -> Option<Frontier> {
        (nodes.len() == size.count_ones() as usize).then_some(Frontier { size, nodes })
    }

    /// Number of leaves.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The subtree roots, largest first.
    pub fn nodes(&self) -> &[Hash] {
        &self.nodes
    }

    /// Appends the leaf of a row whose chain hash is `row_hash`.
    pub fn push_row(&mut self, row_hash: &Hash) {
        self.push_leaf(leaf_hash(row_hash));
    }

    /// Appends a leaf hash.
    pub fn push_leaf(&mut self, leaf: Hash) {
        let mut h = leaf;
        let mut s = self.size;
        while s & 1 == 1 {
            // A set low bit is a perfect subtree of the same height to the left: merge.
            let Some(left) = self.nodes.pop() else { break };
            h = node_hash(&left, &h);
            s >>= 1;
        }
        self.nodes.push(h);
        self.size += 1;
    }

    /// The tree's root.
    pub fn root(&self) -> Hash {
        let mut it = self.nodes.iter().rev();
        let Some(last) = it.next() else { return empty_root() };
        it.fold(*last, |acc, left| node_hash(left, &acc))
    }
}

/// The root of the tree over `leaves` (leaf hashes).
pub fn root_of(leaves: &[Hash]) -> Hash {
    match leaves.len() {
        0 => empty_root(),
        1 => leaves[0],
        n => {
            let k = split(n as u64) as usize;
            node_hash(&root_of(&leaves[..k]), &root_of(&leaves[k..]))
        }
    }
}

/// Largest power of two smaller than `n` (`n >= 2`).
fn split(n: u64) -> u64 {
    1u64 << (63 - (n - 1).leading_zeros())
}

/// The inclusion proof of leaf `index` in the tree over `leaves` (RFC 6962 §2.1.1 `PATH`),
/// `None` when `index` is outside it.
pub fn inclusion_proof(leaves: &[Hash], index: u64) -> Option<Vec<Hash>> {
    if index >= leaves.len() as u64 {
        return None;
    }
    let mut out = Vec::new();
    path(leaves, index as usize, &mut out);
    Some(out)
}

fn path(leaves: &[Hash], m: usize, out: &mut Vec<Hash>) {
    let n = leaves.len();
    if n <= 1 {
        return;
    }
    let k = split(n as u64) as usize;
    if m < k {
        path(&leaves[..k], m, out);
        out.push(root_of(&leaves[k..]));
    } else {
        path(&leaves[k..], m - k, out);
        out.push(root_of(&leaves[..k]));
    }
}

/// Checks an inclusion proof (RFC 9162 §2.1.3.2): that `leaf` is leaf `index` of the tree of
/// `size` leaves whose root is `root`.
pub fn verify_inclusion(leaf: &Hash, index: u64, size: u64, proof: &[Hash], root: &Hash) -> bool {
    if index >= size {
        return false;
    }
    let (mut fnode, mut snode) = (index, size - 1);
    let mut r = *leaf;
    for p in proof {
        if snode == 0 {
            return false;
        }
        if fnode & 1 == 1 || fnode == snode {
            r = node_hash(p, &r);
            if fnode & 1 == 0 {
                while fnode & 1 == 0 && fnode != 0 {
                    fnode >>= 1;
                    snode >>= 1;
                }
            }
        } else {
            r = node_hash(&r, p);
        }
        fnode >>= 1;
        snode >>= 1;
    }
    snode == 0 && r == *root
}

/// The consistency proof from the tree of the first `old_size` of `leaves` to the tree of all of
/// them (RFC 6962 §2.1.2 `PROOF`), `None` when `old_size` exceeds it.
pub fn consistency_proof(leaves: &[Hash], old_size: u64) -> Option<Vec<Hash>> {
    if old_size > leaves.len() as u64 {
        return None;
    }
    let mut out = Vec::new();
    if old_size > 0 && old_size < leaves.len() as u64 {
        subproof(old_size as usize, leaves, true, &mut out);
    }
    Some(out)
}

fn subproof(m: usize, leaves: &[Hash], whole: bool, out: &mut Vec<Hash>) {
    let n = leaves.len();
    if m == n {
        if !whole {
            out.push(root_of(leaves));
        }
        return;
    }
    let k = split(n as u64) as usize;
    if m <= k {
        subproof(m, &leaves[..k], whole, out);
        out.push(root_of(&leaves[k..]));
    } else {
        subproof(m - k, &leaves[k..], false, out);
        out.push(root_of(&leaves[..k]));
    }
}

/// Checks a consistency proof (RFC 9162 §2.1.4.2): that the tree of `old_size` leaves with root
/// `old_root` is a prefix of the tree of `new_size` leaves with root `new_root`.
pub fn verify_consistency(old_size: u64, new_size: u64, old_root: &Hash, new_root: &Hash, proof: &[Hash]) -> bool {
    if old_size > new_size {
        return false;
    }
    if old_size == new_size {
        return proof.is_empty() && old_root == new_root;
    }
    if old_size == 0 {
        return proof.is_empty();
    }
    let mut proof: Vec<Hash> = proof.to_vec();
    if old_size.is_power_of_two() {
        proof.insert(0, *old_root);
    }
    let Some((first, rest)) = proof.split_first() else { return false };
    let (mut fnode, mut snode) = (old_size - 1, new_size - 1);
    while fnode & 1 == 1 {
        fnode >>= 1;
        snode >>= 1;
    }
    let (mut fr, mut sr) = (*first, *first);
    for c in rest {
        if snode == 0 {
            return false;
        }
        if fnode & 1 == 1 || fnode == snode {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            if fnode & 1 == 0 {
                while fnode & 1 == 0 && fnode != 0 {
                    fnode >>= 1;
                    snode >>= 1;
                }
            }
        } else {
            sr = node_hash(&sr, c);
        }
        fnode >>= 1;
        snode >>= 1;
    }
    snode == 0 && fr == *old_root && sr == *new_root
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn leaves(n: usize) -> Vec<Hash> {
        (0..n).map(|i| leaf_hash(&Sha256::digest((i as u64).to_be_bytes()))).collect()
    }

    #[test]
    fn frontier_root_equals_the_recursive_root_at_every_size() {
        let l = leaves(70);
        let mut f = Frontier::new();
        assert_eq!(f.root(), empty_root());
        for (i, leaf) in l.iter().enumerate() {
            f.push_leaf(*leaf);
            assert_eq!(f.root(), root_of(&l[..=i]), "size {}", i + 1);
            let again = Frontier::from_parts(f.size(), f.nodes().to_vec()).unwrap();
            assert_eq!(again, f);
        }
        assert!(Frontier::from_parts(3, vec![[0; 32]]).is_none());
    }

    #[test]
    fn inclusion_proofs_verify_and_fail_when_anything_changes() {
        let l = leaves(37);
        for n in 1..=l.len() {
            let root = root_of(&l[..n]);
            for (i, leaf) in l[..n].iter().enumerate() {
                let p = inclusion_proof(&l[..n], i as u64).unwrap();
                assert!(verify_inclusion(leaf, i as u64, n as u64, &p, &root), "{i} of {n}");
                let other = (i + 1) % n;
                if other != i {
                    assert!(!verify_inclusion(&l[other], i as u64, n as u64, &p, &root));
                    assert!(!verify_inclusion(leaf, other as u64, n as u64, &p, &root));
                }
                for (j, _) in p.iter().enumerate() {
                    let mut bad = p.clone();
                    bad[j][0] ^= 1;
                    assert!(!verify_inclusion(leaf, i as u64, n as u64, &bad, &root));
                }
                // (The size is bound by the signed checkpoint, not by the path: a path can fit
                // another size, RFC 9162 binds only leaf, index, size and root together.)
                assert!(!verify_inclusion(leaf, n as u64, n as u64, &p, &root));
            }
        }
    }

    #[test]
    fn consistency_proofs_verify_and_fail_for_a_forked_history() {
        let l = leaves(33);
        let mut forked = l.clone();
        forked[5][0] ^= 1;
        for n in 1..=l.len() {
            for m in 1..=n {
                let p = consistency_proof(&l[..n], m as u64).unwrap();
                let (old, new) = (root_of(&l[..m]), root_of(&l[..n]));
                assert!(verify_consistency(m as u64, n as u64, &old, &new, &p), "{m} -> {n}");
                if m > 5 || n > 5 {
                    let forked_new = root_of(&forked[..n]);
                    let fp = consistency_proof(&forked[..n], m as u64).unwrap();
                    if m > 5 {
                        assert!(!verify_consistency(m as u64, n as u64, &old, &forked_new, &fp), "{m} -> {n}");
                    }
                }
            }
        }
    }

    #[test]
    fn known_answer_from_rfc6962_test_vectors() {
        // The CT reference tree of 8 leaves (certificate-transparency-go merkletree test data).
        let data: [&[u8]; 8] = [
            b"",
            b"\x00",
            b"\x10",
            b"\x20\x21",
            b"\x30\x31",
            b"\x40\x41\x42\x43",
            b"\x50\x51\x52\x53\x54\x55\x56\x57",
            b"\x60\x61\x62\x63\x64\x65\x66\x67\x68\x69\x6a\x6b\x6c\x6d\x6e\x6f",
        ];
        let l: Vec<Hash> = data.into_iter().map(leaf_hash).collect();
        assert_eq!(hex::encode(root_of(&l)), "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328");
        assert_eq!(hex::encode(root_of(&l[..1])), "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d");
    }
}
