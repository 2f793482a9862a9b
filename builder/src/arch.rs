//! The target architectures and what each means for the toolchain, the
//! kernel build, Debian's archive and ELF.

use serde::Deserialize;

/// Target architectures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    Amd64,
    Arm64,
    Armv7,
}

impl Arch {
    pub fn as_str(self) -> &'static str {
        match self {
            Arch::Amd64 => "amd64",
            Arch::Arm64 => "arm64",
            Arch::Armv7 => "armv7",
        }
    }
    /// Debian's architecture name.
    pub fn debian(self) -> &'static str {
        match self {
            Arch::Amd64 => "amd64",
            Arch::Arm64 => "arm64",
            Arch::Armv7 => "armhf",
        }
    }
    pub fn rust_target(self) -> &'static str {
        match self {
            Arch::Amd64 => "x86_64-unknown-linux-musl",
            Arch::Arm64 => "aarch64-unknown-linux-musl",
            Arch::Armv7 => "armv7-unknown-linux-gnueabihf",
        }
    }
    /// Kernel `ARCH=`.
    pub fn kernel_arch(self) -> &'static str {
        match self {
            Arch::Amd64 => "x86_64",
            Arch::Arm64 => "arm64",
            Arch::Armv7 => "arm",
        }
    }
    /// Kernel `CROSS_COMPILE=` on an x86_64 host.
    pub fn cross_compile(self) -> &'static str {
        match self {
            Arch::Amd64 => "",
            Arch::Arm64 => "aarch64-linux-gnu-",
            Arch::Armv7 => "arm-linux-gnueabihf-",
        }
    }
    /// The kernel image make target and where it lands.
    pub fn kernel_image(self) -> (&'static str, &'static str) {
        match self {
            Arch::Amd64 => ("bzImage", "arch/x86/boot/bzImage"),
            Arch::Arm64 => ("Image", "arch/arm64/boot/Image"),
            Arch::Armv7 => ("zImage", "arch/arm/boot/zImage"),
        }
    }
    /// PE/COFF Machine of EFI programs for this arch (x64, AA64, ARMv7
    /// Thumb-2).
    pub fn pe_machine(self) -> u16 {
        match self {
            Arch::Amd64 => 0x8664,
            Arch::Arm64 => 0xaa64,
            Arch::Armv7 => 0x01c2,
        }
    }
    /// ELF e_machine.
    pub fn elf_machine(self) -> u16 {
        match self {
            Arch::Amd64 => 62,
            Arch::Arm64 => 183,
            Arch::Armv7 => 40,
        }
    }
}

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
