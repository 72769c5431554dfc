//! Loading a base model for training, evaluation or benchmarking: resolve its files (local folder or Hub cache),
//! build the model, the tokenizer, the chat template and the special tokens in one place.

use crate::compute::Compute;
use crate::data::{self, ChatTemplate, DataError};
use crate::gguf::{self, GgufError};
use crate::hub::{self, HubError, HubOptions, ModelFiles, ModelSource};
use crate::model::{self, BaseQuant, Llama, ModelError};
use candle_core::{DType, Device};
use std::path::{Path, PathBuf};
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
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("{path}: cannot load the tokenizer: {msg}")]
    Tokenizer { path: PathBuf, msg: String },
    #[error("{dir}: the model has no tokenizer.json (only fast tokenizers are supported)")]
    NoTokenizer { dir: PathBuf },
}

/// A loaded base model and everything needed to feed it text.
pub struct BaseModel {
    /// Where it came from (local path or Hub repo, revision and commit).
    pub source: ModelSource,
    /// The model's files, for a safetensors model (folder or Hub repo).
    pub files: Option<ModelFiles>,
    /// The GGUF file, for a GGUF model.
    pub gguf: Option<PathBuf>,
    pub model: Llama,
    pub tokenizer: Tokenizer,
    pub template: Option<ChatTemplate>,
    /// Padding id: `pad_token` of the tokenizer config, else eos, else 0.
    pub pad_id: u32,
    /// The end-of-sequence token text (for alpaca targets), when known.
    pub eos_token: Option<String>,
    /// Tokens that end a generation: the model's EOS ids (config and generation config) and the chat template's
    /// end-of-turn token.
    pub stop_ids: Vec<u32>,
    /// What to write as `base_model_name_or_path`: the Hub id, or the local folder or file.
    pub name: String,
}

/// Whether `base` names a local GGUF file.
pub fn is_gguf_path(base: &str) -> bool {
    base.to_ascii_lowercase().ends_with(".gguf")
}

/// Resolves and loads `base` at `revision`: a Hub id or a local folder (safetensors), a local `.gguf` file, or a
/// Hub id plus `gguf_file` (one GGUF file of that repo). Weights in f32 on `device`; see [`load_base_quant`] for
/// another compute dtype or NF4.
pub fn load_base(
    base: &str,
    revision: Option<&str>,
    gguf_file: Option<&str>,
    hub_opts: &HubOptions,
    device: &Device,
) -> Result<BaseModel, LoadError> {
    let compute = Compute { device: device.clone(), dtype: DType::F32 };
    load_base_quant(base, revision, gguf_file, BaseQuant::None, hub_opts, &compute)
}

/// [`load_base`] with the projections held as `quant` says (`BaseQuant::Nf4` for QLoRA and `--load-in-4bit`) and
/// every other weight (dense projections, embeddings, norms, head) in the compute dtype on the compute device.
pub fn load_base_quant(
    base: &str,
    revision: Option<&str>,
    gguf_file: Option<&str>,
    quant: BaseQuant,
    hub_opts: &HubOptions,
    compute: &Compute,
) -> Result<BaseModel, LoadError> {
    let (device, dtype) = (&compute.device, compute.dtype);
    if gguf_file.is_some() || is_gguf_path(base) {
        let (path, source) = match gguf_file {
            Some(file) => hub::resolve_repo_file(base, revision, file, hub_opts)?,
            None => {
                let p = PathBuf::from(base);
                if !p.is_file() {
                    return Err(LoadError::Hub(HubError::LocalNotFound(p)));
                }
                (p.clone(), ModelSource::Local(p))
            }
        };
        tracing::info!("reading GGUF model {}", path.display());
        let g = gguf::load(&path, device, dtype, quant)?;
        let template = match &g.chat_template {
            Some(src) => Some(ChatTemplate::new(
                src.clone(),
                g.bos_token.clone().unwrap_or_default(),
                g.eos_token.clone().unwrap_or_default(),
            )?),
            None => None,
        };
        let pad_id = g.pad_token_id.or(g.model.config.eos_token_ids.first().copied()).unwrap_or(0);
        let mut stop_ids = stop_ids(&g.model, &g.tokenizer, template.as_ref(), None);
        for id in [g.eot_token_id, g.eom_token_id].into_iter().flatten() {
            if !stop_ids.contains(&id) {
                stop_ids.push(id);
            }
        }
        let name = match &source {
            ModelSource::Hub { repo, .. } => repo.clone(),
            ModelSource::Local(p) => p.display().to_string(),
        };
        return Ok(BaseModel {
            source,
            files: None,
            gguf: Some(path),
            model: g.model,
            tokenizer: g.tokenizer,
            template,
            pad_id,
            eos_token: g.eos_token,
            stop_ids,
            name,
        });
    }
    let files = hub::resolve_model(base, revision, hub_opts)?;
    let model = model::load_llama_quant(&files.config, &files.weights, device, dtype, quant)?;
    let tok_path = files.tokenizer.clone().ok_or_else(|| LoadError::NoTokenizer { dir: files.dir.clone() })?;
    let tokenizer = Tokenizer::from_file(&tok_path)
        .map_err(|e| LoadError::Tokenizer { path: tok_path.clone(), msg: e.to_string() })?;
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
    let stop_ids = stop_ids(&model, &tokenizer, template.as_ref(), files.generation_config.as_deref());
    let name = match &files.source {
        ModelSource::Hub { repo, .. } => repo.clone(),
        ModelSource::Local(p) => p.display().to_string(),
    };
    Ok(BaseModel {
        source: files.source.clone(),
        files: Some(files),
        gguf: None,
        model,
        tokenizer,
        template,
        pad_id,
        eos_token,
        stop_ids,
        name,
    })
}

/// End-of-turn tokens that chat templates write after an assistant message.
const END_OF_TURN_TOKENS: [&str; 6] = ["<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>"];

/// The ids that end a generation: the config's EOS ids, `generation_config.json`'s `eos_token_id`, the template's
/// `eos_token`, and the end-of-turn tokens the chat template writes.
fn stop_ids(
    model: &Llama,
    tokenizer: &Tokenizer,
    template: Option<&ChatTemplate>,
    generation_config: Option<&Path>,
) -> Vec<u32> {
    let mut ids: Vec<u32> = model.config.eos_token_ids.clone();
    if let Some(v) = generation_config
        .and_then(|p| std::fs::read_to_string(p).ok())
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
    {
        match v.get("eos_token_id") {
            Some(serde_json::Value::Number(n)) => ids.extend(n.as_u64().map(|x| x as u32)),
            Some(serde_json::Value::Array(a)) => ids.extend(a.iter().filter_map(|x| x.as_u64()).map(|x| x as u32)),
            _ => {}
        }
    }
    if let Some(t) = template {
        ids.extend(tokenizer.token_to_id(t.eos_token()));
        for tok in END_OF_TURN_TOKENS {
            if t.source().contains(tok) {
                ids.extend(tokenizer.token_to_id(tok));
            }
        }
    }
    let mut seen = std::collections::HashSet::new();
    ids.retain(|id| seen.insert(*id));
    ids
}

/// The license the base model declares, when it declares one: `general.license` of a GGUF file, else the
/// `license:` of the model card's front matter ([`card_license_of`]), else a `license` key of `config.json`.
pub fn license_of(base: &BaseModel, opts: &HubOptions) -> Option<String> {
    if let Some(path) = &base.gguf {
        return gguf::GgufFile::open(path).ok()?.string("general.license").ok().flatten();
    }
    base.files
        .as_ref()
        .and_then(|f| card_license_of(f, opts))
        .or_else(|| base.model.config.raw.get("license").and_then(|l| l.as_str()).map(str::to_string))
}

/// `license:` of the front matter of a safetensors model's card (`README.md` in the folder or Hub snapshot; for a
/// Hub model the card is fetched when not cached, best effort: any failure means "not known").
pub fn card_license_of(files: &ModelFiles, opts: &HubOptions) -> Option<String> {
    let local = files.dir.join("README.md");
    let card = if local.is_file() {
        Some(local)
    } else {
        match &files.source {
            ModelSource::Hub { repo, commit, revision } => {
                let rev = commit.as_deref().unwrap_or(revision);
                hub::resolve_repo_file(repo, Some(rev), "README.md", opts).ok().map(|(p, _)| p)
            }
            _ => None,
        }
    };
    card.and_then(|p| std::fs::read_to_string(p).ok()).and_then(|text| card_license(&text))
}

/// `license:` of a model card's YAML front matter.
fn card_license(card: &str) -> Option<String> {
    let rest = card.strip_prefix("---")?;
    let end = rest.find("\n---")?;
    let meta: serde_yaml::Value = serde_yaml::from_str(&rest[..end]).ok()?;
    match meta.get("license")? {
        serde_yaml::Value::String(s) => Some(s.clone()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn license_from_card_front_matter() {
        assert_eq!(
            super::card_license("---\nlicense: apache-2.0\ntags: [x]\n---\n# hi\n").as_deref(),
            Some("apache-2.0")
        );
        assert_eq!(super::card_license("# no front matter\nlicense: mit\n"), None);
    }
}
