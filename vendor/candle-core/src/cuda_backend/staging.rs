//! ablate patch (see vendor/README.md): host-to-device copies staged through a ring of
//! page-locked host memory.
//!
//! `cuMemcpyHtoDAsync` from pageable memory may wait until the stream has drained before it
//! returns (the driver stages the bytes itself), so an upload in the middle of a training step
//! (an index, per-row diffusion coefficients, a mask) can stall the host behind every kernel
//! already queued, and host and device then take turns instead of overlapping. From page-locked
//! memory the copy is queued like a kernel. The host copies the bytes into the ring, queues the
//! device copy, and records an event; a part of the ring is written again only after the event of
//! the copy that last read it has completed.
use std::collections::VecDeque;
use std::sync::Arc;

use cudarc::driver::{result, sys, CudaContext, CudaEvent, CudaStream};

use super::WrapErr;
use crate::Result;

/// Bytes of page-locked memory per device.
const RING_BYTES: usize = 64 << 20;
/// Copies larger than this go straight from pageable memory.
const MAX_STAGED_BYTES: usize = RING_BYTES / 4;
/// Copies take whole units of this many bytes (keeps the device reads aligned).
const ALIGN: usize = 256;

pub(crate) struct StagingRing {
    /// The ring (allocated at the first copy), null before that or when it could not be had.
    base: *mut u8,
    failed: bool,
    /// Where the next copy's bytes go.
    head: usize,
    /// Copies whose device side may still be reading the ring, oldest first:
    /// (offset, the event recorded after the copy).
    in_flight: VecDeque<(usize, CudaEvent)>,
}

// SAFETY: `base` is owned by the ring and only touched under the device's mutex.
unsafe impl Send for StagingRing {}

impl StagingRing {
    pub(crate) fn new() -> Self {
        StagingRing {
            base: std::ptr::null_mut(),
            failed: false,
            head: 0,
            in_flight: VecDeque::new(),
        }
    }

    /// Queue a copy of `bytes` to device address `dst` on `stream` through the ring. Returns
    /// false, having done nothing, when the copy is not staged (too large, disabled with
    /// CANDLE_CUDA_PAGEABLE_UPLOADS=1, or no page-locked memory): the caller copies directly.
    pub(crate) fn copy(
        &mut self,
        ctx: &Arc<CudaContext>,
        stream: &Arc<CudaStream>,
        bytes: &[u8],
        dst: sys::CUdeviceptr,
    ) -> Result<bool> {
        if bytes.is_empty() || bytes.len() > MAX_STAGED_BYTES || !self.ready(ctx) {
            return Ok(false);
        }
        let n = bytes.len().div_ceil(ALIGN) * ALIGN;
        let at = self.reserve(n)?;
        // SAFETY: [at, at + n) lies in the ring, and no queued copy reads it any more (reserve).
        let staged = unsafe {
            let p = self.base.add(at);
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), p, bytes.len());
            std::slice::from_raw_parts(p as *const u8, bytes.len())
        };
        // SAFETY: `dst` holds at least bytes.len() bytes (the caller's allocation), and the staged
        // bytes stay untouched until the event recorded below has completed.
        unsafe { result::memcpy_htod_async(dst, staged, stream.cu_stream()) }.w()?;
        let event = ctx
            .new_event(Some(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING))
            .w()?;
        event.record(stream).w()?;
        self.in_flight.push_back((at, event));
        Ok(true)
    }

    /// Whether the ring can take copies, allocating it on first use.
    fn ready(&mut self, ctx: &Arc<CudaContext>) -> bool {
        if !self.base.is_null() {
            return true;
        }
        if self.failed || std::env::var_os("CANDLE_CUDA_PAGEABLE_UPLOADS").is_some_and(|v| v == "1")
        {
            self.failed = true;
            return false;
        }
        let ok = ctx.bind_to_thread().is_ok();
        // SAFETY: a plain page-locked allocation, freed in Drop.
        match ok.then(|| unsafe { result::malloc_host(RING_BYTES, 0) }) {
            Some(Ok(p)) => self.base = p as *mut u8,
            _ => self.failed = true,
        }
        !self.failed
    }

    /// The offset of `n` free bytes: after the last copy, or at the start when they do not fit
    /// before the end; waits for the copies still reading those bytes. Copies are laid out in
    /// the order they were made, so the ones to wait for are at the front of `in_flight`: first
    /// those in the skipped tail (at or after `head`), then those that start inside the range.
    fn reserve(&mut self, n: usize) -> Result<usize> {
        if self.head + n > RING_BYTES {
            while let Some((at, _)) = self.in_flight.front() {
                if *at < self.head {
                    break;
                }
                self.wait_oldest()?;
            }
            self.head = 0;
        }
        while let Some((at, _)) = self.in_flight.front() {
            if *at < self.head || *at >= self.head + n {
                break;
            }
            self.wait_oldest()?;
        }
        let at = self.head;
        self.head += n;
        Ok(at)
    }

    fn wait_oldest(&mut self) -> Result<()> {
        if let Some((_, event)) = self.in_flight.pop_front() {
            event.synchronize().w()?;
        }
        Ok(())
    }
}

impl Drop for StagingRing {
    fn drop(&mut self) {
        while !self.in_flight.is_empty() {
            if self.wait_oldest().is_err() {
                // the context is gone or broken: the device no longer reads the ring
                self.in_flight.clear();
            }
        }
        if !self.base.is_null() {
            // SAFETY: allocated by malloc_host, and no copy reads it any more.
            let _ = unsafe { result::free_host(self.base as *mut std::ffi::c_void) };
        }
    }
}
