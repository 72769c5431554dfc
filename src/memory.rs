//! How much memory a run will need, estimated before it allocates, against what the machine can give.
//!
//! A typo such as `micro_batch_size: 1000000` or `bench --seq 1000000000` would otherwise end in an allocation
//! failure (an abort, exit 134) or in a machine swapping for hours. [`check`] refuses a run whose estimate exceeds
//! the memory available (exit 2 with the figures) and warns when it takes most of it.
//!
//! The estimate is deliberately a floor, not a ceiling: it counts what a training step must hold at once (trainable
//! parameters with their gradients and AdamW moments, the activations kept for the backward pass, one chunk of
//! logits) and, where the caller has not loaded them yet, the frozen weights. Allocator slack and temporary
//! buffers come on top, so a run just under the limit may still fail; one over it cannot succeed.

use crate::model::ModelConfig;

/// The parts of a run's memory, in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Estimate {
    /// Frozen base weights not yet in memory (0 when the model is already loaded).
    pub weights: f64,
    /// Trainable parameters, their gradients and the optimizer's two moments (all f32).
    pub trainable: f64,
    /// Activations kept between the forward and the backward pass.
    pub activations: f64,
}

impl Estimate {
    /// The sum of the parts.
    pub fn total(&self) -> f64 {
        self.weights + self.trainable + self.activations
    }
}

/// The shape of a training step.
#[derive(Debug, Clone, Copy)]
pub struct StepShape {
    /// Rows per micro-batch.
    pub batch: usize,
    /// Tokens per row.
    pub seq: usize,
    /// Bytes per activation element (4 for f32, 2 for bf16).
    pub activation_bytes: usize,
    /// Only each decoder layer's input is kept; one layer's activations are recomputed at a time.
    pub gradient_checkpointing: bool,
}

/// The estimate for training `trainable_params` parameters on `config` with steps of `shape`; `weight_bytes` is the
/// size of the frozen weights still to be allocated (0 when they are loaded already).
pub fn training(config: &ModelConfig, trainable_params: usize, shape: StepShape, weight_bytes: f64) -> Estimate {
    let tokens = shape.batch as f64 * shape.seq as f64;
    let h = config.hidden_size as f64;
    let q = (config.num_attention_heads * config.head_dim) as f64;
    let kv = (config.num_key_value_heads * config.head_dim) as f64;
    let i = config.intermediate_size as f64;
    // Per token and layer, what the backward pass reads: the layer input and the two norms' outputs (3h), q, k, v
    // before and after rotary embeddings (2q + 4kv), the attention output (q), the MLP's gate, up and their product
    // (3i) — the projections' inputs and the element-wise ops' operands.
    let per_layer = 3.0 * h + 3.0 * q + 4.0 * kv + 3.0 * i;
    let layers = config.num_hidden_layers as f64;
    let kept = if shape.gradient_checkpointing { h * layers + per_layer } else { per_layer * layers };
    // The final norm and the hidden states entering the fused head + loss, and one chunk of f32 logits.
    let head = 2.0 * h * shape.activation_bytes as f64 + 128.0 * config.vocab_size as f64 * 4.0 / tokens.max(1.0);
    Estimate {
        weights: weight_bytes,
        trainable: trainable_params as f64 * 4.0 * 4.0,
        activations: tokens * (kept * shape.activation_bytes as f64 + head),
    }
}

/// Parameters of `config`'s frozen weights: embeddings (and an untied head) and every decoder layer's projections.
pub fn base_params(config: &ModelConfig) -> f64 {
    let h = config.hidden_size as f64;
    let q = (config.num_attention_heads * config.head_dim) as f64;
    let kv = (config.num_key_value_heads * config.head_dim) as f64;
    let i = config.intermediate_size as f64;
    let embed = config.vocab_size as f64 * h * if config.tie_word_embeddings { 1.0 } else { 2.0 };
    embed + config.num_hidden_layers as f64 * (2.0 * h * q + 2.0 * h * kv + 3.0 * h * i)
}

/// Parameters of a rank-`r` LoRA adapter on every projection of `config` (A: r × in, B: out × r).
pub fn lora_params(config: &ModelConfig, r: usize) -> f64 {
    let h = config.hidden_size as f64;
    let q = (config.num_attention_heads * config.head_dim) as f64;
    let kv = (config.num_key_value_heads * config.head_dim) as f64;
    let i = config.intermediate_size as f64;
    let per_layer = 2.0 * (h + q) + 2.0 * (h + kv) + 3.0 * (h + i);
    r as f64 * config.num_hidden_layers as f64 * per_layer
}

/// Bytes of memory this process can still take: the kernel's `MemAvailable`, lowered to a cgroup's limit (a
/// container's `memory.max`) when that is smaller. `None` where neither can be read (not Linux).
pub fn available() -> Option<f64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib = |key: &str| -> Option<f64> {
        let line = meminfo.lines().find(|l| l.starts_with(key))?;
        line.split_whitespace().nth(1)?.parse::<f64>().ok()
    };
    let mut bytes = kib("MemAvailable:")? * 1024.0;
    let cgroup = |path: &str| std::fs::read_to_string(path).ok().and_then(|s| s.trim().parse::<f64>().ok());
    if let (Some(limit), Some(used)) = (cgroup("/sys/fs/cgroup/memory.max"), cgroup("/sys/fs/cgroup/memory.current")) {
        bytes = bytes.min((limit - used).max(0.0));
    }
    Some(bytes)
}

/// Formats bytes as TiB, GiB or MiB.
pub fn human(bytes: f64) -> String {
    const GIB: f64 = (1u64 << 30) as f64;
    if bytes >= 1024.0 * GIB {
        format!("{:.0} TiB", bytes / (1024.0 * GIB))
    } else if bytes >= GIB {
        format!("{:.1} GiB", bytes / GIB)
    } else {
        format!("{:.0} MiB", bytes / (1u64 << 20) as f64)
    }
}

/// Refuses `estimate` when it exceeds `available` bytes, with the parts and `what` (e.g. `micro_batch_size 8 ×
/// sequence_len 2048`) named so that the user knows what to lower; warns above 80% of it. Where nothing is known
/// of the machine's memory, accepts.
pub fn check(estimate: &Estimate, available: Option<f64>, what: &str) -> Result<(), String> {
    let Some(available) = available else { return Ok(()) };
    let total = estimate.total();
    let parts = format!(
        "{}{} trainable parameters with gradients and AdamW state, {} activations for {what}",
        if estimate.weights > 0.0 { format!("{} weights, ", human(estimate.weights)) } else { String::new() },
        human(estimate.trainable),
        human(estimate.activations)
    );
    if total > available {
        return Err(format!(
            "this run needs at least {} of memory ({parts}), and {} is available: lower the batch size or \
             sequence length, use gradient checkpointing, or a smaller rank",
            human(total),
            human(available)
        ));
    }
    if total > 0.8 * available {
        tracing::warn!("this run needs at least {} of the {} available ({parts})", human(total), human(available));
    }
    Ok(())
}

/// [`training`]'s estimate for a run on `device`, [`check`]ed against [`available`]: the one gate `train` and
/// `bench` pass before allocating. Only host memory is estimated; a CUDA run is bounded by the device's allocator,
/// which reports its own out-of-memory error.
pub fn check_training(
    config: &ModelConfig,
    trainable_params: usize,
    shape: StepShape,
    weight_bytes: f64,
    device: &candle_core::Device,
    what: &str,
) -> Result<(), String> {
    if !device.is_cpu() {
        return Ok(());
    }
    check(&training(config, trainable_params, shape, weight_bytes), available(), what)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn smollm2() -> ModelConfig {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/smollm2-135m-config.json");
        ModelConfig::from_file(&path).unwrap()
    }

    #[test]
    fn estimate_matches_a_hand_count() {
        let c = smollm2(); // hidden 576, 9 heads × 64, 3 kv heads × 64, MLP 1536, 30 layers, vocab 49152
        let shape = StepShape { batch: 2, seq: 100, activation_bytes: 4, gradient_checkpointing: false };
        let e = training(&c, 1000, shape, 0.0);
        assert_eq!(e.trainable, 16000.0);
        let per_layer = 3.0 * 576.0 + 3.0 * 576.0 + 4.0 * 192.0 + 3.0 * 1536.0;
        let head = 2.0 * 576.0 * 4.0 + 128.0 * 49152.0 * 4.0 / 200.0;
        assert_eq!(e.activations, 200.0 * (per_layer * 30.0 * 4.0 + head));
        // Checkpointing keeps each layer's input and one layer's activations.
        let ck = training(&c, 1000, StepShape { gradient_checkpointing: true, ..shape }, 0.0);
        assert_eq!(ck.activations, 200.0 * ((576.0 * 30.0 + per_layer) * 4.0 + head));
    }

    #[test]
    fn absurd_shapes_are_refused_with_the_figures() {
        let c = smollm2();
        let shape =
            StepShape { batch: 1_000_000, seq: 1_000_000_000, activation_bytes: 4, gradient_checkpointing: false };
        let e = training(&c, 1000, shape, 0.0);
        let msg = check(&e, Some(24.0 * (1u64 << 30) as f64), "--batch 1000000 × --seq 1000000000").unwrap_err();
        assert!(msg.contains("needs at least") && msg.contains("24.0 GiB is available"), "{msg}");
        assert!(msg.contains("activations for --batch 1000000 × --seq 1000000000"), "{msg}");
        // A small step passes; an unknown machine accepts.
        let small = training(&c, 1000, StepShape { batch: 2, seq: 256, ..shape }, 0.0);
        check(&small, Some(24.0 * (1u64 << 30) as f64), "x").unwrap();
        check(&e, None, "x").unwrap();
    }

    #[test]
    fn this_machine_reports_its_memory() {
        if cfg!(target_os = "linux") {
            let a = available().unwrap();
            assert!(a > 0.0, "{a}");
        }
    }
}
