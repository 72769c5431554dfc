//! `--quant` for `peftkit merge --format gguf`: the GGUF file type, and the type each tensor gets, by llama.cpp's
//! rules.
//!
//! Two sets of rules, because llama.cpp has two tools:
//! - `f32`, `f16`, `bf16`, `q8_0` are what `convert_hf_to_gguf.py --outtype` writes (`ModelBase.prepare_tensors`):
//!   1-D tensors, `*_norm.weight` and anything not named `*.weight` (biases) stay F32; every other tensor gets the
//!   type; Q8_0 falls back to F16 for a row length that is not a multiple of 32 (`gguf.quants.QuantError`).
//! - `q4_0`, `q4_k_m`, `q5_k_m`, `q6_k` are what `llama-quantize` writes (`llama_tensor_get_type` in
//!   llama.cpp's `src/llama-quant.cpp`): the file type's base type (Q4_0, Q4_K, Q5_K, Q6_K) for 2-D weights, with
//!   - `output.weight` (or `token_embd.weight` when the head is tied) in Q6_K, or Q8_0 when its row length is not a
//!     multiple of 256 (or when the base type is Q8_0);
//!   - for Q4_K_M and Q5_K_M, `attn_v.weight` and `ffn_down.weight` in Q6_K for the layers `use_more_bits` picks:
//!     `i < n/8 || i >= 7n/8 || (i - n/8) % 3 == 2` (the first and last eighth, and every third in between);
//!   - a row length the chosen type's block does not divide falls back as llama.cpp does: Q4_K → Q5_0,
//!     Q5_K → Q5_1, Q6_K → Q8_0, then F16 if that block does not divide it either (llama.cpp aborts on a Q4_0 tensor
//!     whose rows are not a multiple of 32; peftkit writes F16 instead and says so).
//!
//! Layers are counted from the tensor's name (`blk.N.`), which is llama-quantize's intent; it counts the tensors in
//! file order, which is the same for files whose layers are in order.

use candle_core::quantized::GgmlDType;

/// The GGUF output type (`--quant`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufQuant {
    F32,
    F16,
    Bf16,
    Q8_0,
    Q4_0,
    Q4KM,
    Q5KM,
    Q6K,
}

/// The names `--quant` accepts, for messages.
pub const GGUF_QUANT_NAMES: &str = "f32, f16, bf16, q8_0, q4_0, q4_k_m, q5_k_m, q6_k";

impl GgufQuant {
    /// llama.cpp's names, in any case: `f32`, `f16`, `bf16`, `q8_0`, `q4_0`, `q4_k_m`, `q5_k_m`, `q6_k`.
    pub fn parse(s: &str) -> Result<Self, String> {
        Ok(match s.trim().to_ascii_lowercase().as_str() {
            "f32" | "fp32" | "float32" => Self::F32,
            "f16" | "fp16" | "float16" => Self::F16,
            "bf16" | "bfloat16" => Self::Bf16,
            "q8_0" => Self::Q8_0,
            "q4_0" => Self::Q4_0,
            "q4_k_m" => Self::Q4KM,
            "q5_k_m" => Self::Q5KM,
            "q6_k" => Self::Q6K,
            _ => return Err(format!("`{s}` is not a GGUF type ({GGUF_QUANT_NAMES})")),
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
            Self::Q8_0 => "q8_0",
            Self::Q4_0 => "q4_0",
            Self::Q4KM => "q4_k_m",
            Self::Q5KM => "q5_k_m",
            Self::Q6K => "q6_k",
        }
    }

    /// `general.file_type` (llama.cpp's `llama_ftype`).
    pub fn file_type(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q8_0 => 7,
            Self::Q4KM => 15,
            Self::Q5KM => 17,
            Self::Q6K => 18,
            Self::Bf16 => 32,
        }
    }

    /// The type of most 2-D weights.
    fn base_type(self) -> GgmlDType {
        match self {
            Self::F32 => GgmlDType::F32,
            Self::F16 => GgmlDType::F16,
            Self::Bf16 => GgmlDType::BF16,
            Self::Q8_0 => GgmlDType::Q8_0,
            Self::Q4_0 => GgmlDType::Q4_0,
            Self::Q4KM => GgmlDType::Q4K,
            Self::Q5KM => GgmlDType::Q5K,
            Self::Q6K => GgmlDType::Q6K,
        }
    }

    /// Whether llama-quantize's rules apply (rather than the converter's).
    fn is_llama_quantize(self) -> bool {
        matches!(self, Self::Q4_0 | Self::Q4KM | Self::Q5KM | Self::Q6K)
    }
}

/// Whether a tensor stays F32 whatever the type: 1-D tensors, norms, and anything that is not a `.weight`.
pub(super) fn stays_f32(gguf_name: &str, dims: &[usize]) -> bool {
    dims.len() <= 1 || gguf_name.ends_with("_norm.weight") || !gguf_name.ends_with(".weight")
}

/// llama.cpp's `use_more_bits(i_layer, n_layers)`.
fn use_more_bits(i: usize, n: usize) -> bool {
    // The subtraction runs only when i >= n / 8.
    i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2
}

fn layer_of(gguf_name: &str) -> Option<usize> {
    gguf_name.strip_prefix("blk.")?.split_once('.')?.0.parse().ok()
}

/// The type of the tensor `gguf_name` of shape `dims` (outermost first, candle's order: the row length is the last)
/// under `quant`, in a model of `n_layers` layers with (`tied`) or without an `output.weight`; and, when the type is
/// a fallback, why (for the log, without the name: the caller groups them).
pub(super) fn tensor_type(
    quant: GgufQuant,
    gguf_name: &str,
    dims: &[usize],
    n_layers: usize,
    tied: bool,
) -> (GgmlDType, Option<String>) {
    if stays_f32(gguf_name, dims) {
        return (GgmlDType::F32, None);
    }
    let row = dims.last().copied().unwrap_or(0);
    let mut t = quant.base_type();
    if !quant.is_llama_quantize() {
        if t == GgmlDType::Q8_0 && row % 32 != 0 {
            let why = format!("rows of {row} are not a multiple of 32: F16 instead of Q8_0");
            return (GgmlDType::F16, Some(why));
        }
        return (t, None);
    }
    let is_output = gguf_name == "output.weight" || (tied && gguf_name == "token_embd.weight");
    let more_bits = matches!(quant, GgufQuant::Q4KM | GgufQuant::Q5KM)
        && (gguf_name.ends_with(".attn_v.weight") || gguf_name.ends_with(".ffn_down.weight"))
        && layer_of(gguf_name).is_some_and(|i| use_more_bits(i, n_layers));
    if is_output {
        t = if row % 256 != 0 || t == GgmlDType::Q8_0 { GgmlDType::Q8_0 } else { GgmlDType::Q6K };
    } else if more_bits {
        t = GgmlDType::Q6K;
    }
    if row % t.block_size() == 0 {
        return (t, None);
    }
    let fallback = match t {
        GgmlDType::Q4K => GgmlDType::Q5_0,
        GgmlDType::Q5K => GgmlDType::Q5_1,
        GgmlDType::Q6K => GgmlDType::Q8_0,
        _ => GgmlDType::F16,
    };
    let fallback = if row % fallback.block_size() == 0 { fallback } else { GgmlDType::F16 };
    let why = format!(
        "rows of {row} are not a multiple of {} ({t:?}'s block): {fallback:?} instead, as llama-quantize falls back",
        t.block_size()
    );
    (fallback, Some(why))
}

/// GGML's number of a type (`enum ggml_type`), as a GGUF tensor info stores it.
pub(super) fn ggml_type_id(t: GgmlDType) -> u32 {
    match t {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q5_0 => 6,
        GgmlDType::Q5_1 => 7,
        GgmlDType::Q8_0 => 8,
        GgmlDType::Q8_1 => 9,
        GgmlDType::Q2K => 10,
        GgmlDType::Q3K => 11,
        GgmlDType::Q4K => 12,
        GgmlDType::Q5K => 13,
        GgmlDType::Q6K => 14,
        GgmlDType::Q8K => 15,
        GgmlDType::BF16 => 30,
    }
}

/// Bytes of a tensor of `elements` elements of type `t` (a whole number of blocks).
pub(super) fn type_bytes(t: GgmlDType, elements: usize) -> u64 {
    (elements / t.block_size() * t.type_size()) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quant_names_parse_and_map_to_llama_file_types() {
        assert_eq!(GgufQuant::parse("Q4_K_M"), Ok(GgufQuant::Q4KM));
        assert_eq!(GgufQuant::parse("bf16").map(GgufQuant::file_type), Ok(32));
        assert_eq!(GgufQuant::parse("q8_0").map(GgufQuant::file_type), Ok(7));
        assert!(GgufQuant::parse("q3_k_s").unwrap_err().contains("q4_k_m"));
    }

    #[test]
    fn use_more_bits_matches_llama_cpp_for_32_layers() {
        // llama.cpp on a 32-layer model: layers 0-3, 28-31 and 6, 9, …, 27.
        let picked: Vec<usize> = (0..32).filter(|&i| use_more_bits(i, 32)).collect();
        assert_eq!(picked, [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]);
    }

    #[test]
    fn q4_k_m_mixes_types_as_llama_quantize_does() {
        let q = GgufQuant::Q4KM;
        let t = |name: &str, dims: &[usize]| tensor_type(q, name, dims, 32, false).0;
        assert_eq!(t("blk.0.attn_norm.weight", &[4096]), GgmlDType::F32);
        assert_eq!(t("blk.0.attn_q.bias", &[4096]), GgmlDType::F32);
        assert_eq!(t("blk.4.attn_q.weight", &[4096, 4096]), GgmlDType::Q4K);
        assert_eq!(t("blk.0.attn_v.weight", &[1024, 4096]), GgmlDType::Q6K);
        assert_eq!(t("blk.4.attn_v.weight", &[1024, 4096]), GgmlDType::Q4K);
        assert_eq!(t("blk.6.ffn_down.weight", &[4096, 14336]), GgmlDType::Q6K);
        assert_eq!(t("output.weight", &[32000, 4096]), GgmlDType::Q6K);
        assert_eq!(t("token_embd.weight", &[32000, 4096]), GgmlDType::Q4K);
        assert_eq!(tensor_type(q, "token_embd.weight", &[32000, 4096], 32, true).0, GgmlDType::Q6K);
        // Rows of 576 (SmolLM2-135M): not a multiple of 256.
        assert_eq!(t("blk.4.attn_q.weight", &[576, 576]), GgmlDType::Q5_0);
        assert_eq!(t("blk.0.attn_v.weight", &[192, 576]), GgmlDType::Q8_0);
        assert_eq!(t("output.weight", &[49152, 576]), GgmlDType::Q8_0);
        // Rows of 80: nothing but F16.
        let (ty, why) = tensor_type(q, "blk.4.attn_q.weight", &[64, 80], 32, false);
        assert_eq!(ty, GgmlDType::F16);
        assert!(why.unwrap().contains("not a multiple of 256"));
        // Q4_0 keeps its output in Q6_K, as llama-quantize does; Q8_0 (the converter's) does not.
        assert_eq!(tensor_type(GgufQuant::Q4_0, "output.weight", &[32000, 4096], 32, false).0, GgmlDType::Q6K);
        assert_eq!(tensor_type(GgufQuant::Q8_0, "output.weight", &[32000, 4096], 32, false).0, GgmlDType::Q8_0);
        assert_eq!(tensor_type(GgufQuant::Q8_0, "blk.0.ffn_down.weight", &[64, 80], 32, false).0, GgmlDType::F16);
        assert_eq!(tensor_type(GgufQuant::Bf16, "blk.0.ffn_down.weight", &[64, 80], 32, false).0, GgmlDType::BF16);
    }
}
