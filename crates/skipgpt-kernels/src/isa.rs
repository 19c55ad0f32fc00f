//! The instruction sets the kernels are compiled for, and the widest this CPU runs.
//!
//! Every kernel with vector loops is compiled once per [`Isa`] and picks its loop at run time
//! with [`Isa::detect`]; the tests run every loop this CPU has ([`Isa::available`]) against
//! the plain one.

/// The instruction sets the loops are compiled for, widest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    #[cfg(target_arch = "x86_64")]
    Avx512,
    /// AVX2 with FMA and F16C
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Plain,
}

impl Isa {
    /// The widest this CPU runs, found once.
    pub fn detect() -> Isa {
        static FOUND: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *FOUND.get_or_init(|| Isa::available()[0])
    }

    /// Every one this CPU runs, widest first.
    pub fn available() -> Vec<Isa> {
        #[allow(unused_mut)]
        let mut found = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f") {
                found.push(Isa::Avx512);
            }
            if is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
            {
                found.push(Isa::Avx2);
            }
        }
        found.push(Isa::Plain);
        found
    }
}
