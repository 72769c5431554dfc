//! Laying examples into batch rows: sample packing, length grouping, and the packed batch.
//!
//! - [`pack`]: several examples per row, up to `capacity` tokens, by best-fit decreasing (each example, longest
//!   first, goes into the open row with the least room that still fits it, else a new row). Ties in length are
//!   broken by a seeded permutation, so the packing is a pure function of (lengths, capacity, seed). No example is
//!   split across rows and none is lost; rows come out in the order they were opened. TRL's `pack_dataset`
//!   (strategy `bfd`) packs the same way.
//! - [`group_by_length`]: transformers' `LengthGroupedSampler` (`group_by_length=True`): the epoch's
//!   permutation cut into mega-batches of 50 optimizer steps' worth of rows, each sorted by length (longest
//!   first), and the longest row of all moved to the very front (so an out-of-memory shows at once).
//! - [`make_packed_batch`]: rows of examples → a right-padded [`Batch`] whose `segments` give each row's example
//!   boundaries (flash-attn's `cu_seqlens` per row). The first label of every example after the first in a row is
//!   set to -100: the last token of one example does not predict the first of the next (it is never predicted
//!   in an unpacked batch either, having no position before it), so packed and unpacked batches hold the same
//!   next-token targets.

use std::collections::BTreeSet;

use super::batch::{epoch_order, Batch};
use super::encode::{Example, IGNORE_INDEX};

/// transformers' `megabatch_mult`: a mega-batch holds this many optimizer steps' worth of rows.
pub const MEGABATCH_MULT: usize = 50;

/// Packs examples of the given `lengths` into rows of at most `capacity` tokens (best-fit decreasing, ties broken
/// by a permutation seeded with `seed`). Returns, per row, the example indices in the order they were placed.
/// An example longer than `capacity` (none after truncation to `sequence_len`) gets a row of its own.
pub fn pack(lengths: &[usize], capacity: usize, seed: u64) -> Vec<Vec<usize>> {
    // Longest first; among equal lengths, the seeded permutation's order.
    let tiebreak = epoch_order(lengths.len(), seed, 0, true);
    let mut rank = vec![0usize; lengths.len()];
    for (position, &index) in tiebreak.iter().enumerate() {
        rank[index] = position;
    }
    let mut items: Vec<usize> = (0..lengths.len()).collect();
    items.sort_by_key(|&i| (std::cmp::Reverse(lengths[i]), rank[i]));

    let mut rows: Vec<Vec<usize>> = Vec::new();
    let mut used: Vec<usize> = Vec::new();
    // Open rows by (room left, row index): the best fit is the first entry with room ≥ the length.
    let mut open: BTreeSet<(usize, usize)> = BTreeSet::new();
    for i in items {
        let len = lengths[i];
        let row = match open.range((len, 0)..).next().copied() {
            Some(entry) => {
                open.remove(&entry);
                entry.1
            }
            None => {
                rows.push(Vec::new());
                used.push(0);
                rows.len() - 1
            }
        };
        rows[row].push(i);
        used[row] += len;
        let room = capacity.saturating_sub(used[row]);
        if room > 0 {
            open.insert((room, row));
        }
    }
    rows
}

/// transformers' `get_length_grouped_indices`: `order` (the epoch's permutation of rows) cut into mega-batches of
/// `megabatch` rows, each sorted by `lengths` (longest first, stable), and the first row of the mega-batch with
/// the longest row swapped with the very first row.
pub fn group_by_length(order: &[usize], lengths: &[usize], megabatch: usize) -> Vec<usize> {
    let mut groups: Vec<Vec<usize>> = order
        .chunks(megabatch.max(1))
        .map(|chunk| {
            let mut group = chunk.to_vec();
            group.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
            group
        })
        .collect();
    // The mega-batch whose first (longest) row is the longest of all, first max wins as with torch.argmax.
    let longest = groups
        .iter()
        .enumerate()
        .fold(None, |best: Option<(usize, usize)>, (g, group)| {
            let len = lengths[group[0]];
            match best {
                Some((_, best_len)) if best_len >= len => best,
                _ => Some((g, len)),
            }
        })
        .map(|(g, _)| g);
    if let Some(g) = longest.filter(|&g| g > 0) {
        let (head, tail) = groups.split_at_mut(g);
        std::mem::swap(&mut head[0][0], &mut tail[0][0]);
    }
    groups.concat()
}

/// Stacks rows of examples (each row's examples back to back) into a batch right-padded with `pad_id` to the
/// longest row; `segments` records each row's example boundaries.
pub fn make_packed_batch(rows: &[Vec<&Example>], pad_id: u32) -> Batch {
    let lengths: Vec<usize> = rows.iter().map(|row| row.iter().map(|example| example.len()).sum()).collect();
    let seq = lengths.iter().copied().max().unwrap_or(0);
    let batch = rows.len();
    let mut input_ids = Vec::with_capacity(batch * seq);
    let mut labels = Vec::with_capacity(batch * seq);
    let mut segments = Vec::with_capacity(batch);
    for row in rows {
        let mut bounds = vec![0];
        for (k, example) in row.iter().enumerate() {
            let len = example.len();
            input_ids.extend_from_slice(&example.input_ids);
            // Labels follow the ids even if an example broke the length invariant.
            labels.extend((0..len).map(|i| match example.labels.get(i) {
                // Nothing before an example's first token belongs to it: no target across the boundary.
                Some(_) if i == 0 && k > 0 => IGNORE_INDEX,
                Some(&label) => label,
                None => IGNORE_INDEX,
            }));
            bounds.push(bounds[bounds.len() - 1] + len);
        }
        let len = bounds[bounds.len() - 1];
        input_ids.resize(input_ids.len() + (seq - len), pad_id);
        labels.resize(labels.len() + (seq - len), IGNORE_INDEX);
        // Empty examples add no boundary (segments are non-empty).
        bounds.dedup();
        segments.push(bounds);
    }
    Batch { input_ids, labels, lengths, batch, seq, segments }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example(len: usize, first: u32) -> Example {
        let ids: Vec<u32> = (0..len as u32).map(|i| first + i).collect();
        Example { labels: ids.iter().map(|&id| id as i32).collect(), input_ids: ids }
    }

    #[test]
    fn packing_keeps_every_example_whole_and_is_deterministic() {
        let lengths: Vec<usize> = (0..200).map(|i| 1 + (i * 37 + i * i * 11) % 60).collect();
        let capacity = 64;
        let rows = pack(&lengths, capacity, 7);
        // None lost, none twice.
        let mut seen: Vec<usize> = rows.concat();
        seen.sort();
        assert_eq!(seen, (0..lengths.len()).collect::<Vec<_>>());
        // No row over capacity (so no example split), no row empty.
        for row in &rows {
            assert!(!row.is_empty());
            assert!(row.iter().map(|&i| lengths[i]).sum::<usize>() <= capacity, "{row:?}");
        }
        // Best-fit decreasing is near the lower bound: the tokens over the capacity, or the examples longer than
        // half of it (no two share a row), whichever is more.
        let total: usize = lengths.iter().sum();
        let lower = total.div_ceil(capacity).max(lengths.iter().filter(|&&l| 2 * l > capacity).count());
        assert!(rows.len() as f64 <= 1.15 * lower as f64, "{} rows, lower bound {lower}", rows.len());
        // A pure function of (lengths, capacity, seed); the seed only reorders equal lengths.
        assert_eq!(rows, pack(&lengths, capacity, 7));
        let other = pack(&lengths, capacity, 8);
        let sizes = |rows: &[Vec<usize>]| rows.iter().map(|r| r.iter().map(|&i| lengths[i]).collect()).collect();
        let (a, b): (Vec<Vec<usize>>, Vec<Vec<usize>>) = (sizes(&rows), sizes(&other));
        assert_eq!(a, b);
        assert_ne!(rows, other);
        // Pinned: a change here changes packed runs (and their resume fingerprints).
        assert_eq!(pack(&[3, 5, 2, 4, 1, 5], 8, 0), vec![vec![1, 0], vec![5, 2, 4], vec![3]]);
        // Longer than the capacity: a row of its own. Nothing to pack: no rows.
        assert_eq!(pack(&[10, 2], 8, 0), vec![vec![0], vec![1]]);
        assert!(pack(&[], 8, 0).is_empty());
    }

    #[test]
    fn packed_batch_marks_boundaries_and_pads_only_at_the_end() {
        let (a, b, c) = (example(3, 10), example(2, 20), example(4, 30));
        let batch = make_packed_batch(&[vec![&a, &b], vec![&c]], 0);
        assert_eq!((batch.batch, batch.seq), (2, 5));
        assert_eq!(batch.input_ids, vec![10, 11, 12, 20, 21, 30, 31, 32, 33, 0]);
        // b's first token is not a target of a's last one.
        assert_eq!(batch.labels, vec![10, 11, 12, -100, 21, 30, 31, 32, 33, -100]);
        assert_eq!(batch.lengths, vec![5, 4]);
        assert_eq!(batch.segments, vec![vec![0, 3, 5], vec![0, 4]]);
        // One example per row is the plain batch.
        let plain = super::super::make_batch(&[&a, &c], 0);
        assert_eq!(make_packed_batch(&[vec![&a], vec![&c]], 0), plain);
    }

    #[test]
    fn length_groups_follow_transformers() {
        let lengths = [5, 1, 9, 3, 7, 2, 8, 4];
        let order: Vec<usize> = (0..8).collect();
        // Mega-batches of 3: [0 1 2] → [2 0 1], [3 4 5] → [4 3 5], [6 7] → [6 7]; the longest (9) is already first.
        assert_eq!(group_by_length(&order, &lengths, 3), vec![2, 0, 1, 4, 3, 5, 6, 7]);
        // The longest in a later mega-batch trades places with the very first row.
        let order = vec![3, 4, 5, 0, 1, 2, 6, 7];
        assert_eq!(group_by_length(&order, &lengths, 3), vec![2, 3, 5, 4, 0, 1, 6, 7]);
        assert!(group_by_length(&[], &lengths, 3).is_empty());
    }
}
