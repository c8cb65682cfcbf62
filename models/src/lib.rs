//! ablate's neural networks, in plain candle: the generators of "Autoregressive Image Generation
//! without Vector Quantization" (Li et al., 2024) — causal AR and MAR — with their two heads
//! (cross-entropy over a codebook, Diffusion Loss), the Gaussian diffusion process, and the small
//! classifier and the Inception-v3 FID network used as feature nets. No I/O, no printing: weights come in through `VarBuilder`.
pub mod ar;
pub mod autoencoder;
pub mod class_embed;
pub mod classifier;
pub mod config;
pub mod diffloss;
pub mod diffusion;
pub mod flops;
pub mod fused;
pub mod generator;
pub mod head;
pub mod inception;
pub mod init;
pub mod mar;
pub mod nn;
pub mod rng;
pub mod sampling;
pub mod shard;
pub mod tokens;

pub use config::{GeneratorConfig, GeneratorKind, HeadConfig, Order};
pub use generator::Generator;
pub use nn::Precision;
pub use rng::Rng;
pub use sampling::{CfgSchedule, SampleOptions};
pub use shard::Shard;
pub use tokens::Tokens;

/// The one error type of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("invalid model configuration: {0}")]
    Config(String),
    #[error("invalid input: {0}")]
    Input(String),
}

pub type Result<T> = std::result::Result<T, Error>;
