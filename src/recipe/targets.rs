//! Checks of the keys that choose the adapted projections (`adapter.target_modules`, `adapter.exclude_modules`,
//! `adapter.layers_to_transform`) against the loaded model: a layer index beyond the model's layers, exclusions
//! that leave nothing to adapt, or targets that match no projection, with the same file:line errors as loading.
//! The matching rules are [`crate::adapter::target`]'s.

use std::path::Path;

use super::overrides::Override;
use super::problem::{Problem, ProblemKind, Source};
use super::{AdapterSpec, Recipe, RecipeError};
use crate::adapter::target;

/// One linear projection of the loaded model: its path and its (in, out) features.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Projection {
    /// Module path, e.g. `model.layers.0.self_attn.q_proj`.
    pub path: String,
    /// Input features (columns of the weight).
    pub in_features: usize,
    /// Output features (rows of the weight).
    pub out_features: usize,
}

/// The first problem of the recipe's target keys on a model of `num_layers` decoder layers whose projections are
/// `projections`.
fn target_problem(adapter: &AdapterSpec, num_layers: usize, projections: &[Projection]) -> Option<Problem> {
    let paths: Vec<&str> = projections.iter().map(|p| p.path.as_str()).collect();
    let (layers, exclude) = match adapter {
        AdapterSpec::Ia3(i) => (None, i.exclude_modules.as_ref()),
        _ => adapter.lora().map(|l| (l.layers_to_transform.as_deref(), l.exclude_modules.as_ref()))?,
    };
    if let Some((j, index)) = layers.and_then(|l| target::layer_out_of_range(l, num_layers)) {
        let at = Problem::path_of("adapter.layers_to_transform").index(j);
        return Some(at.with(ProblemKind::Invalid(format!(
            "layer {index} is out of range: the model has {num_layers} decoder layers (indices 0–{})",
            num_layers.saturating_sub(1)
        ))));
    }
    // Invalid regexes were refused when the recipe loaded.
    let matcher = adapter.target_modules().matcher(layers).ok()?.excluding(exclude).ok()?;
    let coverage = matcher.coverage(paths.iter().copied());
    if coverage.adapted > 0 {
        // A rank above min(in, out) adds no capacity (B·A cannot exceed that rank) and only costs memory; a typo
        // like `r: 4000000000` would otherwise end in an allocation failure.
        let r = adapter.lora()?.r;
        let narrowest = projections
            .iter()
            .filter(|p| matcher.matches(&p.path))
            .min_by_key(|p| p.in_features.min(p.out_features))?;
        let limit = narrowest.in_features.min(narrowest.out_features);
        return (r > limit).then(|| {
            Problem::invalid(
                "adapter.r",
                format!(
                    "rank {r} is above min(in, out) = {limit} of the targeted projection {} ({} → {}): a LoRA \
                     update of rank r spans at most min(in, out) dimensions, so r must be at most {limit}",
                    narrowest.path, narrowest.in_features, narrowest.out_features
                ),
            )
        });
    }
    if coverage.excluded > 0 {
        return Some(Problem::invalid(
            "adapter.exclude_modules",
            format!(
                "excludes every projection that adapter.target_modules selects ({} of them): nothing would be adapted",
                coverage.excluded
            ),
        ));
    }
    let example = paths.first().copied().unwrap_or_default();
    let layers_note = match layers {
        Some(l) => format!(" in layers {l:?}"),
        None => String::new(),
    };
    Some(Problem::invalid(
        "adapter.target_modules",
        format!("matches no projection of the model{layers_note} (its projections are named like `{example}`)"),
    ))
}

impl Recipe {
    /// Checks `adapter.target_modules` / `exclude_modules` / `layers_to_transform` and the rank `adapter.r` against
    /// the loaded model (its number of decoder layers and its projections). `path` and `overrides` are what the recipe was loaded
    /// from, so that the error names the line (or the `--set` argument) as loading's errors do.
    pub fn check_targets(
        &self,
        path: &Path,
        overrides: &[String],
        num_layers: usize,
        projections: &[Projection],
    ) -> Result<(), RecipeError> {
        let Some(problem) = target_problem(&self.adapter, num_layers, projections) else { return Ok(()) };
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let overrides: Vec<Override> = overrides.iter().filter_map(|a| Override::parse(a).ok()).collect();
        let name = path.display().to_string();
        Err(Source { name: &name, text: &text, overrides: &overrides }.error(problem))
    }
}

#[cfg(test)]
mod tests {
    use super::Projection;
    use crate::adapter::{ExcludeModules, LayersPattern};
    use crate::recipe::testutil::{assert_msg, err, fixture, minimal, ok, Fixture};
    use crate::recipe::{AdapterSpec, Recipe, TargetModules};

    fn with_adapter(f: &Fixture, kind: &str, extra: &str) -> String {
        minimal(f, kind).replace(&format!("  type: {kind}\n"), &format!("  type: {kind}\n{extra}"))
    }

    /// The projections of a 2-layer Llama (hidden 64, k/v 32 wide, MLP 128).
    fn paths() -> Vec<Projection> {
        let mut out = Vec::new();
        for l in 0..2 {
            for (p, i, o) in [
                ("self_attn.q_proj", 64, 64),
                ("self_attn.k_proj", 64, 32),
                ("self_attn.v_proj", 64, 32),
                ("self_attn.o_proj", 64, 64),
                ("mlp.gate_proj", 64, 128),
                ("mlp.up_proj", 64, 128),
                ("mlp.down_proj", 128, 64),
            ] {
                out.push(Projection { path: format!("model.layers.{l}.{p}"), in_features: i, out_features: o });
            }
        }
        out
    }

    /// Loads `text` from a file and runs the model check on a 2-layer model.
    fn check_on_model(text: &str, overrides: &[&str]) -> Result<(), String> {
        let path = std::env::temp_dir().join(format!("peftkit-targets-{}-{}.yaml", std::process::id(), text.len()));
        std::fs::write(&path, text).unwrap();
        let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
        let r = Recipe::load(&path, &overrides).unwrap();
        let out = r.check_targets(&path, &overrides, 2, &paths()).map_err(|e| e.to_string());
        let _ = std::fs::remove_file(&path);
        out
    }

    #[test]
    fn new_target_keys_load_in_every_form_and_round_trip() {
        let f = fixture();
        let r = ok(&with_adapter(&f, "lora", "  exclude_modules: [down_proj]\n"), &[]);
        let l = r.adapter.lora().unwrap();
        assert_eq!(l.exclude_modules, Some(ExcludeModules::List(vec!["down_proj".into()])));
        assert_eq!(Recipe::from_str(&r.to_yaml(), "r.yaml", &[]).unwrap(), r);
        let r = ok(&with_adapter(&f, "qlora", "  exclude_modules: '.*\\.layers\\.0\\..*'\n"), &[]);
        assert_eq!(r.adapter.lora().unwrap().exclude_modules, Some(ExcludeModules::Regex(r".*\.layers\.0\..*".into())));
        assert_eq!(Recipe::from_str(&r.to_yaml(), "r.yaml", &[]).unwrap(), r);
        let r = ok(&with_adapter(&f, "ia3", "  exclude_modules: [model.layers.0.mlp.down_proj]\n"), &[]);
        let AdapterSpec::Ia3(i) = &r.adapter else { panic!() };
        assert_eq!(i.exclude_modules, Some(ExcludeModules::List(vec!["model.layers.0.mlp.down_proj".into()])));
        let r = ok(&with_adapter(&f, "lora", "  layers_to_transform: [1]\n  layers_pattern: layers\n"), &[]);
        assert_eq!(r.adapter.lora().unwrap().layers_pattern, Some(LayersPattern::One("layers".into())));
        assert_eq!(Recipe::from_str(&r.to_yaml(), "r.yaml", &[]).unwrap(), r);
        let r = ok(&with_adapter(&f, "qlora", "  layers_to_transform: [0]\n  layers_pattern: [layers]\n"), &[]);
        assert_eq!(r.adapter.lora().unwrap().layers_pattern, Some(LayersPattern::List(vec!["layers".into()])));
        // An empty target_parameters is PEFT's default: accepted.
        let r = ok(&with_adapter(&f, "lora", "  target_parameters: []\n"), &[]);
        assert!(r.adapter.lora().unwrap().target_parameters.is_empty());
        // The defaults write none of the new keys.
        let yaml = ok(&minimal(&f, "lora"), &[]).to_yaml();
        for key in ["exclude_modules", "layers_pattern", "target_parameters"] {
            assert!(!yaml.contains(key), "{yaml}");
        }
    }

    #[test]
    fn new_target_keys_errors_name_key_and_line() {
        let f = fixture();
        assert_msg(
            &err(&with_adapter(&f, "lora", "  exclude_modules: '(down'\n"), &[]),
            "recipes/x.yaml:4: adapter.exclude_modules: invalid regular expression",
            &[],
        );
        assert_msg(
            &err(&with_adapter(&f, "ia3", "  exclude_modules: [down_proj, '']\n"), &[]),
            "recipes/x.yaml:4: adapter.exclude_modules[1]: must not be empty",
            &[],
        );
        assert_msg(
            &err(&with_adapter(&f, "lora", "  exclude_modules: all-linear\n"), &[]),
            "recipes/x.yaml:4: adapter.exclude_modules:",
            &["all-linear is not an exclusion"],
        );
        assert_msg(
            &err(&with_adapter(&f, "lora", "  layers_to_transform: [0]\n  layers_pattern: h\n"), &[]),
            "recipes/x.yaml:5: adapter.layers_pattern: \"h\" is not supported",
            &["model.layers"],
        );
        assert_msg(
            &err(&with_adapter(&f, "qlora", "  layers_to_transform: [0]\n  layers_pattern: [layers, blocks]\n"), &[]),
            "recipes/x.yaml:5: adapter.layers_pattern[1]: \"blocks\" is not supported",
            &[],
        );
        assert_msg(
            &err(&with_adapter(&f, "lora", "  layers_pattern: layers\n"), &[]),
            "recipes/x.yaml:4: adapter.layers_pattern: is only used with adapter.layers_to_transform",
            &[],
        );
        assert_msg(
            &err(&with_adapter(&f, "lora", "  r: 4\n  target_parameters: [feed_forward.experts.down_proj]\n"), &[]),
            "recipes/x.yaml:5: adapter.target_parameters: LoRA on bare parameters",
            &["not supported", "mixture-of-experts"],
        );
        assert_msg(
            &err(&with_adapter(&f, "qlora", "  target_parameters: [mlp.experts.gate_up_proj]\n"), &[]),
            "recipes/x.yaml:4: adapter.target_parameters:",
            &["not supported"],
        );
        // IA3 has no layers_to_transform / target_parameters in PEFT.
        assert_msg(&err(&with_adapter(&f, "ia3", "  target_parameters: [x]\n"), &[]), "recipes/x.yaml:4:", &[]);
    }

    #[test]
    fn targets_are_checked_against_the_model_with_their_line() {
        let f = fixture();
        // layers_to_transform beyond the model's layers: the index, the layer count and the line.
        let e = check_on_model(&with_adapter(&f, "lora", "  r: 4\n  layers_to_transform: [1, 99]\n"), &[]).unwrap_err();
        assert!(
            e.contains(
                ":5: adapter.layers_to_transform[1]: layer 99 is out of range: the model has 2 decoder layers \
                 (indices 0–1)"
            ),
            "{e}"
        );
        let e = check_on_model(&minimal(&f, "qlora"), &["adapter.layers_to_transform=[7]"]).unwrap_err();
        assert!(e.starts_with("--set adapter.layers_to_transform=[7]: adapter.layers_to_transform[0]: layer 7"), "{e}");
        assert!(check_on_model(&with_adapter(&f, "lora", "  layers_to_transform: [1]\n"), &[]).is_ok());
        // exclusion that leaves nothing
        let text =
            with_adapter(&f, "lora", "  target_modules: [q_proj, v_proj]\n  exclude_modules: [q_proj, v_proj]\n");
        let e = check_on_model(&text, &[]).unwrap_err();
        assert!(
            e.contains(":5: adapter.exclude_modules: excludes every projection that adapter.target_modules selects (4"),
            "{e}"
        );
        let text = with_adapter(&f, "ia3", "  exclude_modules: '.*'\n");
        let e = check_on_model(&text, &[]).unwrap_err();
        assert!(e.contains(":4: adapter.exclude_modules: excludes every projection"), "{e}");
        let text = with_adapter(&f, "lora", "  layers_to_transform: [0]\n  exclude_modules: '.*\\.layers\\.0\\..*'\n");
        assert!(check_on_model(&text, &[]).unwrap_err().contains("adapter.exclude_modules: excludes every"));
        assert!(check_on_model(&with_adapter(&f, "lora", "  exclude_modules: [down_proj]\n"), &[]).is_ok());
        // targets that match nothing at all
        let e = check_on_model(&with_adapter(&f, "lora", "  target_modules: [c_attn]\n"), &[]).unwrap_err();
        assert!(e.contains(":4: adapter.target_modules: matches no projection of the model"), "{e}");
        let r = ok(&minimal(&f, "lora"), &[]);
        assert_eq!(r.adapter.target_modules(), &TargetModules::AllLinear);
    }

    #[test]
    fn rank_above_the_narrowest_target_is_refused_with_its_line() {
        let f = fixture();
        let e = check_on_model(
            &with_adapter(
                &f,
                "lora",
                "  r: 4000000000
",
            ),
            &[],
        )
        .unwrap_err();
        assert!(
            e.contains(
                ":4: adapter.r: rank 4000000000 is above min(in, out) = 32 of the targeted projection \
                 model.layers.0.self_attn.k_proj (64 → 32)"
            ),
            "{e}"
        );
        // Only the targeted projections count: without k/v the limit is 64.
        let text = with_adapter(
            &f,
            "qlora",
            "  r: 64
  target_modules: [q_proj, o_proj, gate_proj]
",
        );
        assert!(check_on_model(&text, &[]).is_ok());
        let e = check_on_model(&text, &["adapter.r=65"]).unwrap_err();
        assert!(e.starts_with("--set adapter.r=65: adapter.r: rank 65 is above min(in, out) = 64"), "{e}");
        // IA3 has no rank.
        assert!(check_on_model(&minimal(&f, "ia3"), &[]).is_ok());
    }
}
