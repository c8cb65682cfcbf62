//! ablate's harness: the experiment spec, data sets, tokenizers, training, sampling, evaluation
//! and the runner that ties them to the tracking database. The `ablate` binary is `main.rs`.
pub mod data;
pub mod device;
pub mod error;
pub mod eval;
pub mod generator;
pub mod identity;
pub mod import;
pub mod layout;
pub mod lock;
pub mod record;
pub mod runner;
pub mod sample;
pub mod spec;
pub mod stop;
pub mod tokenize;
pub mod train;

pub use error::{Error, Result};
