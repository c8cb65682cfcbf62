//! Range and consistency checks of a parsed spec.
use super::*;

/// Range and consistency checks; `err(key, message)` builds the located error.
/// Conditions are written positively so that NaN fails them.
#[allow(clippy::neg_cmp_op_on_partial_ord)]
pub(super) fn validate(s: &Spec, err: &dyn Fn(&str, String) -> SpecError) -> Result<(), SpecError> {
    macro_rules! check {
        ($cond:expr, $key:expr, $($msg:tt)*) => {
            if !($cond) {
                return Err(err($key, format!($($msg)*)));
            }
        };
    }
    check!(!s.name.trim().is_empty(), "name", "must not be empty");
    // the name becomes a folder and lock-file name: stay far below file systems' 255 bytes
    check!(
        s.name.len() <= 100,
        "name",
        "must be at most 100 bytes long, found {}",
        s.name.len()
    );
    check!(!s.seeds.is_empty(), "seeds", "needs at least one seed");
    check!(
        s.device == "cpu"
            || s.device
                .strip_prefix("cuda:")
                .map(|n| n.parse::<usize>().is_ok())
                .unwrap_or(false),
        "device",
        "expected 'cpu' or 'cuda:N', found '{}'",
        s.device
    );
    let d = &s.data;
    check!(
        (8..=64).contains(&d.image_size),
        "data.image_size",
        "expected 8..=64, found {}",
        d.image_size
    );
    let classes = d.classes.unwrap_or(10);
    check!(
        d.source != DataSource::Synthetic || (2..=10).contains(&classes),
        "data.classes",
        "expected 2..=10 for synthetic data, found {}",
        classes
    );
    check!(
        d.classes.is_none_or(|k| k >= 2),
        "data.classes",
        "expected at least 2 classes, found {}",
        classes
    );
    check!(
        (d.source == DataSource::Synthetic) == d.path.is_none(),
        "data.path",
        "{}",
        if d.source == DataSource::Synthetic {
            "synthetic data is generated and takes no path".to_string()
        } else {
            format!(
                "data.source = \"{}\" needs data.path, the folder holding its files",
                d.source.as_str()
            )
        }
    );
    check!(
        d.train >= classes * 2,
        "data.train",
        "needs at least 2 images per class: at least {} for {classes} classes, found {}",
        classes * 2,
        d.train
    );
    check!(
        d.test >= classes * 2,
        "data.test",
        "needs at least 2 images per class: at least {} for {classes} classes, found {}",
        classes * 2,
        d.test
    );
    for (name, t) in &s.tokenizers {
        let key = |k: &str| format!("tokenizers.{name}.{k}");
        check!(
            !t.sample_posterior || t.kind == TokenizerKind::Kl,
            &key("sample_posterior"),
            "only a kl tokenizer has a posterior to sample, this one is {:?}",
            t.kind
        );
        if t.kind.is_autoencoder() {
            check!(
                [4, 8].contains(&t.downsample) && d.image_size.is_multiple_of(t.downsample),
                &key("downsample"),
                "expected 4 or 8, dividing data.image_size ({}), found {}",
                d.image_size,
                t.downsample
            );
            check!(
                (4..=256).contains(&t.width),
                &key("width"),
                "expected 4..=256, found {}",
                t.width
            );
            check!(
                (1..=64).contains(&t.latent_dim),
                &key("latent_dim"),
                "expected 1..=64, found {}",
                t.latent_dim
            );
            check!(t.steps >= 1, &key("steps"), "must be at least 1");
            check!(t.batch >= 1, &key("batch"), "must be at least 1");
            check!(
                t.lr > 0.0 && t.lr.is_finite(),
                &key("lr"),
                "must be a positive number, found {}",
                t.lr
            );
            check!(
                t.beta >= 0.0 && t.beta.is_finite(),
                &key("beta"),
                "must be ≥ 0, found {}",
                t.beta
            );
            check!(
                t.kl_weight >= 0.0 && t.kl_weight.is_finite(),
                &key("kl_weight"),
                "must be ≥ 0, found {}",
                t.kl_weight
            );
            check!(
                t.scale.is_none_or(|v| v > 0.0 && v.is_finite()),
                &key("scale"),
                "must be a positive number, found {}",
                t.scale.unwrap_or(0.0)
            );
        } else {
            check!(
                t.patch >= 1 && d.image_size.is_multiple_of(t.patch),
                &key("patch"),
                "must divide data.image_size ({}), found {}",
                d.image_size,
                t.patch
            );
        }
        if t.kind.is_discrete() {
            check!(
                (2..=65536).contains(&t.codebook),
                &key("codebook"),
                "expected 2..=65536, found {}",
                t.codebook
            );
        }
        if t.kind == TokenizerKind::Kmeans {
            check!(
                t.codebook <= d.train * (d.image_size / t.patch).pow(2),
                &key("codebook"),
                "larger than the number of training patches"
            );
            check!(t.iters >= 1, &key("iters"), "must be at least 1");
        }
    }
    for (arm, a, discrete) in [
        (Arm::CrossEntropy.as_str(), &s.arms.cross_entropy, true),
        (Arm::Diffusion.as_str(), &s.arms.diffusion, false),
    ] {
        let key = format!("arms.{arm}.tokenizer");
        let t = s.tokenizers.get(&a.tokenizer);
        check!(
            t.is_some(),
            &key,
            "no tokenizer named '{}' (defined: {})",
            a.tokenizer,
            s.tokenizers.keys().cloned().collect::<Vec<_>>().join(", ")
        );
        let kind = t.map(|t| t.kind).unwrap_or(TokenizerKind::Patch);
        check!(
            kind.is_discrete() == discrete,
            &key,
            "the {arm} arm needs a {} tokenizer, '{}' is {:?}",
            if discrete {
                "discrete (kmeans or vq)"
            } else {
                "continuous (patch or kl)"
            },
            a.tokenizer,
            kind
        );
    }
    let g = &s.generator;
    check!(
        g.width >= 8,
        "generator.width",
        "expected at least 8, found {}",
        g.width
    );
    check!(
        g.depth >= 1,
        "generator.depth",
        "expected at least 1, found {}",
        g.depth
    );
    check!(
        g.heads >= 1 && g.width.is_multiple_of(g.heads),
        "generator.heads",
        "must divide generator.width ({}), found {}",
        g.width,
        g.heads
    );
    let decoder_heads = g.decoder_heads.unwrap_or(g.heads);
    check!(
        decoder_heads >= 1,
        "generator.decoder_heads",
        "expected at least 1, found {}",
        decoder_heads
    );
    if decoder_heads >= 1 {
        let w = g.decoder_width.unwrap_or(g.width);
        check!(
            w.is_multiple_of(decoder_heads),
            "generator.decoder_heads",
            "must divide the decoder width ({}), found {}",
            w,
            decoder_heads
        );
    }
    for (key, p) in [
        ("generator.attn_dropout", g.attn_dropout),
        ("generator.proj_dropout", g.proj_dropout),
    ] {
        check!((0.0..1.0).contains(&p), key, "expected [0, 1), found {}", p);
    }
    check!(
        g.mlp_ratio > 0.0,
        "generator.mlp_ratio",
        "must be positive, found {}",
        g.mlp_ratio
    );
    check!(
        (0.0..1.0).contains(&g.label_drop),
        "generator.label_drop",
        "expected [0, 1), found {}",
        g.label_drop
    );
    check!(
        g.buffer >= 1,
        "generator.buffer",
        "expected at least 1, found {}",
        g.buffer
    );
    let h = &s.head;
    check!(
        h.width >= 1 && h.depth >= 1,
        "head.width",
        "width and depth must be positive"
    );
    check!(
        h.batch_mul >= 1,
        "head.batch_mul",
        "expected at least 1, found {}",
        h.batch_mul
    );
    check!(
        h.train_steps >= 2,
        "head.train_steps",
        "expected at least 2, found {}",
        h.train_steps
    );
    check!(
        (1..=h.train_steps).contains(&h.sampling_steps),
        "head.sampling_steps",
        "expected 1..={} (head.train_steps), found {}",
        h.train_steps,
        h.sampling_steps
    );
    let t = &s.train;
    check!(
        t.steps >= 1,
        "train.steps",
        "expected at least 1, found {}",
        t.steps
    );
    check!(
        t.batch >= 1,
        "train.batch",
        "expected at least 1, found {}",
        t.batch
    );
    check!(
        t.base_lr > 0.0 && t.base_lr.is_finite(),
        "train.base_lr",
        "must be positive, found {}",
        t.base_lr
    );
    check!(
        t.weight_decay >= 0.0,
        "train.weight_decay",
        "must be ≥ 0, found {}",
        t.weight_decay
    );
    check!(
        t.grad_clip > 0.0,
        "train.grad_clip",
        "must be positive, found {}",
        t.grad_clip
    );
    check!(
        (0.0..1.0).contains(&t.ema),
        "train.ema",
        "expected an EMA decay in [0, 1) (0 evaluates the raw weights), found {}",
        t.ema
    );
    for (i, name) in t.devices.iter().enumerate() {
        check!(
            crate::device::is_device_name(name),
            "train.devices",
            "entry {i}: expected 'cpu' or 'cuda:N', found '{name}'"
        );
    }
    check!(
        t.devices.is_empty() || t.batch.is_multiple_of(t.devices.len()),
        "train.devices",
        "{} data-parallel ranks cannot share train.batch = {}: the count must divide the batch",
        t.devices.len(),
        t.batch
    );
    check!(
        t.batch <= d.train,
        "train.batch",
        "expected at most data.train = {} images, found {}",
        d.train,
        t.batch
    );
    check!(
        t.log_every >= 1,
        "train.log_every",
        "expected at least 1, found {}",
        t.log_every
    );
    check!(
        s.eval.every_count.is_none_or(|c| c >= 2),
        "eval.every_count",
        "expected at least 2, found {}",
        s.eval.every_count.unwrap_or(0)
    );
    let sp = &s.sample;
    let tokens = s
        .tokenizers
        .values()
        .map(|t| t.seq_len(d.image_size))
        .min()
        .unwrap_or(1);
    check!(
        sp.count >= 2,
        "sample.count",
        "expected at least 2, found {}",
        sp.count
    );
    check!(
        sp.batch >= 1,
        "sample.batch",
        "expected at least 1, found {}",
        sp.batch
    );
    check!(
        (1..=tokens).contains(&sp.mar_steps),
        "sample.mar_steps",
        "expected 1..={tokens} (the number of tokens), found {}",
        sp.mar_steps
    );
    check!(
        sp.cfg >= 1.0,
        "sample.cfg",
        "expected ≥ 1.0 (1.0 = no guidance), found {}",
        sp.cfg
    );
    check!(
        sp.temperature > 0.0,
        "sample.temperature",
        "must be positive, found {}",
        sp.temperature
    );
    let e = &s.eval;
    check!(
        e.classifier_steps >= 1,
        "eval.classifier_steps",
        "expected at least 1"
    );
    check!(
        e.classifier_features >= 2,
        "eval.classifier_features",
        "expected at least 2"
    );
    check!(
        (1..=sp.count).contains(&e.is_splits),
        "eval.is_splits",
        "expected 1..={} (sample.count), found {}",
        sp.count,
        e.is_splits
    );
    for (metric, tol) in &s.drift {
        check!(
            tol.absolute.is_some() || tol.relative.is_some() || tol.seed_spread.is_some(),
            &format!("drift.{metric}"),
            "give at least one of absolute, relative, seed_spread"
        );
        for (mode, v) in [
            ("absolute", tol.absolute),
            ("relative", tol.relative),
            ("seed_spread", tol.seed_spread),
        ] {
            if let Some(v) = v {
                check!(
                    v.is_finite() && v >= 0.0,
                    &format!("drift.{metric}.{mode}"),
                    "expected a finite number ≥ 0, found {v}"
                );
            }
        }
    }
    Ok(())
}
