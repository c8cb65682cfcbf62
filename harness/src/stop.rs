//! Graceful stops. SIGINT (Ctrl-C) and SIGTERM (what Slurm and Kubernetes send before killing a
//! job) set a flag instead of killing the process; the training loop checks it after each step,
//! checkpoints, and returns [`Stopped`], and the runner marks the run `interrupted` and stops.
//! A second signal of the same kind ends the process at once.
use std::sync::atomic::{AtomicBool, Ordering};

static INT: AtomicBool = AtomicBool::new(false);
static TERM: AtomicBool = AtomicBool::new(false);

const SIGINT: i32 = signal_hook::consts::SIGINT;
const SIGTERM: i32 = signal_hook::consts::SIGTERM;

/// The work was stopped by a signal; a later `ablate run` resumes it. Exit code 128 + signal.
#[derive(Debug, thiserror::Error)]
#[error("stopped by {} (a later `ablate run` resumes)", signal_name(*.0))]
pub struct Stopped(pub i32);

impl Stopped {
    /// The shell's exit code for a process ended by this signal.
    pub fn exit_code(&self) -> i32 {
        128 + self.0
    }
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        SIGINT => "SIGINT",
        SIGTERM => "SIGTERM",
        _ => "a signal",
    }
}

/// Install the handlers (once, at start-up).
pub fn install() -> std::io::Result<()> {
    for (sig, flag) in [(SIGINT, &INT), (SIGTERM, &TERM)] {
        // registered first, so it sees the flag as the earlier signal left it
        signal_hook::flag::register_conditional_shutdown(sig, 128 + sig, flag)?;
        signal_hook::flag::register(sig, flag)?;
    }
    Ok(())
}

/// The signal that asked to stop, if one did.
pub fn requested() -> Option<i32> {
    if TERM.load(Ordering::SeqCst) {
        Some(SIGTERM)
    } else if INT.load(Ordering::SeqCst) {
        Some(SIGINT)
    } else {
        None
    }
}

/// `Err(Stopped)` once a stop was requested.
pub fn check() -> Result<(), Stopped> {
    match requested() {
        Some(sig) => Err(Stopped(sig)),
        None => Ok(()),
    }
}
