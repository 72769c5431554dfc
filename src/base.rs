//! Loading a base model for training, evaluation or benchmarking: resolve its files (local folder or Hub cache),
//! build the model, the tokenizer, the chat template and the special tokens in one place.

use crate::data::{self, ChatTemplate, DataError};
use crate::hub::{self, HubError, HubOptions, ModelFiles};
use crate::model::{self, Llama, ModelError};
use candle_core::{DType, Device};
use std::path::PathBuf;
use tokenizers::Tokenizer;

/// Errors loading a base model.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Hub(#[from] HubError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Data(#[from] DataError),
    #[error("{path}: cannot load the tokenizer: {msg}")]
    Tokenizer { path: PathBuf, msg: String },
    #[error("{dir}: the model has no tokenizer.json (only fast tokenizers are supported)")]
    NoTokenizer { dir: PathBuf },
}

/// A loaded base model and everything needed to feed it text.
pub struct BaseModel {
    pub files: ModelFiles,
    pub model: Llama,
    pub tokenizer: Tokenizer,
    pub template: Option<ChatTemplate>,
    /// Padding id: `pad_token` of the tokenizer config, else eos, else 0.
    pub pad_id: u32,
    /// The end-of-sequence token text (for alpaca targets), when known.
    pub eos_token: Option<String>,
    /// What to write as `base_model_name_or_path`: the Hub id, or the local folder.
    pub name: String,
}

/// Resolves and loads `base` (Hub id or local folder) at `revision`.
pub fn load_base(base: &str, revision: Option<&str>, hub_opts: &HubOptions, device: &Device) -> Result<BaseModel, LoadError> {
    let files = hub::resolve_model(base, revision, hub_opts)?;
    let dtype = DType::F32;
    let model = model::load_llama(&files.config, &files.weights, device, dtype)?;
    let tok_path = files.tokenizer.clone().ok_or_else(|| LoadError::NoTokenizer { dir: files.dir.clone() })?;
    let tokenizer =
        Tokenizer::from_file(&tok_path).map_err(|e| LoadError::Tokenizer { path: tok_path.clone(), msg: e.to_string() })?;
    let template = ChatTemplate::from_model_files(files.tokenizer_config.as_deref(), files.chat_template.as_deref())?;
    let pad_id = data::pad_token_id(&tokenizer, files.tokenizer_config.as_deref())
        .or(model.config.pad_token_id)
        .or(model.config.eos_token_ids.first().copied())
        .unwrap_or(0);
    let eos_token = template
        .as_ref()
        .map(|t| t.eos_token().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| model.config.eos_token_ids.first().and_then(|&id| tokenizer.id_to_token(id)));
    let name = match &files.source {
        hub::ModelSource::Hub { repo, .. } => repo.clone(),
        hub::ModelSource::Local(p) => p.display().to_string(),
    };
    Ok(BaseModel { files, model, tokenizer, template, pad_id, eos_token, name })
}
