//! Positions in the recipe text. YAML syntax errors keep the parser's position (a duplicate key
//! points at the repeated key, not its map). Since values deserialized through a `Value` carry no
//! positions, [`line_of`] finds a key path's line by a second pass over the text: a
//! `DeserializeSeed` walks serde_yaml's event stream down the key path and fails on purpose at the
//! target key, and serde_yaml stamps that failure with the key's position. This works for block
//! and flow style alike.

use std::fmt;

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserializer;

use super::problem::Seg;
use super::RecipeError;

pub(super) fn syntax_error(file: &str, text: &str, err: &serde_yaml::Error) -> RecipeError {
    let mut position = err.location().map(|loc| (loc.line(), loc.column()));
    let mut message = err.to_string();
    if let Some((line, column)) = position {
        // serde_yaml appends the position we already show in front; drop that copy.
        message = message.replacen(&format!(" at line {line} column {column}"), "", 1);
    }
    // serde_yaml places a duplicate key at its map's start; point at the repeated key instead.
    if let Some(duplicate) = duplicate_key_position(text, &message) {
        position = Some(duplicate);
    }
    RecipeError::Syntax {
        file: file.to_string(),
        line: position.map(|(line, _)| line),
        column: position.map(|(_, column)| column),
        message,
    }
}

/// How deep a recipe may nest flow collections (`[`, `{`). A recipe needs three or four levels; serde_yaml stops at
/// 128, but only after a parse whose time grows with the square of the depth (minutes for a 400 KB file).
pub(super) const MAX_NESTING: usize = 64;

/// The recipe text as UTF-8, or an error naming the line and byte of the first invalid byte.
pub(super) fn utf8_text<'a>(file: &str, bytes: &'a [u8]) -> Result<&'a str, RecipeError> {
    std::str::from_utf8(bytes).map_err(|err| {
        let at = err.valid_up_to();
        let before = &bytes[..at];
        let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
        let column = at - before.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1) + 1;
        RecipeError::Syntax {
            file: file.to_string(),
            line: Some(line),
            column: Some(column),
            message: format!("byte {at} (0x{:02x}) is not UTF-8 text: a recipe is a YAML text file", bytes[at]),
        }
    })
}

/// An error at the first place where flow collections (`[`, `{`) nest deeper than [`MAX_NESTING`], found by a
/// linear scan that skips quoted strings and comments. Block nesting needs indentation, so its depth is bounded by
/// the line lengths and serde_yaml's own limit refuses it quickly.
pub(super) fn nesting_error(file: &str, text: &str) -> Option<RecipeError> {
    let (mut depth, mut line, mut column) = (0usize, 1usize, 0usize);
    let mut quote: Option<char> = None;
    let mut comment = false;
    let mut prev = '\n';
    for c in text.chars() {
        column += 1;
        if c == '\n' {
            // A comment ends with its line; a quoted scalar may go on.
            (line, column, comment) = (line + 1, 0, false);
            prev = c;
            continue;
        }
        match quote {
            Some(q) => {
                if c == q && !(q == '"' && prev == '\\') {
                    quote = None;
                }
            }
            None if comment => {}
            None => match c {
                '#' if prev.is_whitespace() => comment = true,
                '"' | '\'' if prev.is_whitespace() || matches!(prev, '[' | '{' | ',' | ':') => quote = Some(c),
                '[' | '{' => {
                    depth += 1;
                    if depth > MAX_NESTING {
                        return Some(RecipeError::Syntax {
                            file: file.to_string(),
                            line: Some(line),
                            column: Some(column),
                            message: format!(
                                "collections nested deeper than {MAX_NESTING} levels (a recipe needs at most 4)"
                            ),
                        });
                    }
                }
                ']' | '}' => depth = depth.saturating_sub(1),
                _ => {}
            },
        }
        prev = if quote.is_some() && c == '\\' && prev == '\\' { ' ' } else { c };
    }
    None
}

/// Where the second occurrence of the key named by serde_yaml's
/// `[path: ]duplicate entry with key "name"` message is.
fn duplicate_key_position(text: &str, message: &str) -> Option<(usize, usize)> {
    const MARK: &str = "duplicate entry with key \"";
    let at = message.find(MARK)?;
    let key = message[at + MARK.len()..].split('"').next()?;
    if key.contains('\\') {
        return None; // an escaped key: not worth decoding
    }
    let mut path = Vec::new();
    if let Some(parent) = message[..at].strip_suffix(": ") {
        // serde_yaml writes paths like `adapter.target_modules[1]`.
        for part in parent.split('.') {
            let mut pieces = part.split('[');
            let name = pieces.next().unwrap_or_default();
            if !name.is_empty() {
                path.push(Seg::key(name));
            }
            for index in pieces {
                path.push(Seg::Index(index.strip_suffix(']')?.parse().ok()?));
            }
        }
    }
    path.push(Seg::key(key));
    locate(text, &path, 1)
}

/// Marker carried by the deliberate error that stops the walk at the target.
const FOUND: &str = "__peftkit_recipe_key_found__";

/// The 1-based line of `path` in `text`: the key's line for a map key, the element's for a list
/// index. When the path is not written (a default, a missing key), the line of its nearest
/// written ancestor; `None` if none is.
pub(super) fn line_of(text: &str, path: &[Seg]) -> Option<usize> {
    (1..=path.len()).rev().find_map(|len| locate(text, &path[..len], 0)).map(|(line, _column)| line)
}

/// The 1-based (line, column) of exactly `path` in `text`; with `skip` = n, of the (n+1)-th
/// occurrence of its last key (duplicate keys).
fn locate(text: &str, path: &[Seg], skip: usize) -> Option<(usize, usize)> {
    let deserializer = serde_yaml::Deserializer::from_str(text);
    let finder = Finder { path, skip };
    match finder.deserialize(deserializer) {
        Err(err) if err.to_string().contains(FOUND) => err.location().map(|loc| (loc.line(), loc.column())),
        _ => None,
    }
}

/// Walks the event stream down `path`; fails with [`FOUND`] at the target, which serde_yaml
/// stamps with the position of the event it was reading. Returns `Ok(())` when the path is absent.
struct Finder<'p> {
    path: &'p [Seg],
    /// Occurrences of the final key to pass over before stopping.
    skip: usize,
}

impl<'de> DeserializeSeed<'de> for Finder<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl Finder<'_> {
    fn scalar<E: de::Error>(&self) -> Result<(), E> {
        if self.path.is_empty() {
            Err(E::custom(FOUND))
        } else {
            Ok(())
        }
    }
}

impl<'de> Visitor<'de> for Finder<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(FOUND)
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        self.scalar()
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        self.scalar()
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        self.scalar()
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        self.scalar()
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        self.scalar()
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.scalar()
    }

    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        self.scalar()
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let Some((head, rest)) = self.path.split_first() else {
            return Err(de::Error::custom(FOUND));
        };
        let want = match head {
            Seg::Key(want) => Some(want.as_str()),
            Seg::Index(_) => None,
        };
        let is_last = rest.is_empty();
        let mut matches = 0;
        loop {
            let seed = KeySeed { want, stop_here: is_last && matches == self.skip };
            match map.next_key_seed(seed)? {
                None => return Ok(()),
                Some(true) if !is_last && matches == 0 => {
                    matches += 1;
                    let finder = Finder { path: rest, skip: self.skip };
                    map.next_value_seed(finder)?;
                }
                Some(true) => {
                    matches += 1;
                    map.next_value::<IgnoredAny>()?;
                }
                Some(false) => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let Some((head, rest)) = self.path.split_first() else {
            return Err(de::Error::custom(FOUND));
        };
        let want = match head {
            Seg::Index(index) => Some(*index),
            Seg::Key(_) => None,
        };
        let mut index = 0;
        loop {
            let more = if Some(index) == want {
                let finder = Finder { path: rest, skip: self.skip };
                seq.next_element_seed(finder)?
            } else {
                seq.next_element::<IgnoredAny>()?.map(|_| ())
            };
            if more.is_none() {
                return Ok(());
            }
            index += 1;
        }
    }
}

/// Reads a map key; `true` if it is the wanted one. With `stop_here`, fails with [`FOUND`] on
/// it instead, so the error carries the key's position.
struct KeySeed<'k> {
    want: Option<&'k str>,
    stop_here: bool,
}

impl<'de> DeserializeSeed<'de> for KeySeed<'_> {
    type Value = bool;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<bool, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl KeySeed<'_> {
    fn check<E: de::Error>(&self, key: &str) -> Result<bool, E> {
        match self.want {
            Some(want) if want == key => {
                if self.stop_here {
                    Err(E::custom(FOUND))
                } else {
                    Ok(true)
                }
            }
            _ => Ok(false),
        }
    }
}

impl<'de> Visitor<'de> for KeySeed<'_> {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a map key")
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<bool, E> {
        self.check(key)
    }

    fn visit_bool<E: de::Error>(self, key: bool) -> Result<bool, E> {
        self.check(&key.to_string())
    }

    fn visit_i64<E: de::Error>(self, key: i64) -> Result<bool, E> {
        self.check(&key.to_string())
    }

    fn visit_u64<E: de::Error>(self, key: u64) -> Result<bool, E> {
        self.check(&key.to_string())
    }

    fn visit_f64<E: de::Error>(self, key: f64) -> Result<bool, E> {
        self.check(&key.to_string())
    }

    fn visit_unit<E: de::Error>(self) -> Result<bool, E> {
        Ok(false)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<bool, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(false)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<bool, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recipe::testutil::{assert_msg, err};

    #[test]
    fn recipe_syntax_errors() {
        let e = err("base_model: m/x\nadapter:\n  type: lora\n r: 3\n", &[]);
        assert!(matches!(e, RecipeError::Syntax { .. }), "{e:?}");
        assert_eq!(e.line(), Some(4));
        assert_msg(&e, "recipes/x.yaml:4:", &["invalid YAML"]);

        let e = err("base_model: m/x\nadapter: {type: lora,\n  r: [1, 2}\n", &[]);
        assert!(matches!(e, RecipeError::Syntax { line: Some(3), column: Some(_), .. }), "{e:?}");

        let e = err("adapter: {type: lora}\nadapter: {type: ia3}\n", &[]);
        assert_msg(&e, "recipes/x.yaml:2:1: invalid YAML: duplicate entry with key \"adapter\"", &[]);
        let e = err("base_model: m\nadapter:\n  type: lora\n  r: 4\n  r: 8\n", &[]);
        assert_msg(&e, "recipes/x.yaml:5:3: invalid YAML: adapter: duplicate entry with key \"r\"", &[]);
        let e = err("data: {train: a,\n  train: b}\n", &[]);
        assert_msg(&e, "recipes/x.yaml:2:3:", &["duplicate entry"]);
    }
}
