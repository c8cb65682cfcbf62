//! Runs the CUDA kernels of `models/src/fused/kernels.cu` on the CPU, so that tests can check
//! what the GPU code computes on machines without a GPU (CI has none).
//!
//! build.rs compiles kernels.cu as C++ with `src/emu.h` standing in for CUDA: a launch runs the
//! blocks one after another and each block's threads as OS threads, `__syncthreads` and warp
//! shuffles as barriers. That checks a kernel's arithmetic, indexing and synchronisation as
//! written; it does not check speed, and the device's own math library (erff, expf) may differ
//! from the host's in the last bits.
use std::ffi::{c_char, c_void, CString};

extern "C" {
    fn cuda_emu_launch(
        name: *const c_char,
        grid: *const u32,
        block: *const u32,
        params: *mut *mut c_void,
        n_params: usize,
        err: *mut c_char,
        err_len: usize,
    ) -> i32;
}

/// A kernel argument, as the kernel's parameter of the same C type reads it (`usize` is
/// `size_t`, `i32` is `int`, pointers are device pointers, here host memory).
pub trait Arg {
    /// The value's bytes in the low bytes of a u64 (little-endian, as x86-64 and aarch64).
    fn bits(&self) -> u64;
}

impl Arg for usize {
    fn bits(&self) -> u64 {
        *self as u64
    }
}
impl Arg for u64 {
    fn bits(&self) -> u64 {
        *self
    }
}
impl Arg for u32 {
    fn bits(&self) -> u64 {
        *self as u64
    }
}
impl Arg for i32 {
    fn bits(&self) -> u64 {
        *self as u32 as u64
    }
}
impl Arg for f32 {
    fn bits(&self) -> u64 {
        self.to_bits() as u64
    }
}
impl<T> Arg for *const T {
    fn bits(&self) -> u64 {
        *self as usize as u64
    }
}
impl<T> Arg for *mut T {
    fn bits(&self) -> u64 {
        *self as usize as u64
    }
}

/// One launch of a kernel of kernels.cu, its arguments in the order of the kernel's parameters.
pub struct Launch {
    kernel: String,
    args: Vec<u64>,
}

impl Launch {
    pub fn new(kernel: &str) -> Launch {
        Launch {
            kernel: kernel.to_string(),
            args: Vec::new(),
        }
    }

    pub fn arg(mut self, value: impl Arg) -> Launch {
        self.args.push(value.bits());
        self
    }

    /// Runs the kernel over `grid` blocks of `block` threads, as `kernel<<<grid, block>>>(args)`;
    /// errors for an unknown kernel, a wrong number of arguments or an impossible geometry.
    ///
    /// # Safety
    /// Every pointer argument must point to memory that the kernel may read, or write, at every
    /// index it computes from the other arguments and the geometry, as on the GPU.
    pub unsafe fn run(self, grid: (u32, u32, u32), block: (u32, u32, u32)) -> Result<(), String> {
        let name = CString::new(self.kernel.as_str()).map_err(|e| e.to_string())?;
        let mut values = self.args;
        let mut params: Vec<*mut c_void> = values
            .iter_mut()
            .map(|v| v as *mut u64 as *mut c_void)
            .collect();
        let (g, b) = ([grid.0, grid.1, grid.2], [block.0, block.1, block.2]);
        let mut err = vec![0u8; 512];
        // SAFETY: params point into `values`, alive for the call; the caller vouches for the
        // pointers among the values (above).
        let rc = cuda_emu_launch(
            name.as_ptr(),
            g.as_ptr(),
            b.as_ptr(),
            params.as_mut_ptr(),
            params.len(),
            err.as_mut_ptr() as *mut c_char,
            err.len(),
        );
        if rc == 0 {
            return Ok(());
        }
        let end = err.iter().position(|&c| c == 0).unwrap_or(err.len());
        Err(String::from_utf8_lossy(&err[..end]).into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_block_sum_over_warps_and_barriers() {
        // softmax's backward, ds = scale·p·(dp − Σ p·dp), over one row wider than a warp takes:
        // a block of 256 threads sums over its 8 warps (shuffles, __syncthreads)
        let cols = 1500usize;
        let p: Vec<f32> = (0..cols).map(|j| 1.0 / (1.0 + j as f32)).collect();
        let dp: Vec<f32> = (0..cols).map(|j| (j % 7) as f32 - 3.0).collect();
        let mut ds = vec![f32::NAN; cols];
        let inner: f32 = p.iter().zip(&dp).map(|(a, b)| a * b).sum();
        unsafe {
            Launch::new("fused_softmax_bwd")
                .arg(1usize)
                .arg(cols)
                .arg(p.as_ptr())
                .arg(cols)
                .arg(dp.as_ptr())
                .arg(cols)
                .arg(0.5f32)
                .arg(ds.as_mut_ptr())
                .run((1, 1, 1), (256, 1, 1))
                .unwrap();
        }
        for j in 0..cols {
            let want = 0.5 * p[j] * (dp[j] - inner);
            assert!(
                (ds[j] - want).abs() < 1e-5,
                "ds[{j}] = {}, want {want}",
                ds[j]
            );
        }
    }

    #[test]
    fn wrong_launches_are_errors() {
        let e = unsafe { Launch::new("no_such_kernel").run((1, 1, 1), (32, 1, 1)) };
        assert!(e.unwrap_err().contains("no kernel `no_such_kernel`"));
        let e = unsafe {
            Launch::new("fused_gelu_fwd")
                .arg(1usize)
                .run((1, 1, 1), (32, 1, 1))
        };
        assert!(e.unwrap_err().contains("takes 5 arguments, got 1"));
        let finalize = || {
            let null = std::ptr::null::<f32>();
            Launch::new("col_sum_finalize")
                .arg(0usize)
                .arg(0usize)
                .arg(null)
                .arg(null)
        };
        let e = unsafe { finalize().run((1, 1, 1), (2048, 1, 1)) };
        assert!(e.unwrap_err().contains("threads per block"));
        let e = unsafe { finalize().run((0, 1, 1), (32, 1, 1)) };
        assert!(e.unwrap_err().contains("grid (0, 1, 1)"));
    }
}
