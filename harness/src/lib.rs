//! ablate's harness: the experiment spec, data sets, tokenizers, training, sampling, evaluation
//! and the runner that ties them to the tracking database. The `ablate` binary is `main.rs`.
pub mod bench;
pub mod cli;
pub mod compare;
pub mod data;
pub mod device;
pub mod error;
pub mod eval;
pub mod fid;
pub mod identity;
pub mod import;
pub mod layout;
pub mod lock;
pub mod profile;
pub mod runner;
pub mod sample;
pub mod selftest;
pub mod slurm;
pub mod spec;
pub mod stop;
pub mod tokenize;
pub mod train;
pub mod workers;

pub use error::{Error, Result};
