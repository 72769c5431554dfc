//! What this CPU can do, found at run time: its model name and the instruction sets peftkit's kernels may use.
//!
//! peftkit runs on whatever x86 machine it lands on (the development and CI machines change between an AMD EPYC
//! with AVX2 only and an Intel Xeon with AVX-512, AVX512-BF16 and AMX), so nothing is chosen at build time: the
//! binary is built for baseline x86-64 and each kernel family picks its variant from [`isa`] when it runs.
//!
//! | level ([`Isa`]) | needs | used by |
//! |---|---|---|
//! | `Avx512` | avx512f, avx512bw, avx512vl, fma | peftkit's element-wise kernels; the gemm crate's AVX-512 f32 GEMM |
//! | `Avx2` | avx2, fma | the same kernels with 256-bit vectors; gemm's FMA GEMM |
//! | `Scalar` | nothing | the portable fallback |
//!
//! `PEFTKIT_CPU_ISA=scalar|avx2|avx512` caps the level for peftkit's own kernels (never raises it above what the
//! CPU has): the tests use it to compare every path with the default. The gemm crate picks its own kernel once per
//! process from the CPU's flags (AVX-512 where `avx512f` is present, since it is built with `x86-v4`).
//!
//! bf16 compute units are reported by [`Features`] (`avx512_bf16`, `amx_bf16`): `training.dtype: auto` picks bf16
//! where either is present. AMX is read from CPUID (leaf 7, EDX bits 22 and 24) because its feature-detection macro
//! is not stable in Rust yet.

use std::sync::OnceLock;

/// Instruction-set levels of peftkit's own CPU kernels, lowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    Scalar,
    Avx2,
    Avx512,
}

impl Isa {
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }
    fn parse(s: &str) -> Option<Isa> {
        match s.trim().to_ascii_lowercase().as_str() {
            "scalar" | "none" | "generic" => Some(Isa::Scalar),
            "avx2" => Some(Isa::Avx2),
            "avx512" | "avx-512" => Some(Isa::Avx512),
            _ => None,
        }
    }
}

/// The CPU's name and the features that matter to peftkit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Features {
    /// `model name` from /proc/cpuinfo (or the CPUID brand string).
    pub model: String,
    pub avx2: bool,
    pub fma: bool,
    pub avx512f: bool,
    pub avx512bw: bool,
    pub avx512vl: bool,
    pub avx512_bf16: bool,
    pub amx_bf16: bool,
    pub amx_tile: bool,
}

impl Features {
    /// The highest [`Isa`] the hardware supports.
    pub fn max_isa(&self) -> Isa {
        if self.avx512f && self.avx512bw && self.avx512vl && self.fma {
            Isa::Avx512
        } else if self.avx2 && self.fma {
            Isa::Avx2
        } else {
            Isa::Scalar
        }
    }

    /// Whether the CPU has a bf16 dot-product unit (AVX512-BF16 or AMX-BF16).
    pub fn has_bf16_compute(&self) -> bool {
        self.avx512_bf16 || (self.amx_bf16 && self.amx_tile)
    }

    /// The instruction sets present, space-separated, for reports (`avx2 fma avx512f … amx-bf16`).
    pub fn flags(&self) -> String {
        let named = [
            ("avx2", self.avx2),
            ("fma", self.fma),
            ("avx512f", self.avx512f),
            ("avx512bw", self.avx512bw),
            ("avx512vl", self.avx512vl),
            ("avx512-bf16", self.avx512_bf16),
            ("amx-tile", self.amx_tile),
            ("amx-bf16", self.amx_bf16),
        ];
        let v: Vec<&str> = named.iter().filter(|(_, on)| *on).map(|(n, _)| *n).collect();
        if v.is_empty() {
            "baseline x86-64".into()
        } else {
            v.join(" ")
        }
    }
}

/// The CPU's features, detected once.
pub fn features() -> &'static Features {
    static F: OnceLock<Features> = OnceLock::new();
    F.get_or_init(detect)
}

/// The level peftkit's own kernels run at: the hardware's [`Features::max_isa`], capped by `PEFTKIT_CPU_ISA`.
pub fn isa() -> Isa {
    static I: OnceLock<Isa> = OnceLock::new();
    *I.get_or_init(|| {
        let hw = features().max_isa();
        match std::env::var("PEFTKIT_CPU_ISA").ok().as_deref().and_then(Isa::parse) {
            Some(cap) => cap.min(hw),
            None => hw,
        }
    })
}

/// One line for logs and benchmark reports: model, flags and the levels in use.
pub fn describe() -> String {
    let f = features();
    format!(
        "{} [{}]; peftkit kernels: {}, f32 GEMM: {}",
        if f.model.is_empty() { "unknown CPU" } else { &f.model },
        f.flags(),
        isa().name(),
        gemm_kernel()
    )
}

/// Which of the gemm crate's f32 kernels runs here (it decides from the CPU's flags alone).
pub fn gemm_kernel() -> &'static str {
    let f = features();
    if f.avx512f {
        "avx512f"
    } else if f.fma {
        "fma (avx2)"
    } else {
        "scalar"
    }
}

fn cpuinfo_model() -> Option<String> {
    let text = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    text.lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
}

#[cfg(target_arch = "x86_64")]
fn detect() -> Features {
    use std::arch::is_x86_feature_detected as has;
    // CPUID is available on every x86-64 CPU; leaf 7 is only read when the maximum leaf allows it.
    let (amx_bf16, amx_tile) = {
        let max = std::arch::x86_64::__cpuid(0).eax;
        if max >= 7 {
            let edx = std::arch::x86_64::__cpuid_count(7, 0).edx;
            (edx & (1 << 22) != 0, edx & (1 << 24) != 0)
        } else {
            (false, false)
        }
    };
    // The OS must also enable the tile state (XCR0 bits 17-18): without it AMX cannot run.
    let os_amx = os_enables_amx();
    Features {
        model: cpuinfo_model().unwrap_or_default(),
        avx2: has!("avx2"),
        fma: has!("fma"),
        avx512f: has!("avx512f"),
        avx512bw: has!("avx512bw"),
        avx512vl: has!("avx512vl"),
        avx512_bf16: has!("avx512bf16"),
        amx_bf16: amx_bf16 && os_amx,
        amx_tile: amx_tile && os_amx,
    }
}

#[cfg(target_arch = "x86_64")]
fn os_enables_amx() -> bool {
    if !std::arch::is_x86_feature_detected!("xsave") {
        return false;
    }
    // SAFETY: XGETBV is valid when the CPU has XSAVE/OSXSAVE, checked above through the std detection (which also
    // requires OSXSAVE before it reports xsave features).
    let xcr0 = unsafe { std::arch::x86_64::_xgetbv(0) };
    xcr0 & (0b11 << 17) == (0b11 << 17)
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> Features {
    Features { model: cpuinfo_model().unwrap_or_default(), ..Features::default() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_are_ordered_and_parsed() {
        assert!(Isa::Scalar < Isa::Avx2 && Isa::Avx2 < Isa::Avx512);
        assert_eq!(Isa::parse("AVX2"), Some(Isa::Avx2));
        assert_eq!(Isa::parse("avx-512"), Some(Isa::Avx512));
        assert_eq!(Isa::parse("sse9"), None);
    }

    #[test]
    fn max_isa_needs_every_feature_of_its_level() {
        let mut f = Features { avx2: true, fma: true, avx512f: true, ..Features::default() };
        assert_eq!(f.max_isa(), Isa::Avx2, "avx512f alone is not the AVX-512 level");
        f.avx512bw = true;
        f.avx512vl = true;
        assert_eq!(f.max_isa(), Isa::Avx512);
        assert!(!f.has_bf16_compute());
        f.amx_bf16 = true;
        assert!(!f.has_bf16_compute(), "AMX-BF16 needs the tile unit too");
        f.amx_tile = true;
        assert!(f.has_bf16_compute());
    }

    #[test]
    fn this_cpu_is_described() {
        let d = describe();
        assert!(d.contains("peftkit kernels"), "{d}");
        assert!(isa() <= features().max_isa());
    }
}
