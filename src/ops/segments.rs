//! Per-row example boundaries of a batch, for packed sequences: row r of a (b, t) batch holds examples at
//! `[c₀, c₁), [c₁, c₂), …, [c_{n−1}, c_n)` with c₀ = 0 and c_n ≤ t (the positions from c_n to t are padding).
//! This is flash-attn's varlen `cu_seqlens`, one list per row. Attention is block-diagonal causal over these
//! segments (query i sees key j iff both lie in one segment and j ≤ i), RoPE positions restart at 0 in each
//! segment, and padding positions see nothing (their attention output is 0).
//!
//! An unpacked batch is the special case of one segment per row, `[0, len_r)`.
//! Reference: Dao, flash-attn `flash_attn_varlen_func` (cu_seqlens); transformers'
//! `DataCollatorWithFlattening` (position ids restarting per example).

use candle_core::{Device, Result, Tensor};

/// The segment boundaries of every row of a (b, t) batch.
///
/// Invariants (checked by [`Segments::new`]): one boundary list per row, each starting at 0, strictly
/// increasing, ending at most at t.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segments {
    bounds: Vec<Vec<usize>>,
    t: usize,
}

impl Segments {
    /// Segments from per-row cumulative lengths (`[0, c₁, …, c_n]` per row) for rows of length `t`.
    pub fn new(bounds: Vec<Vec<usize>>, t: usize) -> Result<Self> {
        for (r, row) in bounds.iter().enumerate() {
            let ok = row.first() == Some(&0)
                && row.windows(2).all(|w| w[0] < w[1])
                && row.last().is_some_and(|&end| end <= t);
            if !ok {
                candle_core::bail!(
                    "segments: row {r} has boundaries {row:?}; expected 0 = c₀ < c₁ < … ≤ {t} (the row length)"
                );
            }
        }
        Ok(Self { bounds, t })
    }

    /// One segment per row, `[0, lengths[r])`: an unpacked, right-padded batch.
    pub fn from_lengths(lengths: &[usize], t: usize) -> Result<Self> {
        Self::new(lengths.iter().map(|&len| if len == 0 { vec![0] } else { vec![0, len] }).collect(), t)
    }

    /// Number of rows b.
    pub fn rows(&self) -> usize {
        self.bounds.len()
    }

    /// Row length t.
    pub fn seq(&self) -> usize {
        self.t
    }

    /// The segments `[start, end)` of row `r`, in order.
    pub fn of_row(&self, r: usize) -> impl Iterator<Item = (usize, usize)> + '_ {
        self.bounds[r].windows(2).map(|w| (w[0], w[1]))
    }

    /// True when no row holds more than one segment: RoPE positions are then 0..t in every row.
    pub fn one_per_row(&self) -> bool {
        self.bounds.iter().all(|row| row.len() <= 2)
    }

    /// For every position (b·t, row-major) the first key it may see: its segment's start, or itself for a
    /// padding position (a one-key window, so that a masked softmax row is never empty).
    pub fn first_key(&self) -> Vec<u32> {
        let mut out = Vec::with_capacity(self.bounds.len() * self.t);
        for row in &self.bounds {
            let mut seg = 0;
            for i in 0..self.t {
                while seg + 1 < row.len() && i >= row[seg + 1] {
                    seg += 1;
                }
                out.push(if seg + 1 < row.len() { row[seg] as u32 } else { i as u32 });
            }
        }
        out
    }

    /// 1.0 for positions inside a segment, 0.0 for padding: (b·t), row-major.
    pub fn valid(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.bounds.len() * self.t);
        for row in &self.bounds {
            let end = row.last().copied().unwrap_or(0);
            out.extend((0..self.t).map(|i| if i < end { 1.0 } else { 0.0 }));
        }
        out
    }

    /// RoPE position of every position (b·t, row-major): its offset in its segment; padding continues
    /// counting from the row's end (its value does not matter: nothing attends to padding).
    pub fn positions(&self) -> Vec<usize> {
        let mut out = Vec::with_capacity(self.bounds.len() * self.t);
        for row in &self.bounds {
            let mut seg = 0;
            for i in 0..self.t {
                while seg + 1 < row.len() && i >= row[seg + 1] {
                    seg += 1;
                }
                out.push(i - row[seg]);
            }
        }
        out
    }

    /// [`Segments::first_key`] (u32) and [`Segments::valid`] (f32) as (b, t) tensors on `device`.
    pub(crate) fn masks_on(&self, device: &Device) -> Result<(Tensor, Tensor)> {
        let shape = (self.bounds.len(), self.t);
        Ok((Tensor::from_vec(self.first_key(), shape, device)?, Tensor::from_vec(self.valid(), shape, device)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boundaries_positions_and_masks() {
        let s = Segments::new(vec![vec![0, 2, 5], vec![0, 3]], 6).unwrap();
        assert_eq!(s.of_row(0).collect::<Vec<_>>(), vec![(0, 2), (2, 5)]);
        assert_eq!(s.positions(), vec![0, 1, 0, 1, 2, 0, 0, 1, 2, 0, 1, 2]);
        assert_eq!(s.first_key(), vec![0, 0, 2, 2, 2, 5, 0, 0, 0, 3, 4, 5]);
        assert_eq!(s.valid(), vec![1., 1., 1., 1., 1., 0., 1., 1., 1., 0., 0., 0.]);
        assert!(!s.one_per_row());
        assert!(Segments::from_lengths(&[4, 0], 4).unwrap().one_per_row());
        for bad in [vec![vec![1, 2]], vec![vec![0, 2, 2]], vec![vec![0, 7]], vec![vec![]]] {
            assert!(Segments::new(bad, 6).is_err());
        }
    }
}
