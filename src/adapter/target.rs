//! Which modules an adapter attaches to: PEFT's `target_modules`, `exclude_modules` and `layers_to_transform`.
//!
//! As in PEFT (`tuners_utils.check_target_module_exists`): a list matches a module whose full path equals an entry
//! or ends with `.` + entry; a single string other than `all-linear` is a regex that must match the whole path
//! (`re.fullmatch`); `all-linear` is every linear projection of the decoder layers (the output head is excluded).
//! `exclude_modules` follows the same two rules (a list: exact path or `.`-suffix; a string: a full-match regex) and
//! wins over `target_modules`: an excluded module is never adapted. An empty `exclude_modules` (`[]` or `""`)
//! excludes nothing, as PEFT's truthiness test does. `layers_to_transform` further restricts matches to the listed
//! decoder layer indices; `layers_pattern` names the container those indices count in (PEFT matches
//! `.<pattern>.<index>.`): peftkit's models keep their decoder layers in `model.layers`, so `layers` is the only
//! pattern accepted ([`LayersPattern::check`]).
//!
//! ## `target_parameters` (PEFT ≥ 0.17): not supported, refused
//!
//! PEFT's `target_parameters` puts LoRA on a bare `nn.Parameter` rather than an `nn.Linear`: mixture-of-experts
//! blocks in transformers (Llama 4's `feed_forward.experts.gate_up_proj` / `down_proj`, gpt-oss's
//! `mlp.experts.gate_up_proj` / `down_proj`, Qwen3-MoE / Mixtral in recent transformers) store every expert's
//! weight in one 3-D tensor (n_experts, in, out) and index it per token. PEFT wraps such a parameter in
//! `lora.ParamWrapper`: A is (r·n_experts, in) and B is (out, r·n_experts), one rank-r pair per expert, and the
//! delta is added to the parameter through `torch.nn.utils.parametrize` for the duration of the forward. On disk the
//! tensors are named after the parameter's owner module, `base_model.model.<module path>.lora_A.weight` /
//! `.lora_B.weight` (e.g. `model.layers.0.feed_forward.experts.lora_A.weight`), with `.<param name>` inserted when
//! one module owns several targeted parameters. Supporting it here would take: an MoE base (router + experts in
//! `model/`, a `FrozenWeight` per expert or one 3-D weight), an adapter variant holding the per-expert A/B blocks
//! and a grouped (per-expert) LoRA matmul in `ops/`, the key mapping above in `peft_format`, and a fixture from PEFT
//! for the logits. Until then an `adapter_config.json` or a recipe with a non-empty `target_parameters` is refused
//! with an error naming the key, rather than loaded without the adapter it describes.

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

/// PEFT's `exclude_modules`: modules never adapted, even when `target_modules` matches them.
#[derive(Debug, Clone, PartialEq)]
pub enum ExcludeModules {
    /// Module names (`down_proj`) or fully qualified paths: an exact path or a `.`-suffix match.
    List(Vec<String>),
    /// A regex matched against the whole module path.
    Regex(String),
}

impl ExcludeModules {
    /// True when nothing is excluded (`[]` or `""`, as PEFT treats a falsy value).
    pub fn is_empty(&self) -> bool {
        match self {
            ExcludeModules::List(l) => l.is_empty(),
            ExcludeModules::Regex(r) => r.is_empty(),
        }
    }
}

/// PEFT's `layers_pattern`: the name of the module list that `layers_to_transform` indexes, a string or a list.
#[derive(Debug, Clone, PartialEq)]
pub enum LayersPattern {
    One(String),
    List(Vec<String>),
}

impl LayersPattern {
    /// The container peftkit's models keep their decoder layers in (`model.layers`).
    pub const SUPPORTED: &'static str = "layers";

    /// The names given.
    pub fn names(&self) -> Vec<&str> {
        match self {
            LayersPattern::One(s) => vec![s.as_str()],
            LayersPattern::List(l) => l.iter().map(String::as_str).collect(),
        }
    }

    /// True for `""` and `[]`, which PEFT treats as no pattern.
    pub fn is_empty(&self) -> bool {
        self.names().iter().all(|n| n.is_empty())
    }

    /// `Err((index, name))` for the first name other than `layers` (the index within a list; 0 for a string).
    pub fn check(&self) -> Result<(), (usize, String)> {
        match self.names().iter().position(|n| *n != Self::SUPPORTED && !n.is_empty()) {
            Some(i) => Err((i, self.names()[i].to_string())),
            None => Ok(()),
        }
    }
}

/// Matches a module path against a list (exact or `.`-suffix) or a compiled full-match regex.
fn list_matches(names: &[String], path: &str) -> bool {
    names.iter().any(|n| path == n || path.ends_with(&format!(".{n}")))
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
        Ok(TargetMatcher {
            targets: self.clone(),
            regex,
            layers: layers_to_transform.map(|l| l.to_vec()),
            exclude: None,
            exclude_regex: None,
        })
    }
}

/// Decides, for each module path, whether the adapter attaches there.
#[derive(Debug, Clone)]
pub struct TargetMatcher {
    targets: TargetModules,
    regex: Option<Regex>,
    layers: Option<Vec<usize>>,
    exclude: Option<ExcludeModules>,
    exclude_regex: Option<Regex>,
}

/// How a set of module paths fares against a matcher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Coverage {
    /// Paths that are adapted.
    pub adapted: usize,
    /// Paths that `target_modules` (and `layers_to_transform`) select but `exclude_modules` removes.
    pub excluded: usize,
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
    /// The same matcher, also leaving out the modules `exclude` names; fails only on an invalid regex.
    pub fn excluding(mut self, exclude: Option<&ExcludeModules>) -> Result<Self, regex::Error> {
        let exclude = exclude.filter(|e| !e.is_empty());
        self.exclude_regex = match exclude {
            Some(ExcludeModules::Regex(r)) => Some(Regex::new(&format!("^(?:{r})$"))?),
            _ => None,
        };
        self.exclude = exclude.cloned();
        Ok(self)
    }

    /// True when `path` (a linear module inside a decoder layer) is targeted and not excluded.
    pub fn matches(&self, path: &str) -> bool {
        self.selects(path) && !self.excludes(path)
    }

    /// True when `target_modules` and `layers_to_transform` select `path`, exclusions aside.
    pub fn selects(&self, path: &str) -> bool {
        let hit = match &self.targets {
            // The output head is never a target of all-linear (PEFT excludes it).
            TargetModules::AllLinear => path != "lm_head" && !path.ends_with(".lm_head"),
            TargetModules::List(names) => list_matches(names, path),
            TargetModules::Regex(_) => self.regex.as_ref().is_some_and(|r| r.is_match(path)),
        };
        hit && match &self.layers {
            None => true,
            Some(layers) => layer_index(path).is_some_and(|i| layers.contains(&i)),
        }
    }

    /// True when `exclude_modules` names `path`.
    pub fn excludes(&self, path: &str) -> bool {
        match &self.exclude {
            None => false,
            Some(ExcludeModules::List(names)) => list_matches(names, path),
            Some(ExcludeModules::Regex(_)) => self.exclude_regex.as_ref().is_some_and(|r| r.is_match(path)),
        }
    }

    /// How many of `paths` are adapted, and how many only exclusion keeps from it.
    pub fn coverage<'a>(&self, paths: impl IntoIterator<Item = &'a str>) -> Coverage {
        let mut c = Coverage { adapted: 0, excluded: 0 };
        for p in paths {
            if self.selects(p) {
                if self.excludes(p) {
                    c.excluded += 1;
                } else {
                    c.adapted += 1;
                }
            }
        }
        c
    }
}

/// The first index of `layers_to_transform` that a model of `num_layers` decoder layers does not have.
pub fn layer_out_of_range(layers: &[usize], num_layers: usize) -> Option<(usize, usize)> {
    layers.iter().position(|&i| i >= num_layers).map(|j| (j, layers[j]))
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

    const PATHS: [&str; 6] = [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.mlp.down_proj",
        "model.layers.0.mlp.up_proj",
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.mlp.down_proj",
        "model.layers.1.mlp.up_proj",
    ];

    #[test]
    fn exclude_list_matches_exact_paths_and_dot_suffixes() {
        let ex = ExcludeModules::List(vec!["down_proj".into(), "model.layers.1.self_attn.q_proj".into()]);
        let m = TargetModules::AllLinear.matcher(None).unwrap().excluding(Some(&ex)).unwrap();
        assert!(m.excludes("model.layers.0.mlp.down_proj"));
        assert!(!m.matches("model.layers.0.mlp.down_proj"));
        assert!(m.selects("model.layers.0.mlp.down_proj"));
        assert!(!m.matches("model.layers.1.self_attn.q_proj"));
        assert!(m.matches("model.layers.0.self_attn.q_proj"));
        // a suffix must start at a `.`: `xdown_proj` is not `down_proj`
        assert!(m.matches("model.layers.0.mlp.xdown_proj"));
        // a partial path is a suffix too (PEFT's endswith(f".{key}"))
        let ex = ExcludeModules::List(vec!["mlp.up_proj".into()]);
        let m = TargetModules::AllLinear.matcher(None).unwrap().excluding(Some(&ex)).unwrap();
        assert_eq!(m.coverage(PATHS), Coverage { adapted: 4, excluded: 2 });
    }

    #[test]
    fn exclude_regex_must_match_the_whole_path() {
        let ex = ExcludeModules::Regex(r".*\.layers\.1\..*".into());
        let m = TargetModules::List(vec!["q_proj".into(), "up_proj".into()]).matcher(None).unwrap();
        let m = m.excluding(Some(&ex)).unwrap();
        assert_eq!(m.coverage(PATHS), Coverage { adapted: 2, excluded: 2 });
        assert!(m.matches("model.layers.0.self_attn.q_proj"));
        assert!(!m.matches("model.layers.1.self_attn.q_proj"));
        // re.fullmatch: `down_proj` alone does not match a longer path
        let m = TargetModules::AllLinear.matcher(None).unwrap();
        let m = m.excluding(Some(&ExcludeModules::Regex("down_proj".into()))).unwrap();
        assert_eq!(m.coverage(PATHS), Coverage { adapted: 6, excluded: 0 });
        // invalid regex: an error, not a silent no-op
        assert!(TargetModules::AllLinear
            .matcher(None)
            .unwrap()
            .excluding(Some(&ExcludeModules::Regex("(".into())))
            .is_err());
        // empty: excludes nothing, as PEFT's `if config.exclude_modules`
        for ex in [ExcludeModules::Regex(String::new()), ExcludeModules::List(vec![])] {
            let m = TargetModules::AllLinear.matcher(None).unwrap().excluding(Some(&ex)).unwrap();
            assert_eq!(m.coverage(PATHS).excluded, 0);
        }
    }

    #[test]
    fn exclusion_and_layers_combine() {
        let ex = ExcludeModules::List(vec!["q_proj".into()]);
        let m = TargetModules::List(vec!["q_proj".into()]).matcher(Some(&[1])).unwrap().excluding(Some(&ex)).unwrap();
        // only layer 1's q_proj is selected, and it is excluded: nothing is adapted
        assert_eq!(m.coverage(PATHS), Coverage { adapted: 0, excluded: 1 });
        assert_eq!(layer_out_of_range(&[0, 1], 2), None);
        assert_eq!(layer_out_of_range(&[0, 99, 100], 2), Some((1, 99)));
    }

    #[test]
    fn layers_pattern_accepts_only_layers() {
        assert!(LayersPattern::One("layers".into()).check().is_ok());
        assert!(LayersPattern::List(vec!["layers".into()]).check().is_ok());
        assert!(LayersPattern::One(String::new()).is_empty());
        assert_eq!(LayersPattern::One("h".into()).check(), Err((0, "h".to_string())));
        assert_eq!(LayersPattern::List(vec!["layers".into(), "blocks".into()]).check(), Err((1, "blocks".to_string())));
    }
}
