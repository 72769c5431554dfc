//! Training recipes: the YAML file that says what to fine-tune, on which data, and how.
//!
//! A recipe names the base model, the adapter (`lora`, `qlora` or `ia3`, chosen by `adapter.type`),
//! the data files, the training hyper-parameters and the output folder. [`Recipe::load`] reads one,
//! applies `--set a.b=value` overrides, deserializes it strictly (unknown keys and wrong types are
//! errors), fills in defaults and validates it. Paths in `data.*` and `output.dir` are kept as written:
//! relative ones are relative to the current directory.
//!
//! Every error names where it comes from: `file:line: key.path: message`, or `--set arg: key.path:
//! message` when an override caused it. The text is parsed into a [`serde_yaml::Value`] (overrides
//! are applied to that tree), then deserialized with `serde_path_to_error` to learn the key path of a
//! failure. Since values deserialized through a `Value` carry no positions, the line is found by a
//! second pass over the original text ([`locate::line_of`]): a `DeserializeSeed` walks serde_yaml's event
//! stream down the key path and fails on purpose at the target key, and serde_yaml stamps that
//! failure with the key's position. This works for block and flow style alike.
//!
//! Layout: this file loads (`Recipe::load` / `from_str`: parse, override, build, resolve, check);
//! `spec` holds the serde types, `names` the enums written by name, `error` [`RecipeError`] and
//! [`Origin`], `validate` the value checks, `problem` key-path errors before their origin is known,
//! `overrides` the `--set` arguments and `locate` the positions of keys and syntax errors.

mod convert;
mod error;
mod init_from;
mod locate;
mod names;
mod overrides;
mod problem;
mod spec;
mod targets;
#[cfg(test)]
pub(crate) mod testutil;
mod validate;
mod vocab;

use std::path::Path;

use serde_yaml::Value;

pub use error::{Origin, RecipeError};
pub use names::{ComputeDtype, DataFormat, InitLoraWeights, LrScheduler};
pub use spec::{
    AdapterSpec, DataSpec, Ia3Spec, LoraSpec, OutputSpec, QloraSpec, Recipe, TokenIndices, TokenizerSpec, TrainingSpec,
};
pub use targets::Projection;

use locate::syntax_error;
use overrides::Override;
use problem::{describe_value, deserialize_at, Problem, ProblemKind, Seg, Source};
use spec::{QloraDoc, RecipeDoc};

/// Which modules an adapter attaches to (PEFT's `target_modules`; the matching rules live in
/// [`crate::adapter::target`]). In YAML: the string `all-linear`, a list of names, or any other string (a regex).
pub use crate::adapter::target::TargetModules;

impl Recipe {
    /// Reads the recipe at `path`, applies `--set a.b=value` overrides, deserializes, fills defaults
    /// and validates. Relative paths in `data.*` and `output.dir` stay as written (relative to the
    /// current directory).
    pub fn load(path: &Path, overrides: &[String]) -> Result<Recipe, RecipeError> {
        let file = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|source| RecipeError::Read { file: file.clone(), source })?;
        let text = locate::utf8_text(&file, &bytes)?;
        Recipe::from_str(text, &file, overrides)
    }

    /// Like [`Recipe::load`], from text; `source_name` names the text in error messages.
    pub fn from_str(text: &str, source_name: &str, overrides: &[String]) -> Result<Recipe, RecipeError> {
        let mut overrides = overrides.iter().map(|arg| Override::parse(arg)).collect::<Result<Vec<_>, _>>()?;
        // A byte-order mark is not YAML content (editors on Windows write one); skip it as the dataset reader does.
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        // serde_yaml refuses deep nesting only after a parse whose time grows with the square of the depth.
        if let Some(err) = locate::nesting_error(source_name, text) {
            return Err(err);
        }
        let mut doc: Value = serde_yaml::from_str(text).map_err(|err| syntax_error(source_name, text, &err))?;
        doc.apply_merge().map_err(|err| syntax_error(source_name, text, &err))?;
        for item in &mut overrides {
            item.path = item.apply(&mut doc)?;
        }

        let source = Source { name: source_name, text, overrides: &overrides };
        let mut recipe = build(doc).map_err(|problem| source.error(problem))?;
        recipe.resolve_defaults();
        recipe.check().map_err(|problem| source.error(problem))?;
        Ok(recipe)
    }

    /// Fills in defaults that depend on other keys: `training.epochs = 1` when neither `epochs` nor
    /// `max_steps` is set, and `training.learning_rate` from the adapter type. Loading calls this.
    pub fn resolve_defaults(&mut self) {
        if self.training.epochs.is_none() && self.training.max_steps.is_none() {
            self.training.epochs = Some(1);
        }
        if self.training.learning_rate.is_none() {
            self.training.learning_rate = Some(self.adapter.default_learning_rate());
        }
    }

    /// Checks every value (ranges, files, formats). Loading calls this; errors from a loaded recipe
    /// name the file and line, errors from this call name only the key path.
    pub fn validate(&self) -> Result<(), RecipeError> {
        self.check().map_err(|problem| problem.into_error(Origin::Unknown))
    }

    /// The resolved recipe (all defaults filled) as YAML, loadable again with [`Recipe::from_str`].
    pub fn to_yaml(&self) -> String {
        serde_yaml::to_string(self).unwrap_or_else(|err| format!("# cannot serialize the recipe: {err}\n"))
    }
}

/// Turns the document tree into a [`Recipe`] (defaults not yet resolved, not validated).
fn build(doc: Value) -> Result<Recipe, Problem> {
    if !doc.is_mapping() {
        return Err(Problem {
            path: Vec::new(),
            kind: ProblemKind::WrongType(format!(
                "a recipe must be a YAML map (base_model, adapter, data, training, output), found {}",
                describe_value(&doc)
            )),
        });
    }
    let raw: RecipeDoc = deserialize_at(&[], doc)?;
    Ok(Recipe {
        base_model: raw.base_model,
        revision: raw.revision,
        gguf_file: raw.gguf_file,
        base_model_id: raw.base_model_id,
        adapter: build_adapter(raw.adapter)?,
        tokenizer: raw.tokenizer,
        data: raw.data,
        training: raw.training,
        output: raw.output,
    })
}

fn has_key(map: &Value, key: &str) -> bool {
    map.as_mapping().is_some_and(|m| m.contains_key(key))
}

/// Dispatches on `adapter.type` (done by hand: serde's internally tagged enums lose key paths).
fn build_adapter(value: Value) -> Result<AdapterSpec, Problem> {
    const TYPES: &str = "lora, qlora, ia3";
    let prefix = [Seg::key("adapter")];
    let Value::Mapping(mut map) = value else {
        return Err(Problem {
            path: prefix.to_vec(),
            kind: ProblemKind::WrongType(format!(
                "expected a map with a `type` key ({TYPES}), found {}",
                describe_value(&value)
            )),
        });
    };
    let type_path = || vec![Seg::key("adapter"), Seg::key("type")];
    let type_name = match map.remove("type") {
        None => return Err(Problem { path: type_path(), kind: ProblemKind::MissingKey }),
        Some(Value::String(name)) => name,
        Some(other) => {
            return Err(Problem {
                path: type_path(),
                kind: ProblemKind::WrongType(format!("expected one of {TYPES}, found {}", describe_value(&other))),
            })
        }
    };
    let raw = map.clone();
    let rest = Value::Mapping(map);
    match type_name.as_str() {
        "lora" => {
            let mut spec: LoraSpec = deserialize_at(&prefix, rest)?;
            init_from::resolve(&raw, &mut spec)?;
            Ok(AdapterSpec::Lora(spec))
        }
        "qlora" => {
            let mut spec: QloraSpec = deserialize_at::<QloraDoc>(&prefix, rest)?.into();
            init_from::resolve(&raw, &mut spec.lora)?;
            Ok(AdapterSpec::Qlora(spec))
        }
        "ia3" if has_key(&rest, "init_from") => Err(Problem {
            path: vec![Seg::key("adapter"), Seg::key("init_from")],
            kind: ProblemKind::Invalid("continues LoRA adapters: use it with `type: lora` or `type: qlora`".into()),
        }),
        "ia3" if has_key(&rest, "use_dora") => Err(Problem {
            path: vec![Seg::key("adapter"), Seg::key("use_dora")],
            kind: ProblemKind::Invalid(
                "DoRA is a LoRA variant: use it with `type: lora` or `type: qlora`, not with ia3".to_string(),
            ),
        }),
        "ia3" if has_key(&rest, "init_lora_weights") => Err(Problem {
            path: vec![Seg::key("adapter"), Seg::key("init_lora_weights")],
            kind: ProblemKind::Invalid(
                "sets how LoRA's A and B start (true, gaussian, pissa, olora…): use it with `type: lora` or `type: \
                 qlora`; IA3's vectors start from adapter.init_ia3_weights"
                    .to_string(),
            ),
        }),
        "ia3" => deserialize_at(&prefix, rest).map(AdapterSpec::Ia3),
        other => Err(Problem {
            path: type_path(),
            kind: ProblemKind::Invalid(format!("unknown adapter type \"{other}\" (expected one of {TYPES})")),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use testutil::{assert_msg, err, fixture, full_block, minimal, ok};

    #[test]
    fn recipe_to_yaml_round_trip() {
        let f = fixture();
        let texts = [
            full_block(&f),
            minimal(&f, "ia3"),
            minimal(&f, "qlora")
                .replace("type: qlora", "type: qlora\n  init_lora_weights: false\n  target_modules: '.*_proj'"),
        ];
        for text in texts {
            let recipe = ok(&text, &[]);
            let yaml = recipe.to_yaml();
            let again = match Recipe::from_str(&yaml, "resolved.yaml", &[]) {
                Ok(r) => r,
                Err(e) => panic!("to_yaml output does not load: {e}\n{yaml}"),
            };
            assert_eq!(recipe, again, "\n{yaml}");
            assert!(yaml.contains("learning_rate:"), "{yaml}");
            assert!(yaml.contains("epochs: 1") || yaml.contains("epochs: 2"), "{yaml}");
        }
    }

    #[test]
    fn recipe_deep_nesting_is_refused_at_once() {
        // 200 000 levels: serde_yaml took minutes on this (quadratic); the scan refuses it at the 65th bracket.
        let text = format!("base_model: x\nadapter: {}{}\n", "[".repeat(200_000), "]".repeat(200_000));
        let started = std::time::Instant::now();
        let e = err(&text, &[]);
        assert!(started.elapsed().as_secs_f64() < 2.0, "{:?}", started.elapsed());
        assert_msg(&e, "recipes/x.yaml:2:74: invalid YAML: collections nested deeper than 64 levels", &[]);
        // Brackets inside quotes and comments do not count; a normal flow list still loads.
        let f = fixture();
        let quoted = minimal(&f, "lora").replace(
            "type: lora",
            &format!("type: lora # {}\n  target_modules: ['{}q_proj', \"v_proj\"]", "[".repeat(100), "[".repeat(0)),
        );
        ok(&quoted, &[]);
        let in_string = format!("base_model: '{}'\n", "[".repeat(100));
        assert!(!err(&in_string, &[]).to_string().contains("nested deeper"));
    }

    #[test]
    fn recipe_bom_and_invalid_utf8() {
        let f = fixture();
        let text = format!("\u{feff}{}", minimal(&f, "lora"));
        ok(&text, &[]);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.yaml");
        fs::write(&path, b"base_model: x\nadapter:\n  type: l\xffora\n").unwrap();
        let e = Recipe::load(&path, &[]).unwrap_err().to_string();
        assert!(e.contains("r.yaml:3:10: invalid YAML: byte 32 (0xff) is not UTF-8 text"), "{e}");
    }

    #[test]
    fn recipe_use_dora() {
        let f = fixture();
        for kind in ["lora", "qlora"] {
            let text = minimal(&f, kind).replace(&format!("type: {kind}"), &format!("type: {kind}\n  use_dora: true"));
            let recipe = ok(&text, &[]);
            assert!(recipe.adapter.lora().is_some_and(|l| l.use_dora), "{kind}");
            assert_eq!(Recipe::from_str(&recipe.to_yaml(), "resolved.yaml", &[]).unwrap(), recipe);
            match recipe.adapter.adapter_config() {
                crate::adapter::AdapterConfig::Lora(l) => assert!(l.use_dora),
                other => panic!("{other:?}"),
            }
            assert!(!ok(&minimal(&f, kind), &[]).adapter.lora().unwrap().use_dora);
        }
        let text = format!(
            "base_model: m/x\nadapter:\n  type: ia3\n  use_dora: true\ndata: {{train: {}}}\noutput: {{dir: o}}\n",
            f.train
        );
        assert_msg(
            &err(&text, &[]),
            "recipes/x.yaml:4: adapter.use_dora: DoRA is a LoRA variant: use it with `type: lora` or `type: qlora`, not with ia3",
            &[],
        );
        let text = minimal(&f, "lora").replace("type: lora", "type: lora\n  use_dora: maybe");
        assert_msg(&err(&text, &[]), "recipes/x.yaml:", &["adapter.use_dora: expected true or false"]);
    }

    #[test]
    fn recipe_pissa_and_olora_keys() {
        use crate::adapter::LoraInit;
        let f = fixture();
        let with = |kind: &str, extra: &str| {
            minimal(&f, kind).replace(&format!("type: {kind}"), &format!("type: {kind}\n  init_lora_weights: {extra}"))
        };
        for (text, want, init) in [
            ("pissa", InitLoraWeights::Pissa, LoraInit::Pissa),
            ("pissa_niter_16", InitLoraWeights::PissaNiter(16), LoraInit::PissaNiter(16)),
            ("olora", InitLoraWeights::Olora, LoraInit::Olora),
        ] {
            let recipe = ok(&with("lora", text), &[]);
            assert_eq!(recipe.adapter.lora().unwrap().init_lora_weights, want);
            assert!(recipe.to_yaml().contains(&format!("init_lora_weights: {text}")), "{}", recipe.to_yaml());
            assert_eq!(Recipe::from_str(&recipe.to_yaml(), "resolved.yaml", &[]).unwrap(), recipe);
            match recipe.adapter.adapter_config() {
                crate::adapter::AdapterConfig::Lora(l) => assert_eq!(l.init, init),
                other => panic!("{other:?}"),
            }
            // --set reaches it too.
            let set = ok(&minimal(&f, "lora"), &[&format!("adapter.init_lora_weights={text}")]);
            assert_eq!(set.adapter.lora().unwrap().init_lora_weights, want);
        }
        for bad in ["pissa_niter_", "pissa_niter_x", "pissa_niter_-1", "PiSSA", "corda"] {
            assert_msg(
                &err(&with("lora", bad), &[]),
                "recipes/x.yaml:4: adapter.init_lora_weights: ",
                &[&format!("unknown value \"{bad}\""), "pissa_niter_N", "olora"],
            );
        }
        assert_msg(
            &err(&with("qlora", "pissa"), &[]),
            "recipes/x.yaml:4: adapter.init_lora_weights: pissa rewrites the base weights",
            &["NF4", "type: lora"],
        );
        assert_msg(
            &err(&with("qlora", "olora"), &[]),
            "recipes/x.yaml:4: adapter.init_lora_weights: olora rewrites the base weights",
            &[],
        );
        assert_msg(
            &err(&with("lora", "pissa_niter_4").replace("type: lora", "type: lora\n  use_dora: true"), &[]),
            "recipes/x.yaml:5: adapter.init_lora_weights: pissa_niter_4 with adapter.use_dora is not supported",
            &["magnitude vectors"],
        );
        assert_msg(
            &err(&with("ia3", "pissa"), &[]),
            "recipes/x.yaml:4: adapter.init_lora_weights: sets how LoRA's A and B start",
            &["init_ia3_weights"],
        );
    }

    #[test]
    fn recipe_load_from_file() {
        let f = fixture();
        let path = std::env::temp_dir().join(format!(
            "peftkit-recipe-{}-{:?}.yaml",
            std::process::id(),
            std::thread::current().id()
        ));
        if let Err(e) = fs::write(&path, minimal(&f, "lora").replace("  type: lora", "  type: lora\n  r: zero")) {
            panic!("write: {e}");
        }
        let result = Recipe::load(&path, &[]);
        let _ = fs::remove_file(&path);
        let e = match result {
            Err(e) => e,
            Ok(r) => panic!("should fail: {r:?}"),
        };
        assert_msg(
            &e,
            &format!("{}:4: adapter.r: expected a whole number ≥ 0, found a string \"zero\"", path.display()),
            &[],
        );
        let missing = Recipe::load(Path::new("/no/such/recipe.yaml"), &[]);
        assert!(matches!(missing, Err(RecipeError::Read { .. })), "{missing:?}");
    }
}
