//! Problems: an error before its origin (file line or override) is known. A [`Problem`] is a key
//! path ([`Seg`]s) and a [`ProblemKind`]; serde's messages are turned into recipe terms
//! ([`classify`]), and [`Source`] places a problem on the `--set` argument that caused it or on
//! the key's line in the file, giving a [`RecipeError`].

use serde::de::DeserializeOwned;
use serde_yaml::Value;

use super::locate::line_of;
use super::overrides::Override;
use super::{Origin, RecipeError};

/// One step of a key path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Seg {
    Key(String),
    Index(usize),
}

impl Seg {
    pub(super) fn key(name: &str) -> Seg {
        Seg::Key(name.to_string())
    }
}

fn path_string(path: &[Seg]) -> String {
    let mut out = String::new();
    for seg in path {
        match seg {
            Seg::Key(key) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            Seg::Index(index) => out.push_str(&format!("[{index}]")),
        }
    }
    out
}

#[derive(Debug)]
pub(super) enum ProblemKind {
    UnknownKey(Vec<String>),
    MissingKey,
    WrongType(String),
    Invalid(String),
}

#[derive(Debug)]
pub(super) struct Problem {
    pub(super) path: Vec<Seg>,
    pub(super) kind: ProblemKind,
}

/// A key path under construction, for [`Problem`]s.
pub(super) struct PathBuilder(Vec<Seg>);

impl PathBuilder {
    pub(super) fn index(mut self, index: usize) -> Self {
        self.0.push(Seg::Index(index));
        self
    }

    pub(super) fn with(self, kind: ProblemKind) -> Problem {
        Problem { path: self.0, kind }
    }
}

impl Problem {
    /// A dotted key path (`adapter.r`) as segments.
    pub(super) fn path_of(dotted: &str) -> PathBuilder {
        PathBuilder(dotted.split('.').map(Seg::key).collect())
    }

    pub(super) fn invalid(dotted: &str, message: impl Into<String>) -> Problem {
        Problem::path_of(dotted).with(ProblemKind::Invalid(message.into()))
    }

    /// Reads a deserialization error: its key path (after `prefix`) and a readable message.
    fn from_serde(prefix: &[Seg], err: &serde_path_to_error::Error<serde_yaml::Error>) -> Problem {
        use serde_path_to_error::Segment;
        let mut path = prefix.to_vec();
        for segment in err.path().iter() {
            match segment {
                Segment::Map { key } => path.push(Seg::Key(key.clone())),
                Segment::Seq { index } => path.push(Seg::Index(*index)),
                Segment::Enum { .. } | Segment::Unknown => {}
            }
        }
        let kind = classify(&err.inner().to_string(), &mut path);
        Problem { path, kind }
    }

    pub(super) fn into_error(self, at: Origin) -> RecipeError {
        let key = path_string(&self.path);
        match self.kind {
            ProblemKind::UnknownKey(expected) => RecipeError::UnknownKey { at, key, expected },
            ProblemKind::MissingKey => RecipeError::MissingKey { at, key },
            ProblemKind::WrongType(message) => RecipeError::WrongType { at, key, message },
            ProblemKind::Invalid(message) => RecipeError::Invalid { at, key, message },
        }
    }
}

/// Deserializes `value`, reporting failures with their key path below `prefix`.
pub(super) fn deserialize_at<T: DeserializeOwned>(prefix: &[Seg], value: Value) -> Result<T, Problem> {
    serde_path_to_error::deserialize(value).map_err(|err| Problem::from_serde(prefix, &err))
}

/// Turns serde's message into a [`ProblemKind`], completing `path` with the key it names when
/// serde reports the enclosing map (missing keys).
fn classify(message: &str, path: &mut Vec<Seg>) -> ProblemKind {
    if let Some(rest) = message.strip_prefix("unknown field ") {
        let names = backticked(rest);
        if let Some((key, expected)) = names.split_first() {
            if path.last() != Some(&Seg::Key(key.clone())) {
                path.push(Seg::Key(key.clone()));
            }
            return ProblemKind::UnknownKey(expected.to_vec());
        }
    }
    if let Some(rest) = message.strip_prefix("missing field ") {
        if let Some(key) = backticked(rest).into_iter().next() {
            path.push(Seg::Key(key));
            return ProblemKind::MissingKey;
        }
    }
    for (prefix, is_type) in [("invalid type: ", true), ("invalid value: ", false)] {
        if let Some((found, expected)) = message.strip_prefix(prefix).and_then(|rest| rest.rsplit_once(", expected ")) {
            let text = format!("expected {}, found {}", describe_expected(expected), describe_found(found));
            return if is_type { ProblemKind::WrongType(text) } else { ProblemKind::Invalid(text) };
        }
    }
    ProblemKind::Invalid(message.to_string())
}

/// The `name`s in "`a`, expected one of `b`, `c`".
fn backticked(text: &str) -> Vec<String> {
    text.split('`').skip(1).step_by(2).map(str::to_string).collect()
}

/// serde's "expected" (a visitor's description) in recipe terms.
fn describe_expected(expected: &str) -> String {
    match expected {
        "f64" | "f32" => "a number".into(),
        "usize" | "u64" | "u32" | "u16" | "u8" => "a whole number ≥ 0".into(),
        "isize" | "i64" | "i32" | "i16" | "i8" => "a whole number".into(),
        "a sequence" => "a list".into(),
        "path string" => "a path".into(),
        "field identifier" => "a key name".into(),
        "a boolean" => "true or false".into(),
        other if other.starts_with("struct ") => "a map".into(),
        other => other.to_string(),
    }
}

/// serde's `Unexpected` description in recipe terms.
fn describe_found(found: &str) -> String {
    let untick = |s: &str| s.trim_matches('`').to_string();
    if let Some(v) = found.strip_prefix("integer ") {
        format!("the number {}", untick(v))
    } else if let Some(v) = found.strip_prefix("floating point ") {
        format!("the number {}", untick(v))
    } else if let Some(v) = found.strip_prefix("boolean ") {
        untick(v)
    } else if let Some(v) = found.strip_prefix("string ") {
        format!("a string {v}")
    } else {
        match found {
            "unit value" => "null".into(),
            "sequence" => "a list".into(),
            "map" => "a map".into(),
            other => other.to_string(),
        }
    }
}

pub(super) fn describe_value(value: &Value) -> String {
    match value {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => format!("the number {n}"),
        Value::String(s) => format!("a string {s:?}"),
        Value::Sequence(_) => "a list".into(),
        Value::Mapping(_) => "a map".into(),
        Value::Tagged(tagged) => format!("a value tagged {}", tagged.tag),
    }
}

/// What an error needs to say where it comes from.
pub(super) struct Source<'a> {
    pub(super) name: &'a str,
    pub(super) text: &'a str,
    pub(super) overrides: &'a [Override],
}

impl Source<'_> {
    /// Names the `--set` argument that set the key, an ancestor or a descendant of it; else the
    /// key's line in the file.
    pub(super) fn error(&self, problem: Problem) -> RecipeError {
        let path = &problem.path;
        let from_override = self
            .overrides
            .iter()
            .rev()
            .find(|item| path.starts_with(&item.path) || (!path.is_empty() && item.path.starts_with(path)));
        let at = match from_override {
            Some(item) => Origin::Override { file: self.name.to_string(), arg: item.arg.clone() },
            None => Origin::File { file: self.name.to_string(), line: line_of(self.text, &problem.path) },
        };
        problem.into_error(at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recipe::testutil::{assert_msg, err, fixture, minimal};

    #[test]
    fn recipe_unknown_key_block_and_flow() {
        let f = fixture();
        let text = format!(
            "base_model: m/x\nadapter:\n  type: lora\n  rank: 4\ndata:\n  train: {}\noutput:\n  dir: o\n",
            f.train
        );
        let e = err(&text, &[]);
        assert!(matches!(e, RecipeError::UnknownKey { .. }), "{e:?}");
        assert_eq!(e.key(), Some("adapter.rank"));
        assert_eq!(e.line(), Some(4));
        assert_msg(
            &e,
            "recipes/x.yaml:4: adapter.rank: unknown key (expected one of r, lora_alpha,",
            &["target_modules"],
        );

        // Flow style, spread over lines.
        let text = format!(
            "base_model: m/x\nadapter: {{type: qlora,\n  r: 4,\n  bnb_4bit_foo: 1}}\n\
             data: {{train: {}}}\noutput: {{dir: o}}\n",
            f.train
        );
        let e = err(&text, &[]);
        assert_msg(
            &e,
            "recipes/x.yaml:4: adapter.bnb_4bit_foo: unknown key (expected one of r,",
            &["bnb_4bit_compute_dtype"],
        );

        // Top level and nested, in a one-line flow map.
        let text = format!(
            "base_model: m/x\nadapter: {{type: lora}}\ndata: {{train: {}, shufle: false}}\noutput: {{dir: o}}\n",
            f.train
        );
        assert_msg(&err(&text, &[]), "recipes/x.yaml:3: data.shufle: unknown key", &["shuffle"]);
        let text = format!("{}epochs: 3\n", minimal(&f, "lora"));
        assert_msg(
            &err(&text, &[]),
            "recipes/x.yaml:8: epochs: unknown key (expected one of base_model,",
            &["training"],
        );
    }

    #[test]
    fn recipe_wrong_types() {
        let f = fixture();
        let text = format!(
            "base_model: m/x\nadapter:\n  type: lora\ndata:\n  train: {}\ntraining:\n  learning_rate: fast\noutput:\n  dir: o\n",
            f.train
        );
        let e = err(&text, &[]);
        assert!(matches!(e, RecipeError::WrongType { .. }), "{e:?}");
        assert_eq!(
            e.to_string(),
            "recipes/x.yaml:7: training.learning_rate: expected a number, found a string \"fast\""
        );

        // Flow style on a later line; a list element; a negative count; a bool.
        let text = format!(
            "base_model: m/x\nadapter: {{type: lora,\n   target_modules: [q_proj,\n      3]}}\n\
             data: {{train: {}}}\noutput: {{dir: o}}\n",
            f.train
        );
        let e = err(&text, &[]);
        assert_eq!(e.key(), Some("adapter.target_modules[1]"));
        assert_msg(&e, "recipes/x.yaml:4: adapter.target_modules[1]: expected a string, found the number 3", &[]);
        let text = format!(
            "base_model: m/x\nadapter: {{type: ia3}}\ndata: {{train: {}}}\ntraining: {{epochs: 1,\n  micro_batch_size: -2}}\noutput: {{dir: o}}\n",
            f.train
        );
        assert_msg(
            &err(&text, &[]),
            "recipes/x.yaml:5: training.micro_batch_size: expected a whole number ≥ 0, found the number -2",
            &[],
        );
        let text = format!("{}training:\n  seed: 1\n  shuffle: yes\n", minimal(&f, "lora"));
        assert_msg(&err(&text, &[]), "recipes/x.yaml:10: training.shuffle: unknown key", &[]);
        let text = format!("{}\ntraining: {{lr_scheduler: cosinus}}\n", minimal(&f, "lora"));
        assert_msg(
            &err(&text, &[]),
            "recipes/x.yaml:9: training.lr_scheduler: unknown value \"cosinus\" (expected one of constant, linear, cosine)",
            &[],
        );
        let text = format!(
            "base_model: m/x\nadapter:\n  type: lora\n  use_rslora: 3\ndata: {{train: {}}}\noutput: {{dir: o}}\n",
            f.train
        );
        assert_msg(
            &err(&text, &[]),
            "recipes/x.yaml:4: adapter.use_rslora: expected true or false, found the number 3",
            &[],
        );
        let text = "base_model: m/x\nadapter: lora\ndata: {train: x}\noutput: {dir: o}\n";
        assert_msg(
            &err(text, &[]),
            "recipes/x.yaml:2: adapter: expected a map with a `type` key",
            &["found a string \"lora\""],
        );
        assert_msg(&err("- a\n- b\n", &[]), "recipes/x.yaml: a recipe must be a YAML map", &[]);
    }

    #[test]
    fn recipe_missing_keys() {
        let f = fixture();
        let e = err("base_model: m/x\nadapter: {type: lora}\ndata:\n  format: chat\noutput: {dir: o}\n", &[]);
        assert!(matches!(e, RecipeError::MissingKey { .. }), "{e:?}");
        assert_eq!(e.key(), Some("data.train"));
        assert_eq!(e.to_string(), "recipes/x.yaml:3: data.train: missing required key");

        let text = format!("adapter: {{type: lora}}\ndata: {{train: {}}}\noutput: {{dir: o}}\n", f.train);
        assert_msg(&err(&text, &[]), "recipes/x.yaml: base_model: missing required key", &[]);
        let text = format!("base_model: m/x\nadapter: {{r: 4}}\ndata: {{train: {}}}\noutput: {{dir: o}}\n", f.train);
        assert_msg(&err(&text, &[]), "recipes/x.yaml:2: adapter.type: missing required key", &[]);
        let text =
            format!("base_model: m/x\nadapter: {{type: dora}}\ndata: {{train: {}}}\noutput: {{dir: o}}\n", f.train);
        assert_msg(
            &err(&text, &[]),
            "recipes/x.yaml:2: adapter.type: unknown adapter type \"dora\" (expected one of lora, qlora, ia3)",
            &[],
        );
        let text = format!("base_model: m/x\nadapter: {{type: lora}}\ndata: {{train: {}}}\noutput: {{}}\n", f.train);
        assert_msg(&err(&text, &[]), "recipes/x.yaml:4: output.dir: missing required key", &[]);
    }
}
