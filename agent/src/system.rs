//! Host facts, through `sysinfo`.

use common::SystemInfo;
use sysinfo::{CpuRefreshKind, MemoryRefreshKind, RefreshKind, System};

/// Reads the host once at start and then for each heartbeat's load figures.
pub struct HostProbe {
    system: System,
}

impl HostProbe {
    pub fn new() -> Self {
        let system = System::new_with_specifics(
            RefreshKind::nothing()
                .with_cpu(CpuRefreshKind::nothing().with_cpu_usage())
                .with_memory(MemoryRefreshKind::nothing().with_ram()),
        );
        HostProbe { system }
    }

    pub fn system_info(&self) -> SystemInfo {
        SystemInfo {
            os: System::name().unwrap_or_else(|| std::env::consts::OS.to_owned()),
            arch: std::env::consts::ARCH.to_owned(),
            cpu_cores: u32::try_from(self.system.cpus().len().max(1)).unwrap_or(u32::MAX),
            total_memory: self.system.total_memory(),
        }
    }

    /// CPU percent since the last call, and bytes of memory in use.
    pub fn load(&mut self) -> (f32, u64) {
        self.system.refresh_cpu_usage();
        self.system.refresh_memory();
        let cpu = self.system.global_cpu_usage();
        let cpu = if cpu.is_finite() {
            cpu.clamp(0.0, 100.0)
        } else {
            0.0
        };
        (cpu, self.system.used_memory())
    }
}

impl Default for HostProbe {
    fn default() -> Self {
        Self::new()
    }
}

/// The host name, for the default machine name.
pub fn host_name() -> String {
    System::host_name().unwrap_or_else(|| "localhost".to_owned())
}
