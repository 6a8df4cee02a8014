//! Where a model comes from: an MLX-format directory, a GGUF file, or a
//! Hugging Face repo id found in the local Hugging Face cache or LM Studio's
//! models folder. Loaded with its tokenizer, chat template and stop ids.

use std::path::{Path, PathBuf};

use super::{gguf, ModelError, Transformer};
use crate::text::template::ChatTemplate;
use crate::text::tokenizer::Tokenizer;

pub struct LoadedModel {
    pub model: Transformer,
    pub tokenizer: Tokenizer,
    pub template: Option<ChatTemplate>,
    /// Token ids that end generation (config, generation_config, tokenizer).
    pub eos_ids: Vec<u32>,
    /// What was loaded (a directory or a file).
    pub path: PathBuf,
    /// The name clients use for it.
    pub name: String,
}

fn home() -> Option<PathBuf> {
    std::env::var_os("HOME").map(PathBuf::from)
}

/// Find `spec` on disk: a path, or `org/name` in the local caches.
pub fn resolve(spec: &str) -> Result<PathBuf, ModelError> {
    let p = Path::new(spec);
    if p.exists() {
        return Ok(p.to_path_buf());
    }
    let mut looked = vec![format!("{spec} (as a path)")];
    if spec.split('/').count() == 2 && !spec.starts_with('/') && !spec.starts_with('.') {
        let hub = std::env::var_os("HF_HUB_CACHE")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HF_HOME").map(|h| PathBuf::from(h).join("hub")))
            .or_else(|| home().map(|h| h.join(".cache/huggingface/hub")));
        if let Some(hub) = hub {
            let repo = hub.join(format!("models--{}", spec.replace('/', "--")));
            let snapshots = repo.join("snapshots");
            let main_ref = std::fs::read_to_string(repo.join("refs/main")).ok();
            if let Some(r) = main_ref {
                let dir = snapshots.join(r.trim());
                if dir.join("config.json").exists() {
                    return Ok(dir);
                }
            }
            if let Ok(entries) = std::fs::read_dir(&snapshots) {
                for e in entries.flatten() {
                    if e.path().join("config.json").exists() {
                        return Ok(e.path());
                    }
                }
            }
            looked.push(snapshots.display().to_string());
        }
        if let Some(h) = home() {
            for base in [h.join(".lmstudio/models"), h.join(".cache/lm-studio/models")] {
                let dir = base.join(spec);
                if dir.join("config.json").exists() {
                    return Ok(dir);
                }
                looked.push(dir.display().to_string());
            }
        }
    }
    Err(ModelError::Load { file: spec.to_string(), message: format!("model not found; looked in: {}", looked.join(", ")) })
}

/// Load the model `spec` names, with its tokenizer and template.
pub fn load(spec: &str) -> Result<LoadedModel, ModelError> {
    let path = resolve(spec)?;
    let name = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| spec.to_string());
    let tok_err = |e: crate::text::tokenizer::TokenizerError| ModelError::Invalid(e.to_string());
    let (model, tokenizer, mut eos_ids) = if path.is_file() {
        if path.extension().is_none_or(|x| x != "gguf") {
            return Err(ModelError::Load { file: path.display().to_string(), message: "not a .gguf file or a model directory".into() });
        }
        let c = gguf::convert(&path, None)?;
        let cfg = gguf::parse_config(&c, &path)?;
        let tj = serde_json::to_vec(&c.tokenizer).expect("json");
        let tokenizer = Tokenizer::from_json(&tj, &c.tokenizer_config, None, &path.display().to_string()).map_err(tok_err)?;
        let eos = cfg.eos_token_ids.clone();
        (super::build(&cfg, c.weights)?, tokenizer, eos)
    } else {
        let cfg = super::load_config(&path)?;
        let model = super::build(&cfg, super::load_safetensors_dir(&path)?)?;
        let tokenizer = Tokenizer::load(&path).map_err(tok_err)?;
        let mut eos = cfg.eos_token_ids.clone();
        if let Ok(text) = std::fs::read_to_string(path.join("generation_config.json")) {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
                eos.extend(super::config::token_ids(v.get("eos_token_id")));
            }
        }
        (model, tokenizer, eos)
    };
    eos_ids.extend(tokenizer.eos_ids.iter().copied());
    eos_ids.sort_unstable();
    eos_ids.dedup();
    let template = match &tokenizer.chat_template {
        Some(src) => Some(ChatTemplate::new(src).map_err(|e| ModelError::Invalid(format!("{}: {e}", path.display())))?),
        None => None,
    };
    Ok(LoadedModel { model, tokenizer, template, eos_ids, path, name })
}
