//! Batching: right-padded row-major batches with masked padding, the per-epoch example order (a
//! seeded Fisher–Yates permutation that depends only on seed and epoch, so a resumed run replays the
//! same order), and the pad token id (transformers' `tokenizer.pad_token`, else eos).

use std::path::Path;

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokenizers::Tokenizer;

use super::encode::{Example, IGNORE_INDEX};
use super::template::{read_json, special_token};

/// A padded batch of examples.
///
/// Invariants: `input_ids.len() == labels.len() == batch * seq` (row-major, row b at
/// `[b * seq .. (b + 1) * seq]`); `lengths[b]` is row b's real length (≤ seq); positions at or
/// after `lengths[b]` hold `pad_id` and label -100; `seq` is the longest row's length;
/// `segments[b]` = `[0, c₁, …, lengths[b]]`, the boundaries of the examples in row b (one example
/// per row unless packed, see [`super::packing`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// Token ids, b×t row-major.
    pub input_ids: Vec<u32>,
    /// Labels, b×t row-major, -100 on padding.
    pub labels: Vec<i32>,
    /// Real (unpadded) length of each row: the attention length.
    pub lengths: Vec<usize>,
    /// Number of rows b.
    pub batch: usize,
    /// Row length t.
    pub seq: usize,
    /// Per row, the example boundaries `[0, c₁, …, c_n = lengths[b]]` (flash-attn's `cu_seqlens`);
    /// empty means one example per row.
    pub segments: Vec<Vec<usize>>,
}

impl Batch {
    /// Number of supervised positions in the batch.
    pub fn supervised(&self) -> usize {
        self.labels.iter().filter(|&&label| label != IGNORE_INDEX).count()
    }

    /// Padding positions (`batch * seq` minus the real tokens).
    pub fn padding(&self) -> usize {
        self.batch * self.seq - self.lengths.iter().sum::<usize>()
    }

    /// Each row's example boundaries: `segments`, or `[0, lengths[b]]` per row when it is empty.
    pub fn boundaries(&self) -> Vec<Vec<usize>> {
        if !self.segments.is_empty() {
            return self.segments.clone();
        }
        self.lengths.iter().map(|&len| if len == 0 { vec![0] } else { vec![0, len] }).collect()
    }
}

/// Stacks `examples` into a batch right-padded with `pad_id` to the longest one.
pub fn make_batch(examples: &[&Example], pad_id: u32) -> Batch {
    let seq = examples.iter().map(|example| example.input_ids.len()).max().unwrap_or(0);
    let batch = examples.len();
    let mut input_ids = Vec::with_capacity(batch * seq);
    let mut labels = Vec::with_capacity(batch * seq);
    let mut lengths = Vec::with_capacity(batch);
    let mut segments = Vec::with_capacity(batch);
    for example in examples {
        let len = example.input_ids.len();
        input_ids.extend_from_slice(&example.input_ids);
        input_ids.resize(input_ids.len() + (seq - len), pad_id);
        // Labels are padded to the same row length even if an example broke the length invariant.
        let row: Vec<i32> =
            (0..seq).map(|i| example.labels.get(i).copied().filter(|_| i < len).unwrap_or(IGNORE_INDEX)).collect();
        labels.extend(row);
        lengths.push(len);
        segments.push(if len == 0 { vec![0] } else { vec![0, len] });
    }
    Batch { input_ids, labels, lengths, batch, seq, segments }
}

/// The order in which epoch `epoch` visits `n` examples: the identity without `shuffle`, else a
/// Fisher–Yates permutation driven by ChaCha8 keyed with (`seed`, `epoch`).
///
/// A pure function of its arguments (no global RNG, and bounded draws are implemented here rather
/// than taken from `rand`, whose sampling algorithms may change between versions).
pub fn epoch_order(n: usize, seed: u64, epoch: usize, shuffle: bool) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    if !shuffle || n < 2 {
        return order;
    }
    // Key: seed (8 bytes LE) ‖ epoch (8 bytes LE) ‖ a constant tag.
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&(epoch as u64).to_le_bytes());
    key[16..32].copy_from_slice(b"peftkit.epochs.1");
    let mut rng = ChaCha8Rng::from_seed(key);
    for i in (1..n).rev() {
        let j = below(&mut rng, i as u64 + 1) as usize;
        order.swap(i, j);
    }
    order
}

/// A uniform integer in `0..bound` (bound ≥ 1) by Lemire's multiply-and-reject method.
fn below(rng: &mut ChaCha8Rng, bound: u64) -> u64 {
    // Values of the low product below `threshold` would bias the result: redraw them.
    let threshold = bound.wrapping_neg() % bound;
    loop {
        let product = u128::from(rng.next_u64()) * u128::from(bound);
        if (product as u64) >= threshold {
            return (product >> 64) as u64;
        }
    }
}

/// The id to pad with: `pad_token` of tokenizer_config.json, else its `eos_token`; `None` when the
/// config is absent or unreadable or neither token is in the vocabulary.
pub fn pad_token_id(tokenizer: &Tokenizer, tokenizer_config: Option<&Path>) -> Option<u32> {
    let path = tokenizer_config?;
    let config = read_json(path).ok()?;
    ["pad_token", "eos_token"]
        .into_iter()
        .filter_map(|key| special_token(path, &config, key).ok().flatten())
        .find_map(|token| tokenizer.token_to_id(&token))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::testutil::{fixture_dir, fixture_tokenizer};

    #[test]
    fn batch_pads_right_with_masked_labels() {
        let a = Example { input_ids: vec![5, 6, 7], labels: vec![-100, 6, 7] };
        let b = Example { input_ids: vec![8], labels: vec![8] };
        let batch = make_batch(&[&a, &b], 0);
        assert_eq!((batch.batch, batch.seq), (2, 3));
        assert_eq!(batch.input_ids, vec![5, 6, 7, 8, 0, 0]);
        assert_eq!(batch.labels, vec![-100, 6, 7, 8, -100, -100]);
        assert_eq!(batch.lengths, vec![3, 1]);
        assert_eq!(batch.segments, vec![vec![0, 3], vec![0, 1]]);
        assert_eq!(batch.padding(), 2);
        assert_eq!(batch.supervised(), 3);
        let empty = make_batch(&[], 0);
        assert_eq!((empty.batch, empty.seq, empty.input_ids.len()), (0, 0, 0));
    }

    #[test]
    fn epoch_order_is_a_deterministic_permutation() {
        let first = epoch_order(100, 42, 3, true);
        assert_eq!(first, epoch_order(100, 42, 3, true));
        let mut sorted = first.clone();
        sorted.sort();
        assert_eq!(sorted, (0..100).collect::<Vec<_>>());
        assert_ne!(first, (0..100).collect::<Vec<_>>());
        assert_ne!(first, epoch_order(100, 42, 4, true));
        assert_ne!(first, epoch_order(100, 43, 3, true));
        assert_eq!(epoch_order(5, 42, 3, false), vec![0, 1, 2, 3, 4]);
        assert_eq!(epoch_order(0, 1, 0, true), Vec::<usize>::new());
        assert_eq!(epoch_order(1, 1, 0, true), vec![0]);
        // Pinned: a change here changes resumed runs' data order.
        assert_eq!(epoch_order(8, 0, 0, true), PINNED);
    }

    const PINNED: [usize; 8] = [7, 1, 2, 4, 5, 3, 0, 6];

    #[test]
    fn below_is_roughly_uniform() {
        let mut rng = ChaCha8Rng::from_seed([7; 32]);
        let mut counts = [0usize; 3];
        for _ in 0..30_000 {
            counts[below(&mut rng, 3) as usize] += 1;
        }
        assert!(counts.iter().all(|&c| (9_000..11_000).contains(&c)), "{counts:?}");
    }

    #[test]
    fn pad_token_from_config_then_eos() {
        let tokenizer = fixture_tokenizer();
        let config = fixture_dir().join("tokenizer_config.json");
        assert_eq!(pad_token_id(&tokenizer, Some(&config)), tokenizer.token_to_id("<|endoftext|>"));
        let dir = tempfile::tempdir().unwrap();
        let only_eos = dir.path().join("tokenizer_config.json");
        std::fs::write(&only_eos, r#"{"pad_token": null, "eos_token": {"content": "<|im_end|>"}}"#).unwrap();
        assert_eq!(pad_token_id(&tokenizer, Some(&only_eos)), tokenizer.token_to_id("<|im_end|>"));
        assert_eq!(pad_token_id(&tokenizer, None), None);
    }
}
