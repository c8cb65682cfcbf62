//! Stage 3: sampling images from a trained generator, and the per-class sample grid.
use std::path::Path;

use candle_core::DType;
use models::CfgSchedule;
use models::{Generator, Rng, SampleOptions, Tokens};

use crate::data::{self, ImageSet};
use crate::record::spinner;
use crate::spec::{CfgScheduleSpec, PlannedRun};
use crate::tokenize::{TokenData, Tokenizer};
use crate::Result;

/// Stage 3: `count` images with balanced labels (i mod classes), decoded by the tokenizer.
pub fn sample_images(
    generator: &Generator,
    tok: &Tokenizer,
    run: &PlannedRun,
    classes: usize,
    count: usize,
    quiet: bool,
) -> Result<ImageSet> {
    let s = &run.spec.sample;
    let opts = SampleOptions {
        num_iter: s.mar_steps,
        cfg: s.cfg,
        cfg_schedule: match s.cfg_schedule {
            CfgScheduleSpec::Linear => CfgSchedule::Linear,
            CfgScheduleSpec::Constant => CfgSchedule::Constant,
        },
        temperature: s.temperature,
    };
    let mut rng = Rng::new(run.seed ^ 0x5A3B_1E00);
    let labels: Vec<u32> = (0..count).map(|i| (i % classes) as u32).collect();
    let pb = spinner(
        quiet,
        count as u64,
        format!("sampling {} · {}", run.cell, run.arm.as_str()),
    );
    let mut images = Vec::with_capacity(count * tok.channels * tok.size * tok.size);
    for chunk in labels.chunks(s.batch) {
        let tokens = generator.sample(chunk, &opts, &mut rng)?;
        let data = match tokens {
            Tokens::Discrete(t) => TokenData::Discrete(t.flatten_all()?.to_vec1::<u32>()?),
            Tokens::Continuous(t) => {
                TokenData::Continuous(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
            }
        };
        images.extend(tok.decode(&data, chunk.len())?);
        pb.inc(chunk.len() as u64);
    }
    pb.finish_and_clear();
    Ok(ImageSet {
        images,
        labels,
        n: count,
        channels: tok.channels,
        size: tok.size,
    })
}

/// One row per class, `cols` samples each.
pub fn save_class_grid(path: &Path, set: &ImageSet, classes: usize, cols: usize) -> Result<()> {
    let len = set.image_len();
    let mut picked = Vec::new();
    let mut n = 0;
    for c in 0..classes {
        let of_class: Vec<usize> = (0..set.n)
            .filter(|&i| set.labels[i] as usize == c)
            .take(cols)
            .collect();
        for k in 0..cols {
            match of_class.get(k) {
                Some(&i) => picked.extend_from_slice(&set.images[i * len..(i + 1) * len]),
                None => picked.extend(std::iter::repeat_n(1.0, len)),
            }
            n += 1;
        }
    }
    if let Some(d) = path.parent() {
        db::files::create_folder(d).map_err(crate::Error::file(d))?;
    }
    data::save_grid(path, &picked, n, set.channels, set.size, cols, 3)?;
    Ok(())
}
