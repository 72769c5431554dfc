//! Recipe errors: [`RecipeError`] (every way reading a recipe can fail) and [`Origin`] (where
//! a problem comes from: a file line, a `--set` argument, or nowhere known), displayed as
//! `origin: key.path: message`.

use std::fmt;

/// Where a recipe problem comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// A place in the recipe file. `line` (1-based) is `None` when the key is not written in the
    /// file (a default value, or a missing top-level key).
    File {
        /// The recipe's name as given to [`Recipe::load`](super::Recipe::load) / [`Recipe::from_str`](super::Recipe::from_str).
        file: String,
        /// 1-based line of the key, when it could be found.
        line: Option<usize>,
    },
    /// A `--set KEY=VALUE` override.
    Override {
        /// The recipe the override applies to.
        file: String,
        /// The override argument, as given (without `--set`).
        arg: String,
    },
    /// No source is known: [`Recipe::validate`](super::Recipe::validate) called on a recipe built in code.
    Unknown,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::File { file, line: Some(line) } => write!(f, "{file}:{line}"),
            Origin::File { file, line: None } => write!(f, "{file}"),
            Origin::Override { arg, .. } => write!(f, "--set {arg}"),
            Origin::Unknown => write!(f, "recipe"),
        }
    }
}

/// Everything that can go wrong while reading a recipe.
///
/// Displayed as `origin: key.path: message`, e.g.
/// `recipes/x.yaml:4: adapter.rank: unknown key (expected one of r, lora_alpha, …)`.
#[derive(Debug, thiserror::Error)]
pub enum RecipeError {
    /// The recipe file could not be read.
    #[error("{file}: cannot read the recipe: {source}")]
    Read {
        /// The path as given.
        file: String,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The text is not valid YAML.
    #[error("{}: invalid YAML: {message}", place(.file, *.line, *.column))]
    Syntax {
        /// The recipe's name.
        file: String,
        /// 1-based line, when the parser reported one.
        line: Option<usize>,
        /// 1-based column, when the parser reported one.
        column: Option<usize>,
        /// The parser's message.
        message: String,
    },
    /// A `--set` argument is malformed or cannot be applied.
    #[error("--set {arg}: {message}")]
    BadOverride {
        /// The argument, as given.
        arg: String,
        /// What is wrong with it.
        message: String,
    },
    /// A key that the recipe format does not have.
    #[error("{at}: {key}: unknown key ({})", expected_list(.expected))]
    UnknownKey {
        /// Where the key is written.
        at: Origin,
        /// Full key path, e.g. `adapter.rank`.
        key: String,
        /// The keys allowed at that place.
        expected: Vec<String>,
    },
    /// A required key is absent.
    #[error("{at}: {key}: missing required key")]
    MissingKey {
        /// Where the enclosing map is written.
        at: Origin,
        /// Full key path of the missing key, e.g. `data.train`.
        key: String,
    },
    /// A value of the wrong type (a string where a number is expected, …).
    #[error("{at}: {}{message}", keyed(.key))]
    WrongType {
        /// Where the value is written.
        at: Origin,
        /// Full key path (empty for the document itself).
        key: String,
        /// E.g. `expected a number, found a string "fast"`.
        message: String,
    },
    /// A value of the right type that is not acceptable (`r: 0`, a missing data file, …).
    #[error("{at}: {}{message}", keyed(.key))]
    Invalid {
        /// Where the value is written.
        at: Origin,
        /// Full key path.
        key: String,
        /// What is wrong.
        message: String,
    },
}

impl RecipeError {
    /// The full key path the error is about, if any (e.g. `training.learning_rate`).
    pub fn key(&self) -> Option<&str> {
        match self {
            RecipeError::UnknownKey { key, .. }
            | RecipeError::MissingKey { key, .. }
            | RecipeError::WrongType { key, .. }
            | RecipeError::Invalid { key, .. } => Some(key),
            _ => None,
        }
    }

    /// Where the error comes from, for key-level errors.
    pub fn origin(&self) -> Option<&Origin> {
        match self {
            RecipeError::UnknownKey { at, .. }
            | RecipeError::MissingKey { at, .. }
            | RecipeError::WrongType { at, .. }
            | RecipeError::Invalid { at, .. } => Some(at),
            _ => None,
        }
    }

    /// The 1-based line in the recipe file, when known.
    pub fn line(&self) -> Option<usize> {
        match self {
            RecipeError::Syntax { line, .. } => *line,
            _ => match self.origin() {
                Some(Origin::File { line, .. }) => *line,
                _ => None,
            },
        }
    }
}

fn place(file: &str, line: Option<usize>, column: Option<usize>) -> String {
    match (line, column) {
        (Some(line), Some(column)) => format!("{file}:{line}:{column}"),
        (Some(line), None) => format!("{file}:{line}"),
        _ => file.to_string(),
    }
}

fn keyed(key: &str) -> String {
    if key.is_empty() {
        String::new()
    } else {
        format!("{key}: ")
    }
}

fn expected_list(expected: &[String]) -> String {
    if expected.is_empty() {
        "no keys are allowed here".to_string()
    } else {
        format!("expected one of {}", expected.join(", "))
    }
}
