//! What this CPU offers the vector code, read once for every module that dispatches on it (the
//! bf16 kernels, the head screen, attention, SwiGLU): one place decides what "has AVX2" means.
//! Each entry implies what its code also uses (AVX-512 BW with F, FMA with AVX2 where named), so
//! a caller checks one flag.

/// The instruction sets the dispatching code asks about.
#[derive(Debug, Clone, Copy)]
pub struct Features {
    /// AVX2: the screen's int16 tile and bounds, attention's 8-lane sums.
    pub avx2: bool,
    /// AVX2 and FMA: the 8-lane bf16 kernel, SwiGLU's exponential.
    pub avx2_fma: bool,
    /// AVX-512 F: attention's 16-lane dot product.
    pub avx512f: bool,
    /// AVX-512 F and BW: the 16-lane widening kernel, the screen's bounds.
    pub avx512: bool,
    /// AVX512_BF16 besides F and BW: `vdpbf16ps` and `vcvtneps2bf16`.
    pub avx512bf16: bool,
    /// AVX512_VNNI besides F and BW: the screen's int8 tile (`vpdpbusd`).
    pub vnni: bool,
}

/// This CPU's features (all false off x86-64).
pub fn features() -> Features {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        static HAS: std::sync::OnceLock<Features> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| {
            let avx2 = has!("avx2");
            let avx512f = has!("avx512f");
            let avx512 = avx512f && has!("avx512bw");
            Features {
                avx2,
                avx2_fma: avx2 && has!("fma"),
                avx512f,
                avx512,
                avx512bf16: avx512 && has!("avx512bf16"),
                vnni: avx512 && has!("avx512vnni"),
            }
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        Features {
            avx2: false,
            avx2_fma: false,
            avx512f: false,
            avx512: false,
            avx512bf16: false,
            vnni: false,
        }
    }
}

/// An instruction-set path the vector code dispatches to, by the name `OUTLIERLAB_REQUIRE_ISA`
/// and `.ci/run` use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    Avx2,
    Avx2Fma,
    Avx512f,
    Avx512,
    Avx512Bf16,
    Vnni,
}

impl Isa {
    pub const ALL: [Isa; 6] = [
        Isa::Avx2,
        Isa::Avx2Fma,
        Isa::Avx512f,
        Isa::Avx512,
        Isa::Avx512Bf16,
        Isa::Vnni,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx2 => "avx2",
            Isa::Avx2Fma => "avx2_fma",
            Isa::Avx512f => "avx512f",
            Isa::Avx512 => "avx512",
            Isa::Avx512Bf16 => "avx512bf16",
            Isa::Vnni => "vnni",
        }
    }

    /// Whether this CPU runs the path.
    pub fn here(self) -> bool {
        let f = features();
        match self {
            Isa::Avx2 => f.avx2,
            Isa::Avx2Fma => f.avx2_fma,
            Isa::Avx512f => f.avx512f,
            Isa::Avx512 => f.avx512,
            Isa::Avx512Bf16 => f.avx512bf16,
            Isa::Vnni => f.vnni,
        }
    }
}

/// The vector paths this CPU runs and, for a bf16 model, the micro-kernel chosen: the one line
/// `bench` prints, a run records in `provenance.json`, and a bf16 load reports.
pub fn describe(bf16_model: bool) -> String {
    let here: Vec<&str> = Isa::ALL
        .into_iter()
        .filter(|i| i.here())
        .map(Isa::name)
        .collect();
    let paths = if here.is_empty() {
        "none (portable code only)".to_string()
    } else {
        here.join(", ")
    };
    if bf16_model {
        format!(
            "vector paths {paths}; bf16 micro-kernel: {}",
            super::bf16::kernel().name()
        )
    } else {
        format!("vector paths {paths}")
    }
}

/// The paths `OUTLIERLAB_REQUIRE_ISA` names (comma-separated, e.g. `avx2,avx2_fma,avx512`).
pub fn required() -> Vec<Isa> {
    let Ok(list) = std::env::var("OUTLIERLAB_REQUIRE_ISA") else {
        return Vec::new();
    };
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            Isa::ALL
                .into_iter()
                .find(|i| i.name() == s)
                .unwrap_or_else(|| {
                    panic!(
                        "OUTLIERLAB_REQUIRE_ISA names '{s}'; known: {}",
                        Isa::ALL.map(Isa::name).join(", ")
                    )
                })
        })
        .collect()
}

/// For the tests of vector code: whether the code for `isa` can run here. Where it cannot the
/// test skips it — unless `OUTLIERLAB_REQUIRE_ISA` names `isa`, and then this panics, so that a
/// machine whose CPU has the instructions (`.ci/run` reads them from /proc/cpuinfo) cannot pass
/// a kernel test by running no kernel.
pub fn test_runs(isa: Isa) -> bool {
    if isa.here() {
        return true;
    }
    if required().contains(&isa) {
        panic!(
            "OUTLIERLAB_REQUIRE_ISA requires the {} path, but outlierlab does not detect it on this CPU",
            isa.name()
        );
    }
    eprintln!("skipped: this CPU has no {} path", isa.name());
    false
}
