//! Enums written in recipes by name: [`LrScheduler`], [`DataFormat`] and [`ComputeDtype`] (one of
//! a fixed set of lowercase names, declared with `name_enum!`), and [`InitLoraWeights`] (`true`,
//! `false`, `gaussian`, `pissa`, `pissa_niter_N` or `olora`).

use std::fmt;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Declares a fieldless enum written in recipes as one of a fixed set of names.
macro_rules! name_enum {
    (
        $(#[$meta:meta])*
        pub enum $name:ident { $( $(#[$vmeta:meta])* $variant:ident = $text:literal ),+ $(,)? }
        default $default:ident
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name { $( $(#[$vmeta])* $variant ),+ }

        impl $name {
            /// Every accepted name, in documentation order.
            pub const NAMES: &'static [&'static str] = &[$($text),+];

            /// The name as written in a recipe.
            pub fn as_str(self) -> &'static str {
                match self { $( Self::$variant => $text ),+ }
            }

            /// Parses a name as written in a recipe (exact match).
            pub fn from_name(name: &str) -> Option<Self> {
                match name { $( $text => Some(Self::$variant), )+ _ => None }
            }
        }

        impl Default for $name {
            fn default() -> Self { Self::$default }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result { f.write_str(self.as_str()) }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let name = String::deserialize(deserializer)?;
                Self::from_name(&name).ok_or_else(|| {
                    de::Error::custom(format!(
                        "unknown value \"{name}\" (expected one of {})",
                        Self::NAMES.join(", ")
                    ))
                })
            }
        }
    };
}

name_enum! {
    /// Learning-rate schedule after warmup.
    pub enum LrScheduler {
        /// Constant learning rate.
        Constant = "constant",
        /// Linear decay to zero.
        Linear = "linear",
        /// Cosine decay to zero.
        Cosine = "cosine",
    }
    default Cosine
}

name_enum! {
    /// Layout of the training records.
    pub enum DataFormat {
        /// Detect from the first record.
        Auto = "auto",
        /// `{"messages": [{"role", "content"}, …]}` rendered with the model's chat template.
        Chat = "chat",
        /// `{"instruction", "input", "output"}`.
        Alpaca = "alpaca",
        /// `{"text"}` (or `{"prompt", "completion"}`).
        Completion = "completion",
        /// Pre-tokenized: `{"input_ids": [ids], "labels": [ids or -100]}` (labels optional: all predicted).
        Tokens = "tokens",
    }
    default Auto
}

name_enum! {
    /// Dtype in which QLoRA dequantized weights are multiplied.
    pub enum ComputeDtype {
        /// 32-bit float.
        Float32 = "float32",
        /// bfloat16.
        Bfloat16 = "bfloat16",
        /// IEEE half.
        Float16 = "float16",
    }
    default Bfloat16
}

/// How LoRA matrices are initialized (PEFT's `init_lora_weights`). All but `Random` start as a no-op.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum InitLoraWeights {
    /// `true`: Kaiming-uniform A, zero B (PEFT's default).
    #[default]
    Default,
    /// `gaussian`: Gaussian A with std 1/r, zero B.
    Gaussian,
    /// `false`: both random, so the adapter is not a no-op (for tests and debugging).
    Random,
    /// `pissa`: A, B from the top-r singular triplets of each base weight (full SVD); the base keeps the residual.
    Pissa,
    /// `pissa_niter_N`: the same from a randomized SVD with N subspace iterations (faster, approximate).
    PissaNiter(usize),
    /// `olora`: A, B from the thin QR of each base weight; the base keeps the residual.
    Olora,
}

const EXPECTED: &str = "true, false, gaussian, pissa, pissa_niter_N (N a number of iterations) or olora";

impl InitLoraWeights {
    /// Whether the initialisation rewrites the base weights (PiSSA, OLoRA).
    pub fn rewrites_base(self) -> bool {
        matches!(self, InitLoraWeights::Pissa | InitLoraWeights::PissaNiter(_) | InitLoraWeights::Olora)
    }

    /// The name as PEFT writes it (`true` and `false` are booleans there).
    pub fn name(self) -> String {
        match self {
            InitLoraWeights::Default => "true".into(),
            InitLoraWeights::Random => "false".into(),
            InitLoraWeights::Gaussian => "gaussian".into(),
            InitLoraWeights::Pissa => "pissa".into(),
            InitLoraWeights::PissaNiter(n) => format!("pissa_niter_{n}"),
            InitLoraWeights::Olora => "olora".into(),
        }
    }

    /// Parses one of the string forms (`gaussian`, `pissa`, `pissa_niter_N`, `olora`).
    pub fn from_name(text: &str) -> Option<Self> {
        match text {
            "gaussian" => Some(InitLoraWeights::Gaussian),
            "pissa" => Some(InitLoraWeights::Pissa),
            "olora" => Some(InitLoraWeights::Olora),
            _ => {
                let n = text.strip_prefix("pissa_niter_")?;
                if n.is_empty() || !n.bytes().all(|c| c.is_ascii_digit()) {
                    return None;
                }
                n.parse().ok().map(InitLoraWeights::PissaNiter)
            }
        }
    }
}

impl Serialize for InitLoraWeights {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            InitLoraWeights::Default => serializer.serialize_bool(true),
            InitLoraWeights::Random => serializer.serialize_bool(false),
            other => serializer.serialize_str(&other.name()),
        }
    }
}

impl<'de> Deserialize<'de> for InitLoraWeights {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct InitVisitor;

        impl Visitor<'_> for InitVisitor {
            type Value = InitLoraWeights;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(EXPECTED)
            }

            fn visit_bool<E: de::Error>(self, value: bool) -> Result<InitLoraWeights, E> {
                Ok(if value { InitLoraWeights::Default } else { InitLoraWeights::Random })
            }

            fn visit_str<E: de::Error>(self, text: &str) -> Result<InitLoraWeights, E> {
                InitLoraWeights::from_name(text)
                    .ok_or_else(|| E::custom(format!("unknown value \"{text}\" (expected {EXPECTED})")))
            }
        }

        deserializer.deserialize_any(InitVisitor)
    }
}
