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

/// The QEMU machines `kiln run` boots, as a profile's `[qemu] machine`
/// names them. Each says how its disk, sticks and NIC attach and what the
/// emulation lacks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Machine {
    /// amd64: q35 with OVMF.
    Q35,
    /// arm64 and armv7: QEMU virt (UEFI on arm64, u-boot `qemu_arm` on
    /// armv7), virtio devices.
    Virt,
    /// armv7: the Xunlong Orange Pi PC (Allwinner H3). The emulated boot ROM
    /// loads the SPL from the SD card; the card is on the SoC's SD host, the
    /// NIC is the SoC's EMAC, sticks go on its EHCI. QEMU 7.2 has no model
    /// of the H3 watchdog, so the board cannot reset itself.
    OrangePiPc,
}

impl Machine {
    pub const ALL: [Machine; 3] = [Machine::Q35, Machine::Virt, Machine::OrangePiPc];

    pub fn as_str(self) -> &'static str {
        match self {
            Machine::Q35 => "q35",
            Machine::Virt => "virt",
            Machine::OrangePiPc => "orangepi-pc",
        }
    }

    /// The arches the machine runs.
    pub fn arches(self) -> &'static [Arch] {
        match self {
            Machine::Q35 => &[Arch::Amd64],
            Machine::Virt => &[Arch::Arm64, Arch::Armv7],
            Machine::OrangePiPc => &[Arch::Armv7],
        }
    }

    /// The default machine of an arch.
    pub fn default_for(arch: Arch) -> Machine {
        match arch {
            Arch::Amd64 => Machine::Q35,
            _ => Machine::Virt,
        }
    }

    /// `name` for `arch`, or why not, with the names that would do.
    pub fn parse(name: &str, arch: Arch) -> Result<Machine, String> {
        let fits: Vec<&str> = Machine::ALL.iter().filter(|m| m.arches().contains(&arch)).map(|m| m.as_str()).collect();
        match Machine::ALL.iter().find(|m| m.as_str() == name) {
            Some(m) if m.arches().contains(&arch) => Ok(*m),
            Some(_) => Err(format!("QEMU machine `{name}` does not run {arch}; for {arch} use {}", fits.join(" or "))),
            None => Err(format!("`{name}` is not a QEMU machine kiln runs; for {arch} use {}", fits.join(" or "))),
        }
    }

    /// An emulated real board: firmware and bootloader come from the card,
    /// which QEMU attaches as an SD card (a power-of-two size).
    pub fn is_board(self) -> bool {
        self == Machine::OrangePiPc
    }

    /// Whether the guest can reset (reboot) the machine. QEMU 7.2's
    /// orangepi-pc has no H3 watchdog, which is how Linux and u-boot reset
    /// the H3, so `kiln run` restarts QEMU when the guest asks.
    pub fn resets_itself(self) -> bool {
        self != Machine::OrangePiPc
    }

    /// The CPU count QEMU insists on for the machine (the SoC's cores).
    pub fn fixed_cpus(self) -> Option<u32> {
        match self {
            Machine::OrangePiPc => Some(4),
            _ => None,
        }
    }

    /// The most memory QEMU gives the machine, in MiB.
    pub fn max_memory_mib(self) -> Option<u32> {
        match self {
            Machine::OrangePiPc => Some(1024),
            _ => None,
        }
    }
}

impl std::fmt::Display for Machine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
