//! Which modules an adapter attaches to: PEFT's `target_modules` semantics.
//!
//! As in PEFT (`check_target_module_exists`): a list matches a module whose full path equals an entry or ends
//! with `.` + entry; a single string other than `all-linear` is a regex that must match the whole path
//! (`re.fullmatch`); `all-linear` is every linear projection of the decoder layers (the output head is excluded).
//! `layers_to_transform` further restricts matches to the listed decoder layer indices.

use regex::Regex;

/// The `target_modules` of an adapter config.
#[derive(Debug, Clone, PartialEq)]
pub enum TargetModules {
    /// Every linear projection except the output head.
    AllLinear,
    /// Module names (`q_proj`) or fully qualified paths (`model.layers.0.self_attn.q_proj`).
    List(Vec<String>),
    /// A regex matched against the whole module path.
    Regex(String),
}

impl TargetModules {
    /// Whether the projection at `path` is targeted (no layer restriction); an invalid regex matches nothing.
    pub fn matches(&self, path: &str) -> bool {
        self.matcher(None).is_ok_and(|m| m.matches(path))
    }

    /// Builds a matcher; fails only on an invalid regex.
    pub fn matcher(&self, layers_to_transform: Option<&[usize]>) -> Result<TargetMatcher, regex::Error> {
        let regex = match self {
            TargetModules::Regex(r) => Some(Regex::new(&format!("^(?:{r})$"))?),
            _ => None,
        };
        Ok(TargetMatcher { targets: self.clone(), regex, layers: layers_to_transform.map(|l| l.to_vec()) })
    }
}

/// Decides, for each module path, whether the adapter attaches there.
#[derive(Debug, Clone)]
pub struct TargetMatcher {
    targets: TargetModules,
    regex: Option<Regex>,
    layers: Option<Vec<usize>>,
}

/// The decoder layer index in a path like `model.layers.12.mlp.up_proj`.
pub fn layer_index(path: &str) -> Option<usize> {
    let mut parts = path.split('.');
    while let Some(p) = parts.next() {
        if p == "layers" || p == "h" || p == "blocks" {
            return parts.next().and_then(|n| n.parse().ok());
        }
    }
    None
}

impl TargetMatcher {
    /// True when `path` (a linear module inside a decoder layer) is targeted.
    pub fn matches(&self, path: &str) -> bool {
        let hit = match &self.targets {
            // The output head is never a target of all-linear (PEFT excludes it).
            TargetModules::AllLinear => path != "lm_head" && !path.ends_with(".lm_head"),
            TargetModules::List(names) => names.iter().any(|n| path == n || path.ends_with(&format!(".{n}"))),
            TargetModules::Regex(_) => self.regex.as_ref().is_some_and(|r| r.is_match(path)),
        };
        hit && match &self.layers {
            None => true,
            Some(layers) => layer_index(path).is_some_and(|i| layers.contains(&i)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peft_matching_rules() {
        let list =
            TargetModules::List(vec!["q_proj".into(), "model.layers.1.mlp.up_proj".into()]).matcher(None).unwrap();
        assert!(list.matches("model.layers.0.self_attn.q_proj"));
        assert!(list.matches("model.layers.1.mlp.up_proj"));
        assert!(!list.matches("model.layers.0.mlp.up_proj"));
        assert!(!list.matches("model.layers.0.self_attn.qq_proj"));
        let re = TargetModules::Regex(r".*\.(q|v)_proj".into()).matcher(None).unwrap();
        assert!(re.matches("model.layers.3.self_attn.v_proj"));
        assert!(!re.matches("model.layers.3.self_attn.k_proj"));
        // fullmatch: a regex matching only part of the path does not count
        let re = TargetModules::Regex("q_proj".into()).matcher(None).unwrap();
        assert!(!re.matches("model.layers.3.self_attn.q_proj"));
        let some = TargetModules::AllLinear.matcher(Some(&[1])).unwrap();
        assert!(some.matches("model.layers.1.mlp.down_proj"));
        assert!(!some.matches("model.layers.10.mlp.down_proj"));
        assert_eq!(layer_index("model.layers.12.mlp.up_proj"), Some(12));
    }
}
