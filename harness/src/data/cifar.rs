//! CIFAR-10, binary version: `data_batch_1.bin` … `data_batch_5.bin` and `test_batch.bin`, each
//! record one label byte followed by 3×32×32 bytes (R, G, B planes).
use std::path::{Path, PathBuf};

use super::{DataError, Raw};

const SIDE: usize = 32;
const RECORD: usize = 1 + 3 * SIDE * SIDE;

/// The folder holding the batches: `dir` itself or its `cifar-10-batches-bin` subfolder.
fn batches_dir(dir: &Path) -> Option<PathBuf> {
    [dir.to_path_buf(), dir.join("cifar-10-batches-bin")]
        .into_iter()
        .find(|d| d.join("test_batch.bin").is_file() || d.join("data_batch_1.bin").is_file())
}

pub fn load(dir: &Path) -> Result<(Raw, Raw), DataError> {
    let d = batches_dir(dir).ok_or_else(|| DataError::Missing {
        path: dir.join("data_batch_1.bin").display().to_string(),
        what: "the CIFAR-10 binary batches (data_batch_1.bin … data_batch_5.bin, test_batch.bin)"
            .into(),
    })?;
    let train: Vec<PathBuf> = (1..=5)
        .map(|i| d.join(format!("data_batch_{i}.bin")))
        .collect();
    let train = read_batches(&train)?;
    let test = read_batches(&[d.join("test_batch.bin")])?;
    Ok((train, test))
}

pub fn read_batches(files: &[PathBuf]) -> Result<Raw, DataError> {
    let mut pixels = Vec::new();
    let mut labels = Vec::new();
    for f in files {
        let bytes = std::fs::read(f).map_err(|e| DataError::io(f, e))?;
        if bytes.is_empty() || bytes.len() % RECORD != 0 {
            return Err(DataError::Truncated {
                path: f.display().to_string(),
                message: format!(
                    "{} bytes is not a whole number of {RECORD}-byte records (1 label + 3×32×32 pixels); \
                     the last record is cut after {} bytes",
                    bytes.len(),
                    bytes.len() % RECORD
                ),
            });
        }
        for (i, rec) in bytes.chunks_exact(RECORD).enumerate() {
            if rec[0] > 9 {
                return Err(DataError::Decode {
                    path: f.display().to_string(),
                    message: format!("record {i} has label {}, expected 0..=9", rec[0]),
                });
            }
            labels.push(rec[0] as u32);
            pixels.extend_from_slice(&rec[1..]);
        }
    }
    Ok(Raw {
        n: labels.len(),
        pixels,
        labels,
        channels: 3,
        height: SIDE,
        width: SIDE,
        source: files
            .first()
            .map(|f| f.display().to_string())
            .unwrap_or_default(),
    })
}
