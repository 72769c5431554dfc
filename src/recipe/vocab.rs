//! Checks of the keys that train vocabulary rows: `adapter.modules_to_save`, `adapter.trainable_token_indices`
//! and `tokenizer.add_special_tokens`. What needs no model is checked when the recipe loads; token ids against the
//! vocabulary size once the model is loaded ([`Recipe::check_token_ids`]), with the same file:line errors.

use std::path::Path;

use super::overrides::Override;
use super::problem::{Problem, ProblemKind, Source};
use super::{AdapterSpec, Recipe, RecipeError, TokenIndices, TokenizerSpec};
use crate::adapter::vocab::VocabModule;

const MTS: &str = "adapter.modules_to_save";
const TTI: &str = "adapter.trainable_token_indices";
const NEW: &str = "tokenizer.add_special_tokens";

pub(super) fn check_vocab_keys(adapter: &AdapterSpec, tokenizer: &TokenizerSpec) -> Result<(), Problem> {
    let (mts, tti) = adapter.vocab_settings();
    let mut seen = Vec::new();
    for (i, name) in mts.iter().enumerate() {
        let at = || Problem::path_of(MTS).index(i);
        let Some(m) = VocabModule::parse(name) else {
            return Err(at().with(ProblemKind::Invalid(format!(
                "\"{name}\" is not a module peftkit can train in full (supported: embed_tokens, lm_head)"
            ))));
        };
        if seen.contains(&m) {
            return Err(at().with(ProblemKind::Invalid(format!("\"{name}\" is listed twice"))));
        }
        seen.push(m);
    }
    if let Some(t) = tti {
        let mut modules = Vec::new();
        for (name, ids) in t.entries() {
            let (key, path) = match t {
                TokenIndices::List(_) => (TTI.to_string(), Problem::path_of(TTI)),
                TokenIndices::Map(_) => (format!("{TTI}.{name}"), Problem::path_of(&format!("{TTI}.{name}"))),
            };
            let Some(m) = VocabModule::parse(name) else {
                return Err(path.with(ProblemKind::Invalid(format!(
                    "\"{name}\" is not a module with token rows (supported: embed_tokens, lm_head)"
                ))));
            };
            if modules.contains(&m) {
                return Err(path.with(ProblemKind::Invalid(format!("\"{name}\" is listed twice"))));
            }
            modules.push(m);
            if seen.contains(&m) {
                return Err(Problem::invalid(
                    &key,
                    format!("{name} is also in {MTS}: the whole matrix trains already; list it in one place only"),
                ));
            }
            if ids.is_empty() {
                return Err(Problem::invalid(&key, "must list at least one token id"));
            }
            let mut dup = std::collections::HashSet::new();
            for (j, id) in ids.iter().enumerate() {
                if !dup.insert(id) {
                    let at = Problem::path_of(&key).index(j);
                    return Err(at.with(ProblemKind::Invalid(format!("token id {id} is listed twice"))));
                }
            }
        }
    }
    let mut dup = std::collections::HashSet::new();
    for (i, t) in tokenizer.add_special_tokens.iter().enumerate() {
        let at = || Problem::path_of(NEW).index(i);
        if t.is_empty() {
            return Err(at().with(ProblemKind::Invalid("must not be empty".into())));
        }
        if !dup.insert(t) {
            return Err(at().with(ProblemKind::Invalid(format!("\"{t}\" is listed twice"))));
        }
    }
    if !tokenizer.add_special_tokens.is_empty() && matches!(adapter, AdapterSpec::Ia3(_)) && seen.is_empty() {
        return Err(Problem::invalid(
            NEW,
            "new tokens need trainable rows: PEFT's IA3 has no trainable_token_indices; add embed_tokens (and \
             lm_head) to adapter.modules_to_save, or use a LoRA adapter",
        ));
    }
    Ok(())
}

/// The first token id of `trainable_token_indices` that is not below `vocab`, as a problem at its key.
fn id_problem(adapter: &AdapterSpec, vocab: usize) -> Option<Problem> {
    let (_, Some(t)) = adapter.vocab_settings() else { return None };
    for (name, ids) in t.entries() {
        let key = match t {
            TokenIndices::List(_) => TTI.to_string(),
            TokenIndices::Map(_) => format!("{TTI}.{name}"),
        };
        if let Some(j) = ids.iter().position(|&id| id as usize >= vocab) {
            let at = Problem::path_of(&key).index(j);
            return Some(at.with(ProblemKind::Invalid(format!(
                "token id {} is outside the model's vocabulary of {vocab} tokens (ids 0–{})",
                ids[j],
                vocab.saturating_sub(1)
            ))));
        }
    }
    None
}

impl Recipe {
    /// Checks `adapter.trainable_token_indices` against the model's vocabulary size (including tokens the recipe
    /// adds), once the model is loaded. `path` and `overrides` are what the recipe was loaded from, so that the
    /// error names the line (or the `--set` argument) as loading's errors do.
    pub fn check_token_ids(&self, path: &Path, overrides: &[String], vocab: usize) -> Result<(), RecipeError> {
        let Some(problem) = id_problem(&self.adapter, vocab) else { return Ok(()) };
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let overrides: Vec<Override> = overrides.iter().filter_map(|a| Override::parse(a).ok()).collect();
        let name = path.display().to_string();
        Err(Source { name: &name, text: &text, overrides: &overrides }.error(problem))
    }
}

#[cfg(test)]
mod tests {
    use crate::recipe::testutil::{assert_msg, err, fixture, minimal, ok};
    use crate::recipe::TokenIndices;

    fn with_adapter(f: &crate::recipe::testutil::Fixture, extra: &str) -> String {
        minimal(f, "lora").replace("  type: lora\n", &format!("  type: lora\n{extra}"))
    }

    #[test]
    fn vocab_keys_load_in_both_forms() {
        let f = fixture();
        let r = ok(&with_adapter(&f, "  modules_to_save: [embed_tokens, lm_head]\n"), &[]);
        assert_eq!(r.adapter.vocab_settings().0, ["embed_tokens".to_string(), "lm_head".to_string()]);
        let r = ok(&with_adapter(&f, "  trainable_token_indices: [3, 5]\n"), &[]);
        assert_eq!(r.adapter.vocab_settings().1, Some(&TokenIndices::List(vec![3, 5])));
        let r = ok(&with_adapter(&f, "  trainable_token_indices: {embed_tokens: [3], lm_head: [3, 4]}\n"), &[]);
        let TokenIndices::Map(m) = r.adapter.vocab_settings().1.unwrap() else { panic!() };
        assert_eq!(m, &vec![("embed_tokens".to_string(), vec![3]), ("lm_head".to_string(), vec![3, 4])]);
        // The resolved recipe loads again.
        let again = crate::recipe::Recipe::from_str(&r.to_yaml(), "r.yaml", &[]).unwrap();
        assert_eq!(again, r);
        let text = format!("{}tokenizer:\n  add_special_tokens: [\"<|tool|>\"]\n", minimal(&f, "lora"));
        let r = ok(&text, &[]);
        assert_eq!(r.tokenizer.add_special_tokens, vec!["<|tool|>".to_string()]);
        assert_eq!(crate::recipe::Recipe::from_str(&r.to_yaml(), "r.yaml", &[]).unwrap(), r);
    }

    #[test]
    fn vocab_keys_errors_name_key_and_line() {
        let f = fixture();
        assert_msg(
            &err(&with_adapter(&f, "  modules_to_save: [embed_tokens, norm]\n"), &[]),
            "recipes/x.yaml:4: adapter.modules_to_save[1]: \"norm\" is not a module peftkit can train in full",
            &["embed_tokens, lm_head"],
        );
        assert_msg(
            &err(&with_adapter(&f, "  trainable_token_indices: [3, 5, 3]\n"), &[]),
            "recipes/x.yaml:4: adapter.trainable_token_indices[2]: token id 3 is listed twice",
            &[],
        );
        assert_msg(
            &err(&with_adapter(&f, "  trainable_token_indices: {wte: [1]}\n"), &[]),
            "recipes/x.yaml:4: adapter.trainable_token_indices.wte: \"wte\" is not a module with token rows",
            &[],
        );
        assert_msg(
            &err(&with_adapter(&f, "  trainable_token_indices: [-1]\n"), &[]),
            "recipes/x.yaml:4: adapter.trainable_token_indices",
            &[],
        );
        assert_msg(
            &err(&with_adapter(&f, "  modules_to_save: [embed_tokens]\n  trainable_token_indices: [1]\n"), &[]),
            "recipes/x.yaml:5: adapter.trainable_token_indices: embed_tokens is also in adapter.modules_to_save",
            &[],
        );
        let text = format!("{}tokenizer:\n  add_special_tokens: [\"<a>\", \"<b>\", \"<a>\"]\n", minimal(&f, "lora"));
        assert_msg(&err(&text, &[]), "recipes/x.yaml:9: tokenizer.add_special_tokens[2]: \"<a>\" is listed twice", &[]);
    }

    #[test]
    fn token_ids_are_checked_against_the_vocabulary_with_their_line() {
        let f = fixture();
        let text = with_adapter(&f, "  trainable_token_indices: [3, 400]\n");
        let path = std::env::temp_dir().join(format!("peftkit-vocab-recipe-{}.yaml", std::process::id()));
        std::fs::write(&path, &text).unwrap();
        let r = crate::recipe::Recipe::load(&path, &[]).unwrap();
        assert!(r.check_token_ids(&path, &[], 401).is_ok());
        let e = r.check_token_ids(&path, &[], 384).unwrap_err().to_string();
        let _ = std::fs::remove_file(&path);
        assert!(
            e.contains(":4: adapter.trainable_token_indices[1]: token id 400 is outside the model's vocabulary of 384"),
            "{e}"
        );
    }
}
