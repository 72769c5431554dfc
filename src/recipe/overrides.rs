//! `--set KEY=VALUE` overrides: parsing an argument and writing its value into the document tree
//! (creating missing maps, indexing into lists) before the recipe is deserialized.

use serde_yaml::{Mapping, Value};

use super::problem::{describe_value, Seg};
use super::RecipeError;

/// One `--set KEY=VALUE` argument.
#[derive(Debug)]
pub(super) struct Override {
    pub(super) arg: String,
    keys: Vec<String>,
    value: Value,
    /// The key path written: the keys, with numeric keys into lists as indices (set once applied).
    pub(super) path: Vec<Seg>,
}

impl Override {
    pub(super) fn parse(arg: &str) -> Result<Override, RecipeError> {
        let bad = |message: &str| RecipeError::BadOverride { arg: arg.to_string(), message: message.to_string() };
        let Some((key, raw)) = arg.split_once('=') else {
            return Err(bad("expected KEY=VALUE, e.g. --set training.learning_rate=1e-4"));
        };
        let key = key.trim();
        if key.is_empty() {
            return Err(bad("the key before `=` is empty"));
        }
        let keys: Vec<String> = key.split('.').map(|k| k.trim().to_string()).collect();
        if keys.iter().any(String::is_empty) {
            return Err(bad("the key has an empty part (write it like adapter.r)"));
        }
        let value: Value =
            serde_yaml::from_str(raw).map_err(|err| bad(&format!("the value is not valid YAML: {err}")))?;
        let path = keys.iter().map(|k| Seg::Key(k.clone())).collect();
        Ok(Override { arg: arg.to_string(), keys, value, path })
    }

    /// Writes the value into `root`, creating missing (or null) intermediate maps; returns the
    /// key path written.
    pub(super) fn apply(&self, root: &mut Value) -> Result<Vec<Seg>, RecipeError> {
        let mut node = root;
        let mut path = Vec::with_capacity(self.keys.len());
        for (depth, key) in self.keys.iter().enumerate() {
            if node.is_null() {
                *node = Value::Mapping(Mapping::new());
            }
            let last = depth + 1 == self.keys.len();
            node = match node {
                Value::Mapping(map) => {
                    path.push(Seg::Key(key.clone()));
                    let slot = map.entry(Value::String(key.clone())).or_insert(Value::Null);
                    if last {
                        *slot = self.value.clone();
                        return Ok(path);
                    }
                    slot
                }
                Value::Sequence(items) => {
                    let len = items.len();
                    let index = key.parse::<usize>().ok().filter(|&i| i < len);
                    let Some(index) = index else {
                        let what = match len {
                            0 => "is an empty list".to_string(),
                            _ => format!("is a list of {len} items; use an index below {len}"),
                        };
                        return Err(self.cannot(depth, &what));
                    };
                    path.push(Seg::Index(index));
                    let item = &mut items[index];
                    if last {
                        *item = self.value.clone();
                        return Ok(path);
                    }
                    item
                }
                other => {
                    let found = describe_value(other);
                    return Err(self.cannot(depth, &format!("is {found}, not a map")));
                }
            };
        }
        Ok(path)
    }

    fn cannot(&self, depth: usize, what: &str) -> RecipeError {
        let parent = if depth == 0 { "the recipe".to_string() } else { format!("`{}`", self.keys[..depth].join(".")) };
        RecipeError::BadOverride {
            arg: self.arg.clone(),
            message: format!("cannot set `{}`: {parent} {what}", self.keys[depth]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recipe::testutil::{assert_msg, err, fixture, full_block, minimal, ok};
    use crate::recipe::{Origin, TargetModules};
    use std::path::PathBuf;

    #[test]
    fn recipe_overrides() {
        let f = fixture();
        let other = f.valid.clone();
        let r = ok(
            &full_block(&f),
            &[
                "training.learning_rate=1e-4",
                "adapter.r=8",
                &format!("data.train={other}"),
                "adapter.target_modules=[q_proj,v_proj]",
                "output.hub_model_id=me/run",
            ],
        );
        assert_eq!(r.training.learning_rate, Some(1e-4));
        let lora = r.adapter.lora().cloned().unwrap_or_default();
        assert_eq!(lora.r, 8);
        assert_eq!(lora.lora_alpha, 32.0);
        assert_eq!(lora.target_modules, TargetModules::List(vec!["q_proj".into(), "v_proj".into()]));
        assert_eq!(r.data.train, PathBuf::from(&other));
        assert_eq!(r.output.hub_model_id.as_deref(), Some("me/run"));

        // Missing intermediate maps are created; the adapter type can be switched.
        let r = ok(&minimal(&f, "lora"), &["training.seed=7", "adapter.type=ia3", "revision=v1.0"]);
        assert_eq!(r.training.seed, 7);
        assert_eq!(r.adapter.type_name(), "ia3");
        assert_eq!(r.training.learning_rate, Some(1e-2));
        assert_eq!(r.revision.as_deref(), Some("v1.0"));
        // A whole recipe from overrides alone, and an index into a list.
        let r = ok(
            "",
            &[
                "base_model=m/x",
                "adapter={type: lora, target_modules: [a, b]}",
                &format!("data.train={}", f.train),
                "output.dir=o",
                "adapter.target_modules.1=c",
            ],
        );
        assert_eq!(r.adapter.target_modules(), &TargetModules::List(vec!["a".into(), "c".into()]));

        // Errors caused by an override name the argument, not a line.
        assert_msg(
            &err(&minimal(&f, "lora"), &["adapter.target_modules.0=x"]),
            "--set adapter.target_modules.0=x: adapter.target_modules: expected all-linear, a regex, \
             or a list of module names, found a map",
            &[],
        );
        let e = err(&full_block(&f), &["adapter.r=0"]);
        assert_eq!(e.to_string(), "--set adapter.r=0: adapter.r: must be at least 1");
        assert!(matches!(e.origin(), Some(Origin::Override { arg, .. }) if arg == "adapter.r=0"));
        assert_eq!(e.line(), None);
        assert_msg(
            &err(&full_block(&f), &["training.learning_rate=fast"]),
            "--set training.learning_rate=fast: training.learning_rate: expected a number, found a string \"fast\"",
            &[],
        );
        assert_msg(
            &err(&full_block(&f), &["adapter.rank=4"]),
            "--set adapter.rank=4: adapter.rank: unknown key (expected one of r,",
            &[],
        );
        assert_msg(
            &err(&full_block(&f), &["data={format: chat}"]),
            "--set data={format: chat}: data.train: missing required key",
            &[],
        );
        // …while other errors still point into the file.
        let text = full_block(&f).replace("  r: 16", "  r: 0");
        assert_msg(&err(&text, &["training.seed=1"]), "recipes/x.yaml:7: adapter.r:", &[]);

        // Malformed arguments.
        for (arg, expected) in [
            ("adapter.r", "--set adapter.r: expected KEY=VALUE"),
            ("=3", "--set =3: the key before `=` is empty"),
            ("adapter..r=3", "--set adapter..r=3: the key has an empty part"),
            ("adapter.target_modules=[q_proj", "--set adapter.target_modules=[q_proj: the value is not valid YAML"),
            ("base_model.x=1", "--set base_model.x=1: cannot set `x`: `base_model` is a string"),
        ] {
            let e = err(&full_block(&f), &[arg]);
            assert!(matches!(e, RecipeError::BadOverride { .. }), "{e:?}");
            assert_msg(&e, expected, &[]);
        }
    }
}
