//! Writing one safetensors shard, header first, then each tensor as it is computed and streamed to disk; and the
//! progress shown while doing so.

use super::compute::compute;
use super::options::{io_err, MergeError, MergeOptions};
use super::plan::Planned;
use super::st_reader::st_dtype;
use crate::adapter::peft_format::LoadedAdapter;
use crate::model::TensorSource;
use candle_core::{DType, Tensor};
use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::Ordering;

/// Writes one safetensors shard: the header (names, dtypes, shapes, offsets, `{"format": "pt"}`) first, then each
/// tensor as it is computed. Tensors go in the order given, stably sorted by element size, largest first, so that
/// every tensor's data is aligned to its element size (the header is padded to a multiple of 8 bytes).
pub(super) fn write_shard(
    path: &Path,
    tensors: &[Planned],
    src: &dyn TensorSource,
    adapters: &[LoadedAdapter],
    progress: &Progress,
    opts: &MergeOptions,
) -> Result<(), MergeError> {
    let mut items: Vec<&Planned> = tensors.iter().collect();
    items.sort_by_key(|p| std::cmp::Reverse(p.dtype.size_in_bytes()));
    let mut infos = Vec::with_capacity(items.len());
    let mut offset = 0usize;
    for p in &items {
        let dtype = st_dtype(p.dtype).ok_or_else(|| MergeError::Unsupported {
            path: path.to_path_buf(),
            msg: format!("tensor `{}`: dtype {:?} cannot be written", p.name, p.dtype),
        })?;
        let n = p.bytes() as usize;
        infos.push((
            p.name.clone(),
            safetensors::tensor::TensorInfo { dtype, shape: p.shape.clone(), data_offsets: (offset, offset + n) },
        ));
        offset += n;
    }
    let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    let header = safetensors::tensor::Metadata::new(Some(meta), infos)
        .map_err(|e| MergeError::Io { path: path.into(), source: std::io::Error::other(e.to_string()) })?;
    let mut header = serde_json::to_vec(&header)
        .map_err(|e| MergeError::Io { path: path.into(), source: std::io::Error::other(e.to_string()) })?;
    header.resize(header.len().next_multiple_of(8), b' ');

    let file = std::fs::File::create(path).map_err(io_err(path))?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
    w.write_all(&(header.len() as u64).to_le_bytes()).map_err(io_err(path))?;
    w.write_all(&header).map_err(io_err(path))?;
    for p in items {
        if opts.interrupt.as_ref().is_some_and(|f| f.load(Ordering::SeqCst)) {
            return Err(MergeError::Interrupted);
        }
        let t = compute(p, src, adapters)?;
        let written = write_tensor(&t, &mut w).map_err(|e| match e {
            WriteError::Io(source) => MergeError::Io { path: path.into(), source },
            WriteError::Candle(source) => MergeError::Tensor { name: p.name.clone(), source },
        })?;
        if written != p.bytes() {
            return Err(MergeError::Tensor {
                name: p.name.clone(),
                source: candle_core::Error::Msg(format!("{written} bytes computed, {} planned", p.bytes())),
            });
        }
        progress.tick(&p.name);
    }
    let file = w.into_inner().map_err(|e| MergeError::Io { path: path.into(), source: e.into_error() })?;
    file.sync_all().map_err(io_err(path))
}

pub(super) enum WriteError {
    Io(std::io::Error),
    Candle(candle_core::Error),
}

/// Writes a tensor's elements, row-major, little-endian; returns the bytes written.
pub(super) fn write_tensor(t: &Tensor, w: &mut impl Write) -> Result<u64, WriteError> {
    let t = t.flatten_all().map_err(WriteError::Candle)?;
    macro_rules! le {
        ($ty:ty) => {
            write_le(&t.to_vec1::<$ty>().map_err(WriteError::Candle)?, w, <$ty>::to_le_bytes).map_err(WriteError::Io)
        };
    }
    match t.dtype() {
        DType::F32 => le!(f32),
        DType::BF16 => le!(half::bf16),
        DType::F16 => le!(half::f16),
        DType::F64 => le!(f64),
        DType::U8 => le!(u8),
        DType::U32 => le!(u32),
        DType::I16 => le!(i16),
        DType::I32 => le!(i32),
        DType::I64 => le!(i64),
        other => Err(WriteError::Candle(candle_core::Error::Msg(format!("cannot write dtype {other:?}")))),
    }
}

fn write_le<T: Copy, const N: usize>(v: &[T], w: &mut impl Write, le: fn(T) -> [u8; N]) -> std::io::Result<u64> {
    const CHUNK: usize = 1 << 16;
    let mut buf = Vec::with_capacity(CHUNK * N);
    for chunk in v.chunks(CHUNK) {
        buf.clear();
        for &x in chunk {
            buf.extend_from_slice(&le(x));
        }
        w.write_all(&buf)?;
    }
    Ok((v.len() * N) as u64)
}

/// A progress bar over tensors, or (without a terminal) one log line per shard.
pub(super) struct Progress {
    bar: Option<indicatif::ProgressBar>,
}

impl Progress {
    pub(super) fn new(show: bool, tensors: usize) -> Self {
        let bar = show.then(|| {
            let bar = indicatif::ProgressBar::new(tensors as u64);
            bar.set_style(
                indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} tensors [{elapsed_precise}<{eta}] {msg}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            bar
        });
        Self { bar }
    }

    pub(super) fn tick(&self, name: &str) {
        if let Some(b) = &self.bar {
            b.set_message(name.to_string());
            b.inc(1);
        }
    }

    pub(super) fn log(&self, line: String) {
        match &self.bar {
            Some(b) => b.println(line),
            None => tracing::info!("{line}"),
        }
    }

    pub(super) fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}
