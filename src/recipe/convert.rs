//! A recipe's `adapter` section turned into the adapter library's settings: the adapter to attach
//! ([`AdapterConfig`]), how the base is held ([`BaseQuant`]) and the trained embedding rows ([`VocabConfig`]). The
//! conversion lives on the recipe side so that the `adapter` module does not depend on the recipe format.

use super::{AdapterSpec, InitLoraWeights};
use crate::adapter::vocab::{VocabConfig, VocabModule};
use crate::adapter::{AdapterConfig, FeedforwardModules, Ia3Config, LoraConfig, LoraInit};
use crate::model::BaseQuant;

impl AdapterSpec {
    /// The adapter this section describes. QLoRA trains the same LoRA adapter; only the base's storage differs
    /// (see [`AdapterSpec::base_quant`]).
    pub fn adapter_config(&self) -> AdapterConfig {
        let l = match self {
            AdapterSpec::Ia3(i) => {
                return AdapterConfig::Ia3(Ia3Config {
                    target_modules: i.target_modules.clone(),
                    feedforward_modules: FeedforwardModules::List(i.feedforward_modules.clone()),
                    init_ia3_weights: i.init_ia3_weights,
                    exclude_modules: i.exclude_modules.clone(),
                })
            }
            AdapterSpec::Lora(l) => l,
            AdapterSpec::Qlora(q) => &q.lora,
        };
        AdapterConfig::Lora(LoraConfig {
            r: l.r,
            lora_alpha: l.lora_alpha,
            lora_dropout: l.lora_dropout,
            target_modules: l.target_modules.clone(),
            use_rslora: l.use_rslora,
            init: match l.init_lora_weights {
                InitLoraWeights::Default => LoraInit::Kaiming,
                InitLoraWeights::Gaussian => LoraInit::Gaussian,
                InitLoraWeights::Random => LoraInit::Random,
                InitLoraWeights::Pissa => LoraInit::Pissa,
                InitLoraWeights::PissaNiter(n) => LoraInit::PissaNiter(n),
                InitLoraWeights::Olora => LoraInit::Olora,
            },
            layers_to_transform: l.layers_to_transform.clone(),
            exclude_modules: l.exclude_modules.clone(),
            layers_pattern: l.layers_pattern.clone(),
            rank_pattern: Default::default(),
            alpha_pattern: Default::default(),
            use_dora: l.use_dora,
        })
    }

    /// How the base is held: NF4 for `qlora` (bitsandbytes' `load_in_4bit` with the recipe's double quantization),
    /// dense otherwise.
    pub fn base_quant(&self) -> BaseQuant {
        match self {
            AdapterSpec::Qlora(q) => BaseQuant::Nf4 { double_quant: q.bnb_4bit_use_double_quant },
            _ => BaseQuant::None,
        }
    }

    /// The embedding / head modules and token rows this section trains (validated when the recipe loaded).
    pub fn vocab_config(&self) -> VocabConfig {
        let (mts, tti) = self.vocab_settings();
        let mut cfg = VocabConfig::default();
        for m in mts {
            if let Some(m) = VocabModule::parse(m) {
                if !cfg.modules_to_save.contains(&m) {
                    cfg.modules_to_save.push(m);
                }
            }
        }
        if let Some(t) = tti {
            for (name, ids) in t.entries() {
                if let Some(m) = VocabModule::parse(name) {
                    cfg.trainable_tokens.push((m, ids.to_vec()));
                }
            }
        }
        cfg
    }
}
