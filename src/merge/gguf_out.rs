//! `peftkit merge --format gguf`: the merged model as one GGUF file that llama.cpp loads.
//!
//! GGUF v3 (ggml's `docs/gguf.md`), little-endian: magic `GGUF`, version 3, tensor count (u64), key-value count
//! (u64), the key-values (key string, value type u32, value), the tensor infos (name, n_dims u32, dims innermost
//! first as u64, ggml type u32, offset u64 from the start of the data), padding to `general.alignment` (32), then
//! each tensor's data at its offset, every offset a multiple of 32. Strings are a u64 length and UTF-8 bytes;
//! an array is its element type (u32), its length (u64) and the elements.
//!
//! The header needs every tensor's offset, and an offset needs only the shapes and types of the tensors before it
//! (bytes = elements / block size × block bytes), all known before any value is computed. So the header is written
//! first and the tensors are then computed (read, merged in f32, permuted, quantized) and written one at a time, as
//! the safetensors shards are: peak memory is a few copies of the largest tensor, whatever the model (candle's
//! `gguf_file::write` would hold every tensor in memory at once).
//!
//! Layout as `convert_hf_to_gguf.py` writes it: llama.cpp's names (`token_embd.weight`, `blk.N.attn_q.weight`, …,
//! `output_norm.weight`, `output.weight`, omitted when the head is tied), the tensors in the base's order, Q and K
//! rows (weights and biases) of the `llama` architecture permuted into llama.cpp's rotary order
//! ([`crate::gguf::permute_rotary_rows`]; `qwen2` is not permuted), dims stored innermost first. Types per tensor
//! are [`super::gguf_quant`]'s. A GGUF base keeps each tensor's stored type unless `--quant` is given; a tensor the
//! adapter leaves alone is then copied byte for byte, and a merged one is re-quantized to its stored type.
//!
//! The file is written to a hidden temporary name beside `out` and renamed into place once complete.

use super::base::{Base, Reader};
use super::compute::compute;
use super::gguf_meta::{config_kvs, copied_kvs, gguf_arch, llama3_rope_factors, tokenizer_kvs, Kv, TokenizerFiles};
use super::gguf_quant::{ggml_type_id, tensor_type, type_bytes, GgufQuant};
use super::options::{io_err, MergeError, MergeOptions, OutDtype};
use super::plan::Planned;
use super::shard::{write_tensor, Progress, WriteError};
use crate::adapter::peft_format::{self, LoadedAdapter};
use crate::gguf::{gguf_name, permute_rotary_rows, GgufTensors};
use crate::hub;
use crate::model::{LayerProjection, ModelConfig, TensorSource};
use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::DType;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

/// GGUF's default data alignment (`general.alignment`).
const ALIGNMENT: u64 = 32;

/// What [`write_gguf`] wrote.
pub(super) struct GgufWritten {
    pub(super) tensors: usize,
    pub(super) data_bytes: u64,
    /// `q4_k_m`, or `the base's types (Q4_1)`.
    pub(super) types: String,
}

/// `out` must name a file that is absent or (with `overwrite`) replaceable.
pub(super) fn check_out_file(out: &Path, overwrite: bool) -> Result<(), MergeError> {
    let bad = |msg: &str| Err(MergeError::Out { out: out.to_path_buf(), msg: msg.to_string() });
    if out.file_name().is_none() {
        return bad("must name a file (not `.`, `..` or a root)");
    }
    if out.is_dir() {
        return bad("is a folder; --format gguf writes one file (e.g. --out model.gguf)");
    }
    if out.exists() && !overwrite {
        return bad("exists: pass --overwrite to replace it (it is replaced only once the new file is complete)");
    }
    Ok(())
}

/// The default `--quant` for a Hugging Face base: `--dtype`, else the config's 16-bit dtype, else f16 (what
/// llama.cpp's converter writes by default).
fn default_quant(opts: &MergeOptions, config: &serde_json::Value) -> GgufQuant {
    match opts.dtype.or_else(|| OutDtype::from_config(config)) {
        Some(OutDtype::F32) => GgufQuant::F32,
        Some(OutDtype::Bf16) => GgufQuant::Bf16,
        Some(OutDtype::F16) | None => GgufQuant::F16,
    }
}

/// One tensor of the output file.
struct OutTensor<'p> {
    /// The merged tensor it is, or (`None`) an extra one whose bytes are `fixed`.
    p: Option<&'p Planned>,
    fixed: Option<Vec<u8>>,
    shape: Vec<usize>,
    name: String,
    ty: GgmlDType,
    /// Copied as stored in the GGUF base.
    raw: bool,
    /// Rows to permute into llama.cpp's rotary order, with this many heads.
    permute: Option<usize>,
    bytes: u64,
}

/// Writes the merged model `plan` (f32 tensors under transformers' names) to `opts.out` as one GGUF file.
pub(super) fn write_gguf(
    base: &Base,
    plan: &[Planned],
    src: &dyn TensorSource,
    gguf_src: Option<&GgufTensors>,
    adapters: &[LoadedAdapter],
    opts: &MergeOptions,
) -> Result<GgufWritten, MergeError> {
    let config_path = base.path.join(hub::CONFIG_FILE);
    let cfg: ModelConfig = match &base.reader {
        Reader::Gguf { config, .. } => config.clone(),
        Reader::Safetensors(_) => {
            let text = serde_json::to_string(&base.config).unwrap_or_default();
            ModelConfig::from_json_str(&text, &config_path).map_err(|e| MergeError::Model(e.into()))?
        }
    };
    let arch = gguf_arch(&cfg.model_type).unwrap_or("llama");
    let keep_types = opts.quant.is_none() && gguf_src.is_some();
    let quant = opts.quant.unwrap_or_else(|| default_quant(opts, &base.config));

    // 1. Every tensor's name, type and size; Llama 3.1's rope factors first, as the converter writes them.
    let mut tensors: Vec<OutTensor> = Vec::with_capacity(plan.len() + 1);
    let rope_factors = match &base.reader {
        Reader::Gguf { config, .. } => config.rope_freq_factors.as_ref().map(|f| f.iter().map(|&x| x as f32).collect()),
        Reader::Safetensors(_) => llama3_rope_factors(&cfg),
    };
    if let Some(f) = rope_factors {
        let bytes: Vec<u8> = f.iter().flat_map(|x: &f32| x.to_le_bytes()).collect();
        let (name, shape) = ("rope_freqs.weight".to_string(), vec![f.len()]);
        let n = bytes.len() as u64;
        tensors.push(OutTensor {
            p: None,
            fixed: Some(bytes),
            shape,
            name,
            ty: GgmlDType::F32,
            raw: false,
            permute: None,
            bytes: n,
        });
    }
    let mut fallbacks: BTreeMap<String, (usize, String)> = BTreeMap::new();
    for p in plan {
        if p.name.ends_with(".rotary_emb.inv_freq") || (cfg.tie_word_embeddings && p.name == "lm_head.weight") {
            continue;
        }
        let name = gguf_name(&p.name).ok_or_else(|| MergeError::Unsupported {
            path: base.path.clone(),
            msg: format!("tensor `{}` has no llama.cpp name peftkit knows", p.name),
        })?;
        let stored = gguf_src.and_then(|g| g.stored_type(&p.name));
        let ty = match stored {
            Some(t) if keep_types => t,
            _ => {
                let (ty, why) = tensor_type(quant, &name, &p.shape, cfg.num_hidden_layers, cfg.tie_word_embeddings);
                if let Some(why) = why {
                    let e = fallbacks.entry(why).or_insert((0, name.clone()));
                    e.0 += 1;
                }
                ty
            }
        };
        let raw = p.merge.is_none() && stored == Some(ty);
        let rotary = arch == "llama" && !raw;
        let permute = LayerProjection::of_tensor(&p.name).filter(|_| rotary).and_then(|proj| cfg.rotary_heads(proj));
        let elements: usize = p.shape.iter().product();
        let bytes = type_bytes(ty, elements);
        tensors.push(OutTensor { p: Some(p), fixed: None, shape: p.shape.clone(), name, ty, raw, permute, bytes });
    }
    for (why, (n, example)) in &fallbacks {
        tracing::info!("{n} tensor(s) (e.g. {example}): {why}");
    }

    // 2. The metadata.
    let params: u64 = tensors.iter().map(|t| t.shape.iter().product::<usize>() as u64).sum();
    let (kvs, types) = match &base.reader {
        Reader::Gguf { file, quant: q, .. } => {
            let ft = if keep_types {
                file.uint("general.file_type").ok().flatten().unwrap_or(0) as u32
            } else {
                quant.file_type()
            };
            let types = match (keep_types, q) {
                (true, Some(q)) => format!("the base's types ({q})"),
                (true, None) => "the base's types".to_string(),
                (false, _) => quant.name().to_string(),
            };
            (copied_kvs(file, ft), types)
        }
        Reader::Safetensors(_) => {
            let short = base.name.trim_end_matches('/').rsplit('/').next().unwrap_or(&base.name).to_string();
            let mut kvs = config_kvs(&cfg, &short, quant.file_type(), params, &config_path)?;
            let find = |f: &str| base.copied_files.iter().find(|p| p.ends_with(f)).cloned();
            let files = TokenizerFiles {
                tokenizer: find(hub::TOKENIZER_FILE).ok_or_else(|| MergeError::Unsupported {
                    path: base.path.clone(),
                    msg: "has no tokenizer.json: a GGUF file needs the tokenizer".into(),
                })?,
                tokenizer_config: find(hub::TOKENIZER_CONFIG_FILE),
                chat_template: find(hub::CHAT_TEMPLATE_FILE),
            };
            kvs.extend(tokenizer_kvs(&files, &base.config, cfg.vocab_size)?);
            (kvs, quant.name().to_string())
        }
    };

    // 3. The header, then the data, into a temporary file.
    let mut header = Vec::new();
    let mut offset = 0u64;
    let mut offsets = Vec::with_capacity(tensors.len());
    for t in &tensors {
        offsets.push(offset);
        offset = (offset + t.bytes).next_multiple_of(ALIGNMENT);
    }
    encode_header(&mut header, &kvs, &tensors, &offsets);
    header.resize((header.len() as u64).next_multiple_of(ALIGNMENT) as usize, 0);

    let out = &opts.out;
    let tmp = TempFile::create(out)?;
    let file = std::fs::File::create(&tmp.path).map_err(io_err(&tmp.path))?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
    let ioe = |source: std::io::Error| MergeError::Io { path: tmp.path.clone(), source };
    w.write_all(&header).map_err(ioe)?;
    let progress = Progress::new(opts.progress, tensors.len());
    let mut written = 0u64;
    for (t, &off) in tensors.iter().zip(&offsets) {
        if opts.interrupt.as_ref().is_some_and(|f| f.load(Ordering::SeqCst)) {
            return Err(MergeError::Interrupted);
        }
        if written < off {
            w.write_all(&vec![0u8; (off - written) as usize]).map_err(ioe)?;
            written = off;
        }
        let n = write_one(t, src, gguf_src, adapters, &mut w, &tmp.path)?;
        if n != t.bytes {
            return Err(MergeError::Tensor {
                name: t.name.clone(),
                source: candle_core::Error::Msg(format!("{n} bytes computed for {}, {} planned", t.name, t.bytes)),
            });
        }
        written += n;
        progress.tick(&t.name);
    }
    progress.finish();
    let file = w.into_inner().map_err(|e| MergeError::Io { path: tmp.path.clone(), source: e.into_error() })?;
    file.sync_all().map_err(ioe)?;
    drop(file);
    tmp.persist(out)?;
    Ok(GgufWritten { tensors: tensors.len(), data_bytes: offset, types })
}

/// Computes one tensor and writes its data; returns the bytes written.
fn write_one(
    t: &OutTensor,
    src: &dyn TensorSource,
    gguf_src: Option<&GgufTensors>,
    adapters: &[LoadedAdapter],
    w: &mut impl Write,
    path: &Path,
) -> Result<u64, MergeError> {
    let ioe = |source: std::io::Error| MergeError::Io { path: path.to_path_buf(), source };
    let p = match (t.p, &t.fixed) {
        (Some(p), _) => p,
        (None, Some(bytes)) => {
            w.write_all(bytes).map_err(ioe)?;
            return Ok(bytes.len() as u64);
        }
        (None, None) => return Ok(0),
    };
    let terr = |source: candle_core::Error| MergeError::Tensor { name: p.name.clone(), source };
    if let (true, Some(g)) = (t.raw, gguf_src) {
        let q = g.raw(&p.name)?;
        let data = q.data().map_err(terr)?;
        w.write_all(&data).map_err(ioe)?;
        return Ok(data.len() as u64);
    }
    let mut x = compute(p, src, adapters)?; // (out, in) or (n,), f32
    if let Some(heads) = t.permute {
        x = permute_rotary_rows(&x, heads).map_err(terr)?;
    }
    let float = match t.ty {
        GgmlDType::F32 => Some(DType::F32),
        GgmlDType::F16 => Some(DType::F16),
        GgmlDType::BF16 => Some(DType::BF16),
        _ => None,
    };
    match float {
        Some(dt) => write_tensor(&x.to_dtype(dt).map_err(terr)?, w).map_err(|e| match e {
            WriteError::Io(source) => ioe(source),
            WriteError::Candle(source) => terr(source),
        }),
        None => {
            let q = QTensor::quantize(&x, t.ty).map_err(terr)?;
            let data = q.data().map_err(terr)?;
            w.write_all(&data).map_err(ioe)?;
            Ok(data.len() as u64)
        }
    }
}

fn put_str(buf: &mut Vec<u8>, s: &str) {
    buf.extend_from_slice(&(s.len() as u64).to_le_bytes());
    buf.extend_from_slice(s.as_bytes());
}

/// GGUF's value type number (`enum gguf_type`).
fn value_type(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn put_value(buf: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => buf.push(*x),
        Value::I8(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::U16(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::U64(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => buf.push(u8::from(*x)),
        Value::String(s) => put_str(buf, s),
        Value::Array(items) => {
            // An empty array's element type is not recorded anywhere; strings are as good as any.
            let ty = items.first().map(value_type).unwrap_or(8);
            buf.extend_from_slice(&ty.to_le_bytes());
            buf.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                put_value(buf, item);
            }
        }
    }
}

/// The header up to the tensor infos (not padded).
fn encode_header(buf: &mut Vec<u8>, kvs: &[Kv], tensors: &[OutTensor], offsets: &[u64]) {
    buf.extend_from_slice(b"GGUF");
    buf.extend_from_slice(&3u32.to_le_bytes());
    buf.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    buf.extend_from_slice(&(kvs.len() as u64).to_le_bytes());
    for (k, v) in kvs {
        put_str(buf, k);
        buf.extend_from_slice(&value_type(v).to_le_bytes());
        put_value(buf, v);
    }
    for (t, off) in tensors.iter().zip(offsets) {
        put_str(buf, &t.name);
        buf.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
        for d in t.shape.iter().rev() {
            buf.extend_from_slice(&(*d as u64).to_le_bytes());
        }
        buf.extend_from_slice(&ggml_type_id(t.ty).to_le_bytes());
        buf.extend_from_slice(&off.to_le_bytes());
    }
}

/// The hidden file beside `out` the GGUF is written to; removed when dropped unless renamed into place.
struct TempFile {
    path: PathBuf,
    persisted: bool,
}

impl TempFile {
    fn create(out: &Path) -> Result<Self, MergeError> {
        if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(io_err(parent))?;
        }
        Ok(Self { path: peft_format::tmp_name(out), persisted: false })
    }

    /// Renames the file to `out`, replacing an existing file (the caller checked `--overwrite`).
    fn persist(mut self, out: &Path) -> Result<(), MergeError> {
        std::fs::rename(&self.path, out).map_err(io_err(out))?;
        self.persisted = true;
        peft_format::sync_dir(out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")));
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.persisted {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}
