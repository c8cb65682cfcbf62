//! The machine a run happens on: the device named in a spec or on the command line (and the
//! CUDA settings applied to it), and the facts recorded with each run (host, commit, process).
use std::path::Path;

use candle_core::Device;

use crate::{Error, Result};

/// Facts about where a run happens, recorded with it.
#[derive(Debug, Clone)]
pub struct Environment {
    pub host: String,
    pub git_commit: Option<String>,
    pub git_dirty: bool,
    pub pid: i64,
}

impl Environment {
    pub fn detect() -> Self {
        let git = |args: &[&str]| {
            std::process::Command::new("git")
                .args(args)
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        };
        Environment {
            host: host_name(),
            git_commit: git(&["rev-parse", "HEAD"]),
            git_dirty: git(&["status", "--porcelain"])
                .map(|s| !s.is_empty())
                .unwrap_or(false),
            pid: std::process::id() as i64,
        }
    }
}

/// "cpu" or "cuda:N", as recorded with a run.
pub fn device_label(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        _ => "cpu".into(),
    }
}

pub fn pid_alive(pid: i64) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Whether `name` reads as a device: `cpu` or `cuda:N` (whether it exists is not checked).
pub fn is_device_name(name: &str) -> bool {
    name == "cpu"
        || name
            .strip_prefix("cuda:")
            .is_some_and(|n| n.parse::<usize>().is_ok())
}

/// This machine's name (the kernel's, else `HOSTNAME`, else "unknown").
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| "unknown".into())
}

/// Parse "cpu" / "cuda:N" into a candle device.
pub fn parse_device(name: &str) -> Result<Device> {
    if name == "cpu" {
        return Ok(Device::Cpu);
    }
    if let Some(n) = name.strip_prefix("cuda:") {
        let bad = |message: String| Error::Device {
            name: name.to_string(),
            message,
        };
        let n: usize = n.parse().map_err(|_| bad("expected cuda:N".into()))?;
        let device = Device::new_cuda(n).map_err(|e| {
            bad(format!(
                "{e} (was ablate built with `--features cuda`, and is a GPU present?)"
            ))
        })?;
        tune_cuda_device(&device).map_err(|e| bad(format!("setting up its memory pool: {e}")))?;
        return Ok(device);
    }
    Err(Error::Device {
        name: name.to_string(),
        message: "expected 'cpu' or 'cuda:N'".into(),
    })
}

/// Two settings of cudarc's defaults that cost ablate's many short-lived tensors dearly:
/// - Every allocation comes from the device's stream-ordered memory pool, whose release threshold
///   is 0 by default: at every synchronisation (each training step reads its loss) the pool hands
///   its free memory back to the driver, and the next step maps it again, allocation by
///   allocation. The threshold is raised to "never", so the pool keeps what the step needed, as
///   PyTorch's caching allocator does.
/// - cudarc gives every allocation a pair of CUDA events for synchronising several streams.
///   ablate runs each device on one stream, where they are never recorded: switching them off
///   before the first allocation saves four driver calls per tensor.
fn tune_cuda_device(device: &Device) -> std::result::Result<(), String> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        use candle_core::cuda_backend::cudarc::driver::{result, sys};
        let cu_device = d.cuda_stream().context().cu_device();
        let mut never = u64::MAX;
        // SAFETY: cu_device comes from a live context; the attribute takes a u64 by pointer
        unsafe {
            let pool = result::device::get_mem_pool(cu_device).map_err(|e| e.to_string())?;
            result::mem_pool::set_attribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                (&mut never as *mut u64).cast(),
            )
            .map_err(|e| e.to_string())?;
            // single-stream use (see above); no slice allocated so far relies on events
            d.disable_event_tracking();
        }
    }
    #[cfg(not(feature = "cuda"))]
    let _ = device;
    Ok(())
}
