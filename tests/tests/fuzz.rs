//! Mutation fuzzing of the readers that take user files: the spec TOML, IDX image/label pairs,
//! CIFAR-10 batches, images of an image folder, FID statistics (.npz), weights (.safetensors and
//! .pth, as the Inception loader reads them) and reference checkpoints (`ablate import`'s .pth).
//! Inputs are seeds from `tests/fuzz/READER/` with random byte edits (flip, insert, delete,
//! duplicate a span, an extreme 32-bit value); every input must come back as Ok or an error,
//! never a panic. `ABLATE_FUZZ_SECS` sets the time per reader (2 s by default, so the suite stays
//! short; the session note records longer runs). A panicking input is written to
//! `target/fuzz-failures/` for a regression test.
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};

fn budget() -> Duration {
    let secs = std::env::var("ABLATE_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2.0);
    Duration::from_secs_f64(secs)
}

fn seeds(reader: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = ablate_tests::workspace_root()
        .join("tests/fuzz")
        .join(reader);
    let mut out: Vec<_> = std::fs::read_dir(&dir)
        .expect("corpus folder")
        .map(|e| {
            let p = e.expect("entry").path();
            let bytes = std::fs::read(&p).expect("seed");
            (p, bytes)
        })
        .collect();
    out.sort();
    out
}

/// One random edit of `b`.
fn mutate(rng: &mut impl Rng, b: &mut Vec<u8>) {
    let at = |rng: &mut dyn rand::RngCore, len: usize| {
        if len == 0 {
            0
        } else {
            rng.random_range(0..len)
        }
    };
    match rng.random_range(0..6) {
        0 if !b.is_empty() => {
            let i = at(rng, b.len());
            b[i] ^= 1 << rng.random_range(0..8);
        }
        1 => {
            let i = at(rng, b.len() + 1);
            b.insert(i.min(b.len()), rng.random());
        }
        2 if !b.is_empty() => {
            let i = at(rng, b.len());
            b.remove(i);
        }
        3 if b.len() > 1 => {
            let i = at(rng, b.len());
            let j = (i + rng.random_range(1..16)).min(b.len());
            let span = b[i..j].to_vec();
            b.splice(i..i, span);
        }
        4 if b.len() >= 4 => {
            let i = at(rng, b.len() - 3);
            let v: u32 = [0, 1, u32::MAX, u32::MAX / 2, 1 << 31][rng.random_range(0..5)];
            b[i..i + 4].copy_from_slice(&v.to_be_bytes());
        }
        _ => {
            let i = at(rng, b.len() + 1);
            let text = [
                b"[" as &[u8],
                b"]",
                b"=",
                b"\"",
                b"\n",
                b"{",
                b"1e999",
                b"-1",
                b"[[x]]",
            ];
            let t = text[rng.random_range(0..text.len())];
            b.splice(i.min(b.len())..i.min(b.len()), t.iter().copied());
        }
    }
}

/// Feed mutated inputs to `read` for the time budget; returns how many ran.
fn fuzz(reader: &str, read: impl Fn(&[Vec<u8>], &Path)) -> u64 {
    let seeds = seeds(reader);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5EED);
    let started = Instant::now();
    let mut runs = 0u64;
    while started.elapsed() < budget() || runs == 0 {
        // every seed file of the reader, each mutated 1–8 times
        let inputs: Vec<Vec<u8>> = seeds
            .iter()
            .map(|(_, b)| {
                let mut b = b.clone();
                for _ in 0..rng.random_range(1..=8) {
                    mutate(&mut rng, &mut b);
                }
                b
            })
            .collect();
        let ok = std::panic::catch_unwind(AssertUnwindSafe(|| read(&inputs, dir.path())));
        if ok.is_err() {
            let out = ablate_tests::workspace_root()
                .join("target/fuzz-failures")
                .join(reader);
            std::fs::create_dir_all(&out).expect("failures folder");
            for ((p, _), b) in seeds.iter().zip(&inputs) {
                let name = p.file_name().expect("name");
                std::fs::write(out.join(name), b).expect("write failure");
            }
            panic!(
                "{reader}: input {runs} panicked; written to {}",
                out.display()
            );
        }
        runs += 1;
    }
    eprintln!(
        "{reader}: {runs} inputs in {:.0?}, no panic",
        started.elapsed()
    );
    runs
}

#[test]
fn spec_reader_never_panics() {
    let runs = fuzz("spec", |inputs, _| {
        for b in inputs {
            let text = String::from_utf8_lossy(b);
            let _ = harness::spec::load_str("fuzz.toml", &text, &[]);
        }
    });
    assert!(runs > 0);
}

#[test]
fn idx_reader_never_panics() {
    let runs = fuzz("idx", |inputs, dir| {
        let (images, labels) = (dir.join("images"), dir.join("labels"));
        std::fs::write(&images, &inputs[0]).expect("images");
        std::fs::write(&labels, &inputs[1]).expect("labels");
        let _ = harness::data::idx::read_pair(&images, &labels);
    });
    assert!(runs > 0);
}

#[test]
fn cifar_reader_never_panics() {
    let runs = fuzz("cifar", |inputs, dir| {
        let path = dir.join("data_batch_1.bin");
        std::fs::write(&path, &inputs[0]).expect("batch");
        let _ = harness::data::cifar::read_batches(&[path]);
    });
    assert!(runs > 0);
}

#[test]
fn image_folder_decoder_never_panics() {
    let runs = fuzz("images", |inputs, dir| {
        let files: Vec<(PathBuf, u32)> = inputs
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let p = dir.join(format!("{i}.png"));
                std::fs::write(&p, b).expect("image");
                (p, 0)
            })
            .collect();
        let _ = harness::data::folder::decode(&files, 8);
    });
    assert!(runs > 0);
}

#[test]
fn fid_statistics_reader_never_panics() {
    let runs = fuzz("npz", |inputs, dir| {
        let path = dir.join("stats.npz");
        std::fs::write(&path, &inputs[0]).expect("npz");
        let _ = harness::eval::inception::read_stats(&path);
    });
    assert!(runs > 0);
}

#[test]
fn safetensors_weights_reader_never_panics() {
    let runs = fuzz("safetensors", |inputs, dir| {
        let path = dir.join("weights.safetensors");
        std::fs::write(&path, &inputs[0]).expect("weights");
        let _ = harness::eval::inception::load_inception(&path, &candle_core::Device::Cpu);
    });
    assert!(runs > 0);
}

#[test]
fn pth_readers_never_panic() {
    let runs = fuzz("pth", |inputs, dir| {
        let path = dir.join("weights.pth");
        std::fs::write(&path, &inputs[0]).expect("pth");
        let _ = harness::eval::inception::load_inception(&path, &candle_core::Device::Cpu);
        if let Ok(c) = harness::import::PthCheckpoint::open(&path) {
            let _ = c.tensors("model");
        }
    });
    assert!(runs > 0);
}
