//! Several adapters on one base: each is loaded and checked once, then one at a time is made active without
//! reloading the base (PEFT's `load_adapter(dir, adapter_name=…)` + `set_adapter(name)`).
//!
//! Every adapter is loaded onto the model with [`super::load_adapter`] (all its checks: shapes against
//! the projections, tensors naming no projection, vocabulary modules), prepared for inference, and its per-projection
//! layers and vocabulary parts are kept aside. Activating one puts its layers back on the projections; tensors are
//! reference-counted, so switching copies no weight. The active model is then exactly the model with that one
//! adapter loaded: decoding runs the same code, at the same speed, as with a single adapter.
//! A name is PEFT's adapter name: `[A-Za-z0-9_.-]+`; an unnamed adapter is `default`, as in PEFT.

use super::load_adapter;
use crate::adapter::peft_format::PeftConfig;
use crate::adapter::vocab::VocabAdapters;
use crate::adapter::{AdapterError, LayerAdapter};
use crate::model::Llama;
use std::path::{Path, PathBuf};

/// PEFT's name of an adapter loaded without one.
pub const DEFAULT_NAME: &str = "default";

/// Errors naming or choosing adapters.
#[derive(Debug, thiserror::Error)]
pub enum MultiError {
    #[error("adapter name `{0}` is not valid: use letters, digits, `_`, `.` and `-` only")]
    BadName(String),
    #[error("adapter name `{0}` is given twice")]
    Duplicate(String),
    #[error("no adapter is named `{name}` (loaded: {loaded})")]
    Unknown { name: String, loaded: String },
    #[error(transparent)]
    Adapter(#[from] AdapterError),
    #[error("{0}")]
    Candle(#[from] candle_core::Error),
}

/// Whether `name` is an acceptable adapter name.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// Splits an `--adapter` value: `NAME=DIR`, or `DIR` alone (named [`DEFAULT_NAME`]). A value that is an existing
/// folder as a whole is a folder, even with a `=` in it; otherwise the text before the first `=` is the name
/// unless it holds a path separator.
pub fn parse_spec(spec: &str) -> Result<(String, PathBuf), MultiError> {
    if Path::new(spec).is_dir() {
        return Ok((DEFAULT_NAME.to_string(), PathBuf::from(spec)));
    }
    match spec.split_once('=') {
        Some((name, dir)) if !name.contains(['/', '\\']) => {
            if !valid_name(name) {
                return Err(MultiError::BadName(name.to_string()));
            }
            Ok((name.to_string(), PathBuf::from(dir)))
        }
        _ => Ok((DEFAULT_NAME.to_string(), PathBuf::from(spec))),
    }
}

/// Checks a list of (name, folder): valid names, none twice.
pub fn check_names(specs: &[(String, PathBuf)]) -> Result<(), MultiError> {
    for (i, (name, _)) in specs.iter().enumerate() {
        if !valid_name(name) {
            return Err(MultiError::BadName(name.clone()));
        }
        if specs[..i].iter().any(|(n, _)| n == name) {
            return Err(MultiError::Duplicate(name.clone()));
        }
    }
    Ok(())
}

/// One loaded adapter, kept off the model while another is active.
#[derive(Debug, Clone)]
struct Entry {
    name: String,
    dir: PathBuf,
    config: PeftConfig,
    /// The adapter of every projection, in [`Llama::linears`] order (`None`: not adapted).
    layers: Vec<Option<LayerAdapter>>,
    vocab: VocabAdapters,
}

/// The adapters loaded on one model, at most one of them active.
#[derive(Debug, Clone, Default)]
pub struct AdapterSet {
    entries: Vec<Entry>,
    active: Option<usize>,
}

impl AdapterSet {
    /// Loads every `(name, folder)` onto `model` (names checked first), each prepared for inference (see
    /// [`super::freeze_for_inference`]); the first is left active. An empty list leaves the model as it is.
    pub fn load(model: &mut Llama, specs: &[(String, PathBuf)]) -> Result<Self, MultiError> {
        check_names(specs)?;
        let mut set = AdapterSet::default();
        for (name, dir) in specs {
            let config = load_adapter(model, dir)?;
            super::freeze_for_inference(model)?;
            let layers = model.linears().map(|l| l.adapter.clone()).collect();
            set.entries.push(Entry {
                name: name.clone(),
                dir: dir.clone(),
                config,
                layers,
                vocab: model.vocab.clone(),
            });
        }
        if !set.entries.is_empty() {
            set.put(model, Some(0));
        }
        Ok(set)
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// The names, in loading order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|e| e.name.as_str())
    }

    /// The active adapter's name (`None`: the base alone).
    pub fn active(&self) -> Option<&str> {
        self.active.map(|i| self.entries[i].name.as_str())
    }

    /// The folder and config of the adapter `name`.
    pub fn get(&self, name: &str) -> Option<(&Path, &PeftConfig)> {
        self.entries.iter().find(|e| e.name == name).map(|e| (e.dir.as_path(), &e.config))
    }

    /// Makes `name` the active adapter of `model`, or none (the base alone) for `None`. The model's KV caches
    /// computed before are stale afterwards.
    pub fn activate(&mut self, model: &mut Llama, name: Option<&str>) -> Result<(), MultiError> {
        let index = match name {
            None => None,
            Some(n) => Some(self.entries.iter().position(|e| e.name == n).ok_or_else(|| MultiError::Unknown {
                name: n.to_string(),
                loaded: self.names().collect::<Vec<_>>().join(", "),
            })?),
        };
        self.put(model, index);
        Ok(())
    }

    fn put(&mut self, model: &mut Llama, index: Option<usize>) {
        match index.map(|i| &self.entries[i]) {
            Some(e) => {
                for (lin, layer) in model.linears_mut().zip(&e.layers) {
                    lin.adapter = layer.clone();
                }
                model.vocab = e.vocab.clone();
            }
            None => super::detach_all(model),
        }
        self.active = index;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_and_names_are_checked() {
        assert_eq!(parse_spec("a=x/y").unwrap(), ("a".to_string(), PathBuf::from("x/y")));
        assert_eq!(parse_spec("x/y").unwrap(), ("default".to_string(), PathBuf::from("x/y")));
        assert_eq!(parse_spec("x/a=b").unwrap(), ("default".to_string(), PathBuf::from("x/a=b")));
        assert!(matches!(parse_spec("a b=x"), Err(MultiError::BadName(n)) if n == "a b"));
        assert!(matches!(parse_spec("=x"), Err(MultiError::BadName(n)) if n.is_empty()));
        assert!(valid_name("v1.2_b-c") && !valid_name("é") && !valid_name(""));
        let specs = vec![("a".to_string(), PathBuf::from("x")), ("a".to_string(), PathBuf::from("y"))];
        assert!(matches!(check_names(&specs), Err(MultiError::Duplicate(n)) if n == "a"));
    }
}
