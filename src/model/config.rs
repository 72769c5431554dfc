//! `config.json` of a Llama-family decoder, as transformers writes it (Llama 2/3, Mistral, Qwen2, SmolLM).
//!
//! Reads both the transformers ≤ 4 spelling (`rope_theta`, `rope_scaling` at the top level) and the transformers 5
//! one (`rope_parameters: {rope_theta, rope_type, …}`). Unknown keys are ignored: configs carry many that do not
//! change the forward pass.
//!
//! Also the one table of a decoder layer's seven linear projections ([`LAYER_PROJECTIONS`]): their transformers and
//! llama.cpp names, the (out, in) shape of their weight, which config flag gives them a bias, and which of them
//! llama.cpp stores in its rotary row order (`convert_hf_to_gguf.py`'s `LlamaModel.permute`: q and k).

use serde::Deserialize;
use std::path::{Path, PathBuf};

/// Errors reading a model's `config.json`.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}:{line}: {msg}")]
    Parse { path: PathBuf, line: usize, msg: String },
    #[error("{path}: {key}: {msg}")]
    Unsupported { path: PathBuf, key: String, msg: String },
}

/// How positions are rescaled in the rotary embedding.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// Positions divided by `factor`.
    Linear { factor: f64 },
    /// Llama 3.1's frequency-dependent scaling.
    Llama3 { factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max_position_embeddings: f64 },
}

/// The architecture facts the forward pass needs.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Bias on q/k/v projections (Qwen2 always; Llama when `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on o_proj (Llama's `attention_bias` covers it too).
    pub o_bias: bool,
    pub mlp_bias: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    /// Mistral / Qwen2 sliding-window attention: positions further back than this are not attended to. Sequences
    /// up to this length are unaffected; longer ones are refused rather than computed differently.
    pub sliding_window: Option<usize>,
    /// Per-frequency divisors of the rotary inverse frequencies, as a GGUF file stores Llama 3.1's scaling
    /// (`rope_freqs.weight`) instead of its parameters; applied after `rope_scaling`.
    pub rope_freq_factors: Option<Vec<f64>>,
    /// The checkpoint is quantized by bitsandbytes (NF4): its projections load as NF4 without re-quantizing.
    pub prequantized_nf4: bool,
    /// The raw JSON, kept to write a merged model's config and the model card.
    pub raw: serde_json::Value,
}

/// A size of the model, as one axis of a projection's weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dim {
    /// `hidden_size`.
    Hidden,
    /// `intermediate_size`.
    Intermediate,
    /// `num_attention_heads × head_dim`: the width of the queries.
    Query,
    /// `num_key_value_heads × head_dim`: the width of the keys and of the values.
    KeyValue,
}

/// The config flag that gives a projection its bias.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BiasFlag {
    /// [`ModelConfig::qkv_bias`].
    Qkv,
    /// [`ModelConfig::o_bias`].
    O,
    /// [`ModelConfig::mlp_bias`].
    Mlp,
}

/// Which head count llama.cpp's rotary permutation of a projection's rows uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RotaryHeads {
    /// `num_attention_heads` (q).
    Query,
    /// `num_key_value_heads` (k).
    KeyValue,
}

impl RotaryHeads {
    /// The head count, of a model with these query and key/value head counts.
    pub fn count(self, num_attention_heads: usize, num_key_value_heads: usize) -> usize {
        match self {
            RotaryHeads::Query => num_attention_heads,
            RotaryHeads::KeyValue => num_key_value_heads,
        }
    }
}

/// One linear projection of a decoder layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerProjection {
    /// The transformers module name under `model.layers.N.` (`self_attn.q_proj`).
    pub name: &'static str,
    /// The llama.cpp tensor name under `blk.N.` (`attn_q`).
    pub gguf: &'static str,
    /// The weight's rows: (out, in) = ([`Self::out`], [`Self::input`]).
    pub out: Dim,
    /// The weight's columns.
    pub input: Dim,
    /// The flag that gives it a bias (of shape (out,)).
    pub bias: BiasFlag,
    /// Whether llama.cpp stores its rows (weight and bias) in rotary order, and with which head count.
    pub rotary: Option<RotaryHeads>,
}

/// The linear projections of a decoder layer (`model.layers.N.<name>`), in the order the loader builds them and
/// PEFT lists them ([`crate::model::Block::linears`]): the modules adapters attach to and QLoRA holds in NF4.
pub const LAYER_PROJECTIONS: [LayerProjection; 7] = {
    use BiasFlag as B;
    use Dim::*;
    const fn p(
        name: &'static str,
        gguf: &'static str,
        out: Dim,
        input: Dim,
        bias: BiasFlag,
        rotary: Option<RotaryHeads>,
    ) -> LayerProjection {
        LayerProjection { name, gguf, out, input, bias, rotary }
    }
    [
        p("self_attn.q_proj", "attn_q", Query, Hidden, B::Qkv, Some(RotaryHeads::Query)),
        p("self_attn.k_proj", "attn_k", KeyValue, Hidden, B::Qkv, Some(RotaryHeads::KeyValue)),
        p("self_attn.v_proj", "attn_v", KeyValue, Hidden, B::Qkv, None),
        p("self_attn.o_proj", "attn_output", Hidden, Query, B::O, None),
        p("mlp.gate_proj", "ffn_gate", Intermediate, Hidden, B::Mlp, None),
        p("mlp.up_proj", "ffn_up", Intermediate, Hidden, B::Mlp, None),
        p("mlp.down_proj", "ffn_down", Hidden, Intermediate, B::Mlp, None),
    ]
};

impl LayerProjection {
    /// The projection named `module` (`self_attn.q_proj`, the name under `model.layers.N.`).
    pub fn named(module: &str) -> Option<&'static LayerProjection> {
        LAYER_PROJECTIONS.iter().find(|p| p.name == module)
    }

    /// The projection of a module path `model.layers.N.<name>` (`model.layers.0.self_attn.q_proj`).
    pub fn of_module(path: &str) -> Option<&'static LayerProjection> {
        let (_layer, module) = path.strip_prefix("model.layers.")?.split_once('.')?;
        Self::named(module)
    }

    /// The projection of a tensor name `model.layers.N.<name>.<weight|bias>`.
    pub fn of_tensor(name: &str) -> Option<&'static LayerProjection> {
        Self::of_module(name.rsplit_once('.')?.0)
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(u32),
    Many(Vec<u32>),
}

#[derive(Deserialize)]
struct RawConfig {
    model_type: Option<String>,
    architectures: Option<Vec<String>>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<serde_json::Value>,
    rope_parameters: Option<serde_json::Value>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    hidden_act: Option<String>,
    bos_token_id: Option<OneOrMany>,
    eos_token_id: Option<OneOrMany>,
    pad_token_id: Option<OneOrMany>,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
    quantization_config: Option<serde_json::Value>,
}

fn first(v: Option<OneOrMany>) -> Option<u32> {
    match v {
        Some(OneOrMany::One(x)) => Some(x),
        Some(OneOrMany::Many(xs)) => xs.first().copied(),
        None => None,
    }
}

impl ModelConfig {
    /// Reads and checks `config.json`.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io { path: path.into(), source })?;
        Self::from_json_str(&text, path)
    }

    /// Parses the text of a `config.json`; `path` is only used in messages.
    pub fn from_json_str(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let parse_err =
            |e: serde_json::Error| ConfigError::Parse { path: path.into(), line: e.line(), msg: e.to_string() };
        let raw_value: serde_json::Value = serde_json::from_str(text).map_err(parse_err)?;
        let raw: RawConfig = serde_json::from_str(text).map_err(parse_err)?;
        let unsupported = |key: &str, msg: String| ConfigError::Unsupported { path: path.into(), key: key.into(), msg };

        let model_type = raw.model_type.clone().unwrap_or_else(|| "llama".into());
        const SUPPORTED: [&str; 4] = ["llama", "mistral", "qwen2", "smollm"];
        if !SUPPORTED.contains(&model_type.as_str()) {
            let arch = raw.architectures.as_ref().and_then(|a| a.first().cloned()).unwrap_or_default();
            return Err(unsupported(
                "model_type",
                format!(
                    "`{model_type}` ({arch}) is not a supported architecture (supported: {})",
                    SUPPORTED.join(", ")
                ),
            ));
        }
        if let Some(act) = &raw.hidden_act {
            if act != "silu" {
                return Err(unsupported("hidden_act", format!("`{act}` is not supported (only silu)")));
            }
        }
        if raw.num_attention_heads == 0 || raw.hidden_size == 0 || raw.num_hidden_layers == 0 {
            return Err(unsupported("num_attention_heads", "sizes must be positive".into()));
        }
        let kv_heads = raw.num_key_value_heads.unwrap_or(raw.num_attention_heads);
        if kv_heads == 0 || !raw.num_attention_heads.is_multiple_of(kv_heads) {
            return Err(unsupported(
                "num_key_value_heads",
                format!("{kv_heads} does not divide num_attention_heads {}", raw.num_attention_heads),
            ));
        }
        let head_dim = raw.head_dim.unwrap_or(raw.hidden_size / raw.num_attention_heads);
        if !head_dim.is_multiple_of(2) {
            return Err(unsupported("head_dim", format!("{head_dim} must be even for rotary embeddings")));
        }

        // Sizes beyond any real model (the largest vocabularies are ~256k, hidden sizes ~16k, MLPs ~53k): a typo or a
        // damaged file would otherwise end in an allocation failure, or in hours of work, before any other check.
        let kv_width = kv_heads.saturating_mul(head_dim);
        for (key, value, max) in [
            ("vocab_size", raw.vocab_size, 1 << 24),
            ("hidden_size", raw.hidden_size, 1 << 18),
            ("intermediate_size", raw.intermediate_size, 1 << 20),
            ("num_hidden_layers", raw.num_hidden_layers, 1 << 12),
            ("num_attention_heads", raw.num_attention_heads, 1 << 12),
            ("head_dim", head_dim, 1 << 14),
            ("num_key_value_heads × head_dim", kv_width, 1 << 18),
        ] {
            if value > max {
                return Err(unsupported(key, format!("{value} is beyond any supported model (at most {max})")));
            }
        }
        if raw.intermediate_size == 0 || raw.vocab_size == 0 || head_dim == 0 {
            return Err(unsupported(
                "intermediate_size",
                "vocab_size, intermediate_size and head_dim must be positive".into(),
            ));
        }

        // rope_theta: top level (transformers ≤ 4) or inside rope_parameters (transformers 5).
        let params = raw.rope_parameters.as_ref().or(raw.rope_scaling.as_ref());
        let theta_in_params = raw.rope_parameters.as_ref().and_then(|p| p.get("rope_theta")).and_then(|v| v.as_f64());
        let rope_theta = raw.rope_theta.or(theta_in_params).unwrap_or(10_000.0);
        let rope_scaling = parse_rope_scaling(params).map_err(|msg| unsupported("rope_scaling", msg))?;

        // A pre-quantized checkpoint: only bitsandbytes' 4-bit NF4 is understood.
        let prequantized_nf4 = match raw.quantization_config.as_ref().filter(|q| !q.is_null()) {
            None => false,
            Some(q) => {
                let method = q.get("quant_method").and_then(|m| m.as_str()).unwrap_or("(none)");
                if method != "bitsandbytes" {
                    return Err(unsupported(
                        "quantization_config.quant_method",
                        format!("`{method}` checkpoints are not supported (bitsandbytes NF4 is; or use the unquantized model)"),
                    ));
                }
                let four_bit = q.get("load_in_4bit").or_else(|| q.get("_load_in_4bit")).and_then(|v| v.as_bool());
                if four_bit != Some(true) {
                    return Err(unsupported(
                        "quantization_config.load_in_4bit",
                        "8-bit bitsandbytes checkpoints are not supported (4-bit NF4 is)".into(),
                    ));
                }
                let kind = q.get("bnb_4bit_quant_type").and_then(|v| v.as_str()).unwrap_or("fp4");
                if kind != "nf4" {
                    return Err(unsupported(
                        "quantization_config.bnb_4bit_quant_type",
                        format!("`{kind}` is not supported (nf4)"),
                    ));
                }
                true
            }
        };

        let qwen2 = model_type == "qwen2";
        let attention_bias = raw.attention_bias.unwrap_or(false);
        let eos_token_ids = match raw.eos_token_id {
            Some(OneOrMany::One(x)) => vec![x],
            Some(OneOrMany::Many(xs)) => xs,
            None => vec![],
        };
        Ok(ModelConfig {
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            qkv_bias: qwen2 || attention_bias,
            o_bias: !qwen2 && attention_bias,
            mlp_bias: raw.mlp_bias.unwrap_or(false),
            model_type,
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: raw.num_attention_heads,
            num_key_value_heads: kv_heads,
            head_dim,
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(4096),
            bos_token_id: first(raw.bos_token_id),
            eos_token_ids,
            pad_token_id: first(raw.pad_token_id),
            // Qwen2 configs carry a window but only use it when use_sliding_window is true.
            sliding_window: raw.sliding_window.filter(|_| raw.use_sliding_window.unwrap_or(!qwen2)),
            rope_freq_factors: None,
            prequantized_nf4,
            raw: raw_value,
        })
    }

    /// The size `d` stands for in this model.
    pub fn dim(&self, d: Dim) -> usize {
        match d {
            Dim::Hidden => self.hidden_size,
            Dim::Intermediate => self.intermediate_size,
            Dim::Query => self.num_attention_heads * self.head_dim,
            Dim::KeyValue => self.num_key_value_heads * self.head_dim,
        }
    }

    /// The shape (out, in) of `p`'s weight in this model.
    pub fn projection_shape(&self, p: &LayerProjection) -> (usize, usize) {
        (self.dim(p.out), self.dim(p.input))
    }

    /// Whether `p` has a bias in this model.
    pub fn projection_bias(&self, p: &LayerProjection) -> bool {
        match p.bias {
            BiasFlag::Qkv => self.qkv_bias,
            BiasFlag::O => self.o_bias,
            BiasFlag::Mlp => self.mlp_bias,
        }
    }

    /// The head count of llama.cpp's rotary permutation of `p`'s rows (q: `num_attention_heads`, k:
    /// `num_key_value_heads`), or `None` when its rows are stored as transformers stores them. Whether the
    /// architecture is permuted at all (llama.cpp permutes `llama` only) is the caller's question.
    pub fn rotary_heads(&self, p: &LayerProjection) -> Option<usize> {
        p.rotary.map(|r| r.count(self.num_attention_heads, self.num_key_value_heads))
    }

    /// The inverse frequencies of the rotary embedding (head_dim / 2 values), scaling applied.
    pub fn rope_inv_freq(&self) -> Vec<f64> {
        let d = self.head_dim;
        (0..d / 2)
            .map(|i| {
                let f = 1.0 / self.rope_theta.powf((2 * i) as f64 / d as f64);
                let f = match &self.rope_freq_factors {
                    Some(factors) => f / factors.get(i).copied().unwrap_or(1.0),
                    None => f,
                };
                match self.rope_scaling {
                    RopeScaling::None => f,
                    RopeScaling::Linear { factor } => f / factor,
                    RopeScaling::Llama3 {
                        factor,
                        low_freq_factor,
                        high_freq_factor,
                        original_max_position_embeddings,
                    } => {
                        let low_wavelen = original_max_position_embeddings / low_freq_factor;
                        let high_wavelen = original_max_position_embeddings / high_freq_factor;
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (original_max_position_embeddings / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    }
                }
            })
            .collect()
    }
}

fn parse_rope_scaling(v: Option<&serde_json::Value>) -> Result<RopeScaling, String> {
    let Some(v) = v.filter(|v| !v.is_null()) else { return Ok(RopeScaling::None) };
    let kind = v.get("rope_type").or_else(|| v.get("type")).and_then(|t| t.as_str()).unwrap_or("default");
    let num = |k: &str| v.get(k).and_then(|x| x.as_f64()).ok_or_else(|| format!("`{kind}` scaling needs `{k}`"));
    match kind {
        "default" => Ok(RopeScaling::None),
        "linear" => Ok(RopeScaling::Linear { factor: num("factor")? }),
        "llama3" => Ok(RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")?,
        }),
        other => Err(format!("rope type `{other}` is not supported (supported: default, linear, llama3)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<ModelConfig, ConfigError> {
        ModelConfig::from_json_str(s, Path::new("config.json"))
    }

    const BASE: &str = r#""vocab_size": 10, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
        "num_attention_heads": 2"#;

    #[test]
    fn rope_theta_top_level_and_in_rope_parameters() {
        let a = parse(&format!(r#"{{ {BASE}, "rope_theta": 500000.0 }}"#)).unwrap();
        assert_eq!(a.rope_theta, 500000.0);
        let b = parse(&format!(r#"{{ {BASE}, "rope_parameters": {{"rope_theta": 1e6, "rope_type": "default"}} }}"#))
            .unwrap();
        assert_eq!(b.rope_theta, 1e6);
        assert_eq!(b.rope_scaling, RopeScaling::None);
        assert_eq!(b.num_key_value_heads, 2);
        assert_eq!(b.head_dim, 4);
    }

    #[test]
    fn llama3_scaling_matches_closed_form() {
        // Llama 3.1 8B's values; inv_freq of transformers' _compute_llama3_parameters for i = 0 (unchanged),
        // the last (divided by factor) and a middle one in the smooth band.
        let c = parse(
            r#"{ "vocab_size": 10, "hidden_size": 4096, "intermediate_size": 16, "num_hidden_layers": 1,
            "num_attention_heads": 32, "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192} }"#,
        )
        .unwrap();
        let f = c.rope_inv_freq();
        assert_eq!(f.len(), 64);
        assert!((f[0] - 1.0).abs() < 1e-12);
        let plain_last = 1.0 / 500000f64.powf(126.0 / 128.0);
        assert!((f[63] - plain_last / 8.0).abs() < 1e-15);
        // i = 30: wavelen = 2π·500000^(60/128) ≈ 3.0e3, between 2048 and 8192 → smoothed.
        let plain = 1.0 / 500000f64.powf(60.0 / 128.0);
        let wavelen = 2.0 * std::f64::consts::PI / plain;
        assert!(wavelen > 2048.0 && wavelen < 8192.0);
        let smooth = (8192.0 / wavelen - 1.0) / 3.0;
        assert!((f[30] - ((1.0 - smooth) * plain / 8.0 + smooth * plain)).abs() < 1e-15);
    }

    #[test]
    fn absurd_sizes_are_refused_before_anything_is_allocated() {
        let base = r#"{"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "vocab_size": 256}"#;
        parse(base).unwrap();
        for (from, to, key) in [
            ("\"vocab_size\": 256", "\"vocab_size\": 1000000000000", "vocab_size: 1000000000000 is beyond"),
            ("\"hidden_size\": 64", "\"hidden_size\": 4000000000", "hidden_size: 4000000000 is beyond"),
            ("\"num_hidden_layers\": 2", "\"num_hidden_layers\": 100000", "num_hidden_layers: 100000 is beyond"),
            ("\"vocab_size\": 256", "\"vocab_size\": 0", "must be positive"),
        ] {
            let text = base.replace(from, to);
            let e = match ModelConfig::from_json_str(&text, Path::new("m/config.json")) {
                Ok(_) => panic!("{text} loaded"),
                Err(e) => e.to_string(),
            };
            assert!(e.contains(key) && e.contains("m/config.json"), "{e}");
        }
    }

    #[test]
    fn qwen2_has_qkv_bias_and_unknown_types_are_rejected() {
        let q = parse(&format!(r#"{{ {BASE}, "model_type": "qwen2" }}"#)).unwrap();
        assert!(q.qkv_bias && !q.o_bias);
        let e = parse(&format!(r#"{{ {BASE}, "model_type": "gpt2" }}"#)).unwrap_err().to_string();
        assert!(e.contains("model_type") && e.contains("gpt2"), "{e}");
        let e = parse(&format!(r#"{{ {BASE}, "rope_scaling": {{"rope_type": "yarn", "factor": 4.0}} }}"#))
            .unwrap_err()
            .to_string();
        assert!(e.contains("yarn"), "{e}");
        let e = parse("{ \"vocab_size\": 1,\n \"hidden_size\": \"x\" }").unwrap_err().to_string();
        assert!(e.contains("config.json:2"), "{e}");
    }

    #[test]
    fn projection_table_gives_what_the_checkpoint_and_the_model_hold() {
        use crate::model::{load_llama, WeightSource};
        use candle_core::{DType, Device};
        // tiny-qwen2: hidden 64, intermediate 160, 4 query heads and 2 key/value heads of 16; biases on q/k/v only.
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-qwen2");
        let cfg = ModelConfig::from_file(&dir.join("config.json")).unwrap();
        assert_eq!((cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim), (4, 2, 16));
        // Closed form: (name, llama.cpp name, (out, in), bias, rotary heads).
        let expected = [
            ("self_attn.q_proj", "attn_q", (64, 64), true, Some(4)),
            ("self_attn.k_proj", "attn_k", (32, 64), true, Some(2)),
            ("self_attn.v_proj", "attn_v", (32, 64), true, None),
            ("self_attn.o_proj", "attn_output", (64, 64), false, None),
            ("mlp.gate_proj", "ffn_gate", (160, 64), false, None),
            ("mlp.up_proj", "ffn_up", (160, 64), false, None),
            ("mlp.down_proj", "ffn_down", (64, 160), false, None),
        ];
        for (p, (name, gguf, shape, bias, heads)) in LAYER_PROJECTIONS.iter().zip(expected) {
            assert_eq!((p.name, p.gguf), (name, gguf));
            assert_eq!(cfg.projection_shape(p), shape, "{name}");
            assert_eq!(cfg.projection_bias(p), bias, "{name}");
            assert_eq!(cfg.rotary_heads(p), heads, "{name}");
        }
        // The checkpoint transformers wrote: each weight has the table's shape, and a bias where the table says.
        let src = WeightSource::open(&[dir.join("model.safetensors")]).unwrap();
        for l in 0..cfg.num_hidden_layers {
            for p in &LAYER_PROJECTIONS {
                let (o, i) = cfg.projection_shape(p);
                let m = format!("model.layers.{l}.{}", p.name);
                src.get(&format!("{m}.weight"), &[o, i], DType::F32, &Device::Cpu).unwrap();
                assert_eq!(src.contains(&format!("{m}.bias")), cfg.projection_bias(p), "{m}");
            }
        }
        // The loaded model's projections, in `Block::linears` order, are the table's rows.
        let model =
            load_llama(&dir.join("config.json"), &[dir.join("model.safetensors")], &Device::Cpu, DType::F32).unwrap();
        for (l, block) in model.layers.iter().enumerate() {
            for (lin, p) in block.linears().into_iter().zip(&LAYER_PROJECTIONS) {
                assert_eq!(lin.path, format!("model.layers.{l}.{}", p.name));
                assert_eq!((lin.out_features, lin.in_features), cfg.projection_shape(p), "{}", lin.path);
                assert_eq!(lin.bias.is_some(), cfg.projection_bias(p), "{}", lin.path);
            }
        }
        // Llama's attention_bias covers o_proj too; mlp_bias the three MLP projections.
        let llama = parse(&format!(r#"{{ {BASE}, "attention_bias": true, "mlp_bias": true }}"#)).unwrap();
        assert!(LAYER_PROJECTIONS.iter().all(|p| llama.projection_bias(p)));
        // Lookups by module path and tensor name.
        let k = LayerProjection::of_tensor("model.layers.3.self_attn.k_proj.bias").map(|p| p.gguf);
        assert_eq!(k, Some("attn_k"));
        assert_eq!(LayerProjection::of_module("model.layers.12.mlp.down_proj").map(|p| p.gguf), Some("ffn_down"));
        assert_eq!(LayerProjection::of_tensor("model.layers.0.input_layernorm.weight"), None);
        assert_eq!(LayerProjection::of_module("model.layers.0.self_attn.qq_proj"), None);
    }
}
