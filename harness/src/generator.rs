//! The generator a run trains, in the model's terms: its configuration, from the run's spec and
//! its tokenizer, and the descriptor of the built model that reports read.
use models::diffusion::Schedule;
use models::{GeneratorConfig, GeneratorKind, HeadConfig};

use crate::spec::{Arm, GeneratorKindSpec, OrderSpec, PlannedRun, ScheduleSpec, TokenizerKind};
use crate::tokenize::Tokenizer;

/// What the run is in the paper's terms, for reports ([`db::RunDescriptor`]): the generator and
/// its order, the built model's sequence length and size, and the settings a report shows.
pub fn descriptor(
    run: &PlannedRun,
    cfg: &GeneratorConfig,
    param_count: usize,
) -> db::RunDescriptor {
    // the spec's own spelling of an enum value ("ar", "raster", "kmeans")
    fn spelled(value: impl serde::Serialize) -> String {
        match serde_json::to_value(value) {
            Ok(serde_json::Value::String(s)) => s,
            _ => "?".into(),
        }
    }
    let s = &run.spec;
    db::RunDescriptor {
        generator: spelled(s.generator.kind),
        order: match s.generator.kind {
            GeneratorKindSpec::Ar => spelled(s.generator.order),
            GeneratorKindSpec::Mar => "random".into(),
        },
        seq_len: cfg.seq_len as u64,
        param_count: param_count as u64,
        train_steps: s.train.steps as u64,
        mar_steps: s.sample.mar_steps as u64,
        cfg: s.sample.cfg,
        temperature: s.sample.temperature,
        sampling_steps: (run.arm == Arm::Diffusion).then_some(s.head.sampling_steps as u64),
        tokenizer: run.tokenizer_name().to_string(),
        tokenizer_kind: spelled(run.tokenizer().kind),
    }
}

/// The model configuration of a run, from its spec and its tokenizer.
pub fn config(run: &PlannedRun, tok: &Tokenizer, classes: usize) -> GeneratorConfig {
    let g = &run.spec.generator;
    let h = &run.spec.head;
    GeneratorConfig {
        kind: match g.kind {
            GeneratorKindSpec::Ar => GeneratorKind::Ar,
            GeneratorKindSpec::Mar => GeneratorKind::Mar,
        },
        order: match (g.kind, g.order) {
            (GeneratorKindSpec::Ar, OrderSpec::Raster) => models::Order::Raster,
            _ => models::Order::Random,
        },
        seq_len: tok.seq_len(),
        token_dim: tok.token_dim(),
        width: g.width,
        // size parity (the paper's causal AR baseline, its authors in the official repo's
        // issue #34): no MAE encoder, one stack as deep as MAR's encoder and decoder together
        depth: match g.kind {
            GeneratorKindSpec::Ar => g.depth + g.decoder_depth.unwrap_or(g.depth),
            GeneratorKindSpec::Mar => g.depth,
        },
        decoder_width: g.decoder_width.unwrap_or(g.width),
        decoder_depth: g.decoder_depth.unwrap_or(g.depth),
        heads: g.heads,
        decoder_heads: g.decoder_heads.unwrap_or(g.heads),
        mlp_ratio: g.mlp_ratio,
        num_classes: classes,
        buffer_size: g.buffer,
        label_drop: g.label_drop,
        attn_dropout: g.attn_dropout,
        proj_dropout: g.proj_dropout,
        head: match run.arm {
            Arm::CrossEntropy => HeadConfig::CrossEntropy {
                vocab: tok.vocab().unwrap_or(2),
            },
            Arm::Diffusion => HeadConfig::Diffusion {
                width: h.width,
                depth: h.depth,
                batch_mul: h.batch_mul,
                train_steps: h.train_steps,
                sampling_steps: h.sampling_steps,
                schedule: match h.schedule {
                    ScheduleSpec::Cosine => Schedule::Cosine,
                    ScheduleSpec::Linear => Schedule::Linear,
                },
                learn_sigma: h.learn_sigma,
                // clipping x₀ to [-1, 1] only makes sense for pixel tokens; latents are unbounded
                clip_denoised: h.clip_denoised && tok.kind == TokenizerKind::Patch,
            },
        },
        precision: run.spec.train.precision.to_model(),
    }
}
