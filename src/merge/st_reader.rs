//! Reading safetensors files without a memory map: headers parsed once, each tensor read with a positioned read
//! when it is needed (the pages of a map would stay resident and make the process as large as the model).

use crate::model::{ModelError, TensorSource, WeightSource};
use crate::quant::nf4::Nf4Tensor;
use candle_core::{DType, Device, Tensor};
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::io::{Read, Seek, SeekFrom};
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Mutex;

/// A tensor's place in a safetensors file.
pub(super) struct StEntry {
    pub(super) file: usize,
    /// `None` for dtypes candle cannot hold (F8 variants, bool, …).
    pub(super) dtype: Option<DType>,
    pub(super) dtype_name: String,
    pub(super) shape: Vec<usize>,
    /// Byte range within the file.
    range: Range<u64>,
}

pub(super) struct StFile {
    pub(super) path: PathBuf,
    handle: Mutex<std::fs::File>,
}

/// Safetensors files read tensor by tensor with positioned reads: each header is parsed once (with the safetensors
/// crate), a tensor's bytes are read when it is needed. bitsandbytes' NF4 weights are read through
/// [`WeightSource`], the model loader's reader, which knows their parts.
pub(super) struct SafetensorsFiles {
    pub(super) files: Vec<StFile>,
    /// Tensor names in file order (files in the order given, tensors by offset).
    order: Vec<String>,
    entries: HashMap<String, StEntry>,
    pub(super) nf4: Option<WeightSource>,
}

impl SafetensorsFiles {
    pub(super) fn open(paths: &[PathBuf]) -> Result<Self, ModelError> {
        let mut files = Vec::new();
        let mut order = Vec::new();
        let mut entries = HashMap::new();
        for (index, path) in paths.iter().enumerate() {
            let bad = |msg: String| ModelError::Open { file: path.clone(), source: candle_core::Error::Msg(msg) };
            let mut f = std::fs::File::open(path).map_err(|e| bad(e.to_string()))?;
            let file_len = f.metadata().map_err(|e| bad(e.to_string()))?.len();
            let mut n = [0u8; 8];
            f.read_exact(&mut n).map_err(|e| bad(format!("cannot read the header size: {e}")))?;
            let n = u64::from_le_bytes(n);
            // The safetensors crate's own limit on a header.
            if n > 100_000_000 || 8 + n > file_len {
                return Err(bad(format!("header of {n} bytes does not fit the file ({file_len} bytes)")));
            }
            let mut header = vec![0u8; n as usize];
            f.read_exact(&mut header).map_err(|e| bad(e.to_string()))?;
            let meta: safetensors::tensor::Metadata =
                serde_json::from_slice(&header).map_err(|e| bad(format!("invalid header: {e}")))?;
            let infos = meta.tensors();
            for name in meta.offset_keys() {
                let Some(info) = infos.get(&name) else { continue };
                let (s, e) = info.data_offsets;
                let range = 8 + n + s as u64..8 + n + e as u64;
                if range.end > file_len {
                    return Err(bad(format!("tensor `{name}` ends past the end of the file (truncated?)")));
                }
                let entry = StEntry {
                    file: index,
                    dtype: candle_dtype(info.dtype),
                    dtype_name: format!("{:?}", info.dtype),
                    shape: info.shape.clone(),
                    range,
                };
                order.push(name.clone());
                // As for sharded checkpoints: a name in two files is read from the last.
                entries.insert(name, entry);
            }
            files.push(StFile { path: path.clone(), handle: Mutex::new(f) });
        }
        let mut seen = HashSet::new();
        order.retain(|n| seen.insert(n.clone()));
        Ok(Self { files, order, entries, nf4: None })
    }

    pub(super) fn names(&self) -> Vec<String> {
        self.order.clone()
    }

    pub(super) fn entries(&self) -> impl Iterator<Item = (String, &StEntry)> {
        self.order.iter().filter_map(|n| self.entries.get(n).map(|e| (n.clone(), e)))
    }

    /// The raw bytes of a tensor.
    fn bytes(&self, name: &str, e: &StEntry) -> Result<Vec<u8>, ModelError> {
        let f = &self.files[e.file];
        let err = |source: std::io::Error| ModelError::Tensor {
            name: name.to_string(),
            files: f.path.display().to_string(),
            source: candle_core::Error::Msg(source.to_string()),
        };
        let mut buf = vec![0u8; (e.range.end - e.range.start) as usize];
        let mut handle = f.handle.lock().unwrap_or_else(|p| p.into_inner());
        handle.seek(SeekFrom::Start(e.range.start)).map_err(err)?;
        handle.read_exact(&mut buf).map_err(err)?;
        Ok(buf)
    }

    /// The dense shape of a bitsandbytes 4-bit weight, from its quant state (JSON stored as u8 bytes).
    pub(super) fn bnb_shape(&self, state_key: &str) -> Result<Vec<usize>, ModelError> {
        let e = &self.entries[state_key];
        let bad = |msg: String| ModelError::Quantized {
            name: state_key.to_string(),
            files: self.files[e.file].path.display().to_string(),
            msg,
        };
        let state: Value =
            serde_json::from_slice(&self.bytes(state_key, e)?).map_err(|err| bad(format!("not JSON: {err}")))?;
        state
            .get("shape")
            .and_then(|s| s.as_array())
            .map(|a| a.iter().filter_map(|v| v.as_u64().map(|v| v as usize)).collect::<Vec<_>>())
            .filter(|s| !s.is_empty())
            .ok_or_else(|| bad("the quant state has no `shape`".into()))
    }
}

impl TensorSource for SafetensorsFiles {
    fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    fn get(&self, name: &str, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor, ModelError> {
        let e = self
            .entries
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor { name: name.to_string(), files: self.describe() })?;
        if e.shape != shape {
            return Err(ModelError::Shape { name: name.to_string(), got: e.shape.clone(), expected: shape.to_vec() });
        }
        let stored = e.dtype.ok_or_else(|| ModelError::Tensor {
            name: name.to_string(),
            files: self.files[e.file].path.display().to_string(),
            source: candle_core::Error::Msg(format!("dtype {} is not supported", e.dtype_name)),
        })?;
        let t = Tensor::from_raw_buffer(&self.bytes(name, e)?, stored, shape, &Device::Cpu)?;
        Ok(t.to_dtype(dtype)?.to_device(device)?)
    }

    fn describe(&self) -> String {
        self.files.iter().map(|f| f.path.display().to_string()).collect::<Vec<_>>().join(", ")
    }

    fn nf4_weight(&self, name: &str, shape: &[usize]) -> Result<Option<Nf4Tensor>, ModelError> {
        match &self.nf4 {
            Some(ws) => TensorSource::nf4_weight(ws, name, shape),
            None => Ok(None),
        }
    }
}

/// The candle dtype of a safetensors dtype, for those candle holds.
fn candle_dtype(d: safetensors::Dtype) -> Option<DType> {
    use safetensors::Dtype as S;
    Some(match d {
        S::U8 => DType::U8,
        S::U32 => DType::U32,
        S::I16 => DType::I16,
        S::I32 => DType::I32,
        S::I64 => DType::I64,
        S::BF16 => DType::BF16,
        S::F16 => DType::F16,
        S::F32 => DType::F32,
        S::F64 => DType::F64,
        _ => return None,
    })
}

/// The safetensors dtype written for a candle dtype.
pub(super) fn st_dtype(d: DType) -> Option<safetensors::Dtype> {
    use safetensors::Dtype as S;
    Some(match d {
        DType::U8 => S::U8,
        DType::U32 => S::U32,
        DType::I16 => S::I16,
        DType::I32 => S::I32,
        DType::I64 => S::I64,
        DType::BF16 => S::BF16,
        DType::F16 => S::F16,
        DType::F32 => S::F32,
        DType::F64 => S::F64,
        _ => return None,
    })
}

pub(super) fn is_float(d: DType) -> bool {
    matches!(d, DType::BF16 | DType::F16 | DType::F32 | DType::F64)
}
