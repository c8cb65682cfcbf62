//! Commands beside the runner: `fid`, `bench`, `selftest`, `import`, `sample`.
use super::*;

/// `ablate fid`.
pub(super) fn fid(layout: &Layout, args: FidArgs) -> anyhow::Result<i32> {
    let FidArgs {
        paths,
        save_stats,
        inception_score,
        weights,
        convention,
        feature_net,
        batch,
    } = args;
    let o = crate::fid::FidOptions {
        paths,
        save_stats,
        is: inception_score,
        weights,
        convention,
        feature_net,
        batch,
    };
    crate::fid::run(layout, &o)?;
    Ok(0)
}

/// `ablate bench`.
pub(super) fn bench(args: BenchArgs) -> anyhow::Result<i32> {
    let BenchArgs {
        device,
        workloads,
        steps,
        precision,
        peak_tflops,
        batch,
        phases,
        profile,
        list,
    } = args;
    let all = crate::bench::workloads();
    if list {
        for w in &all {
            println!(
                "{:<12} {:?} {}×{} tokens, width {}, depth {}+{}, batch {}",
                w.name, w.kind, w.side, w.side, w.width, w.depth, w.decoder_depth, w.batch
            );
        }
        for (name, what) in crate::bench::EVAL_WORKLOADS {
            println!("{name:<12} {what}");
        }
        return Ok(0);
    }
    let dev = harness::device::parse_device(&device)?;
    if steps == 0 {
        anyhow::bail!("--steps must be at least 1");
    }
    let precision = match precision {
        Some(p) => crate::bench::parse_precision(&p)?,
        None if dev.is_cuda() => models::Precision::Bf16,
        None => models::Precision::F32,
    };
    let peak_tflops = peak_tflops.or(match (dev.is_cuda(), precision) {
        (true, models::Precision::Bf16) => Some(989.0),
        (true, models::Precision::F32) => Some(67.0),
        (false, _) => None,
    });
    // evaluation workloads run only when named
    let (eval, workloads): (Vec<String>, Vec<String>) = workloads
        .into_iter()
        .partition(|w| crate::bench::EVAL_WORKLOADS.iter().any(|(n, _)| n == w));
    for name in &eval {
        let line = crate::bench::run_eval(name, &dev, &device, steps)?;
        println!("{line}");
    }
    if !eval.is_empty() && workloads.is_empty() {
        return Ok(0);
    }
    let chosen: Vec<_> = if workloads.is_empty() {
        all.into_iter()
            .filter(|w| w.name.ends_with("-tiny") || w.name.ends_with("-tiny-ce"))
            .collect()
    } else {
        let mut v = Vec::new();
        for name in &workloads {
            match all.iter().find(|w| w.name == name) {
                Some(w) => v.push(w.clone()),
                None => anyhow::bail!(
                    "unknown workload '{name}'; known: {}",
                    all.iter().map(|w| w.name).collect::<Vec<_>>().join(", ")
                ),
            }
        }
        v
    };
    if batch == Some(0) {
        anyhow::bail!("--batch must be at least 1");
    }
    for w in &chosen {
        let w = crate::bench::Workload {
            batch: batch.unwrap_or(w.batch),
            ..w.clone()
        };
        let o = crate::bench::Options {
            steps,
            precision,
            peak_tflops,
            phases,
            profile: profile
                .as_ref()
                .map(|p| p.with_extension(format!("{}.txt", w.name))),
        };
        let line = crate::bench::run(&w, &dev, &device, &o)?;
        println!("{line}");
    }
    Ok(0)
}

/// `ablate selftest`.
pub(super) fn selftest(args: SelftestArgs) -> anyhow::Result<i32> {
    let SelftestArgs { device } = args;
    let dev = harness::device::parse_device(&device)?;
    let checks = crate::selftest::run(&dev, &device, |group| {
        for c in group {
            if let Ok(line) = serde_json::to_string(c) {
                println!("{line}");
            }
        }
    })?;
    let failed: Vec<&str> = checks
        .iter()
        .filter(|c| !c.pass)
        .map(|c| c.check.as_str())
        .collect();
    if failed.is_empty() {
        eprintln!("selftest: all {} checks passed on {device}", checks.len());
        Ok(0)
    } else {
        eprintln!(
            "selftest: {} of {} checks failed on {device}: {}",
            failed.len(),
            checks.len(),
            failed.join(", ")
        );
        Ok(1)
    }
}

/// `ablate import`.
pub(super) fn import(args: ImportArgs) -> anyhow::Result<i32> {
    let ImportArgs {
        checkpoint,
        out,
        heads,
        decoder_heads,
        patch_size,
        vae_stride,
        diffusion_batch_mul,
        num_sampling_steps,
    } = args;
    let out = out.unwrap_or_else(|| checkpoint.with_extension(""));
    if out == checkpoint {
        return Err(UsageError(format!(
            "{}: give --out (the default output folder is the checkpoint path without \
                 its extension)",
            checkpoint.display()
        ))
        .into());
    }
    let opts = harness::import::ImportOptions {
        heads,
        decoder_heads,
        patch_size,
        vae_stride,
        diffusion_batch_mul,
        num_sampling_steps,
    };
    let r = harness::import::import(&checkpoint, &out, &opts)?;
    print_import(&checkpoint, &r);
    Ok(0)
}

/// `ablate sample`.
pub(super) fn sample(quiet: bool, args: SampleArgs) -> anyhow::Result<i32> {
    let SampleArgs {
        weights,
        config,
        no_ema,
        classes,
        count,
        mar_steps,
        cfg,
        cfg_schedule,
        temperature,
        diffusion_steps,
        seed,
        batch,
        device,
        out,
    } = args;
    let dev = harness::device::parse_device(&device)?;
    let (file, cfg_path) = harness::import::resolve_weights(&weights, config.as_deref(), !no_ema)?;
    let mc = harness::import::read_config(&cfg_path)?;
    if let Some(&c) = classes.iter().find(|&&c| c as usize >= mc.class_num) {
        return Err(UsageError(format!(
            "--classes: class {c} is out of range: the model has {} classes (0..{})",
            mc.class_num,
            mc.class_num - 1
        ))
        .into());
    }
    let classes: Vec<u32> = if classes.is_empty() {
        (0..mc.class_num as u32).collect()
    } else {
        classes
    };
    let count = count.unwrap_or(classes.len());
    if count == 0 || batch == 0 || mar_steps == 0 {
        return Err(UsageError("--count, --batch and --mar-steps must be positive".into()).into());
    }
    if temperature <= 0.0 || cfg < 0.0 {
        return Err(
            UsageError("--temperature must be positive and --cfg non-negative".into()).into(),
        );
    }
    let mar = harness::import::load_mar(&file, &mc, &cfg_path, diffusion_steps, &dev)?;
    let labels: Vec<u32> = (0..count).map(|i| classes[i % classes.len()]).collect();
    let opts = models::SampleOptions {
        num_iter: mar_steps.min(mc.seq_len),
        cfg,
        cfg_schedule: match cfg_schedule {
            CfgScheduleArg::Linear => models::CfgSchedule::Linear,
            CfgScheduleArg::Constant => models::CfgSchedule::Constant,
        },
        temperature,
    };
    let mut rng = models::Rng::new(seed);
    let started = std::time::Instant::now();
    let mut parts = Vec::new();
    for chunk in labels.chunks(batch) {
        match mar.sample(chunk, &opts, &mut rng)? {
            models::Tokens::Continuous(t) => parts.push(t.to_dtype(candle_core::DType::F32)?),
            models::Tokens::Discrete(_) => anyhow::bail!("the MAR sampled discrete tokens"),
        }
        if !quiet {
            eprintln!(
                "sampled {}/{count} in {:.1} s",
                parts.iter().map(|p| p.dim(0).unwrap_or(0)).sum::<usize>(),
                started.elapsed().as_secs_f64()
            );
        }
    }
    let tokens = candle_core::Tensor::cat(&parts, 0)?.to_device(&candle_core::Device::Cpu)?;
    let latents = models::mar::unpatchify(&tokens, mc.patch_size)?;
    let label_t = candle_core::Tensor::from_vec(
        labels.iter().map(|&l| l as i64).collect::<Vec<_>>(),
        count,
        &candle_core::Device::Cpu,
    )?;
    let tensors: std::collections::HashMap<String, candle_core::Tensor> = [
        ("tokens".to_string(), tokens.clone()),
        ("latents".to_string(), latents.clone()),
        ("labels".to_string(), label_t),
    ]
    .into_iter()
    .collect();
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        db::files::create_folder(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    harness::import::save_safetensors_atomic(&tensors, &out)?;
    println!(
        "weights: {} ({})",
        file.display(),
        if weights.is_dir() {
            if no_ema {
                "model"
            } else {
                "model_ema"
            }
        } else {
            "file"
        }
    );
    println!(
            "sampled {count} image(s) of classes {:?}: {} MAR steps, cfg {cfg} ({:?}), temperature {temperature}, seed {seed}",
            classes,
            opts.num_iter,
            cfg_schedule
        );
    println!(
        "wrote {}: tokens {:?}, latents {:?}, labels [{count}]",
        out.display(),
        tokens.dims(),
        latents.dims()
    );
    println!("note: images are not decoded (the reference KL-16 VAE is not part of ablate); the official code decodes latents / 0.2325");
    Ok(0)
}
