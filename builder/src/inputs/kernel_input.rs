//! The kernel input of a profile, whichever its kind: fetches what it is
//! made from, then compiles it ([`kernel`]) or takes it from its distro
//! package ([`distro`]).

use super::cache::Cache;
use super::input::{self, Resolved};
use super::kernel::{self, Kernel, KernelError, KernelSpec};
use super::distro;
use crate::arch::Arch;

/// The kernel's external inputs: the source (compiled) or the package
/// (distro), and firmware packages.
#[derive(Debug, Clone)]
pub struct KernelInputs {
    pub main: Resolved,
    pub firmware: Vec<Resolved>,
}

impl KernelInputs {
    pub fn all(&self) -> impl Iterator<Item = &Resolved> {
        std::iter::once(&self.main).chain(&self.firmware)
    }
}

/// Fetches (or finds in the cache) what the kernel is made from.
pub fn resolve_inputs(spec: &KernelSpec, deb_arch: &str, cache: &Cache) -> Result<KernelInputs, input::InputError> {
    match &spec.distro {
        None => Ok(KernelInputs { main: input::resolve("kernel.source", &spec.source, deb_arch, cache)?, firmware: Vec::new() }),
        Some(d) => Ok(KernelInputs {
            main: input::resolve("kernel.package", &d.package, deb_arch, cache)?,
            firmware: d.firmware.iter().enumerate().map(|(i, f)| input::resolve(&format!("kernel.firmware[{i}]"), f, deb_arch, cache)).collect::<Result<_, _>>()?,
        }),
    }
}

/// The kernel: compiled (or cached), or taken from a distro package.
pub fn get(arch: Arch, inputs: &KernelInputs, spec: &KernelSpec, cache: &Cache) -> Result<Kernel, KernelError> {
    get_counted(arch, inputs, spec, cache, &crate::progress::Counter::default())
}

/// [`get`], counting the files a kernel compile compiles in `progress`.
pub fn get_counted(arch: Arch, inputs: &KernelInputs, spec: &KernelSpec, cache: &Cache, progress: &crate::progress::Counter) -> Result<Kernel, KernelError> {
    match &spec.distro {
        None => kernel::build(arch, &inputs.main, spec, cache, progress),
        Some(d) => distro::assemble(arch, &inputs.main, &inputs.firmware, d, cache),
    }
}
