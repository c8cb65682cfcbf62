//! MNIST in the IDX format (LeCun et al.): `*-images-idx3-ubyte` (magic 0x803, u8 N×rows×cols)
//! and `*-labels-idx1-ubyte` (magic 0x801, u8 N), each raw or gzip-compressed.
use std::path::{Path, PathBuf};

use super::{read_maybe_gzip, DataError, Raw};

const IMAGES_MAGIC: u32 = 0x0000_0803;
const LABELS_MAGIC: u32 = 0x0000_0801;

/// The splits found in an MNIST folder: the original `train-*`/`t10k-*` pairs, or one
/// `images-idx3-ubyte`/`labels-idx1-ubyte` pair that the caller splits itself.
pub enum Found {
    TrainTest { train: Raw, test: Raw },
    Single(Raw),
}

/// First existing file among `stem` variants (`stem`, `stem.gz`, with `-idx` or `.idx`).
fn find(dir: &Path, stems: &[&str]) -> Option<PathBuf> {
    stems
        .iter()
        .flat_map(|s| {
            [
                s.to_string(),
                format!("{s}.gz"),
                s.replacen("-idx", ".idx", 1),
            ]
        })
        .flat_map(|s| [s.clone(), format!("{s}.gz")])
        .map(|s| dir.join(s))
        .find(|p| p.is_file())
}

pub fn load(dir: &Path) -> Result<Found, DataError> {
    if !dir.is_dir() {
        return Err(DataError::Missing {
            path: dir.display().to_string(),
            what: "an MNIST folder with IDX files (train-images-idx3-ubyte[.gz] and \
                   t10k-images-idx3-ubyte[.gz], or images-idx3-ubyte[.gz]), each with its labels file"
                .into(),
        });
    }
    let pair = |images: &str, labels: &str| -> Result<Option<Raw>, DataError> {
        let Some(ip) = find(dir, &[images]) else {
            return Ok(None);
        };
        let lp = find(dir, &[labels]).ok_or_else(|| DataError::Missing {
            path: dir.join(labels).display().to_string(),
            what: format!("the labels file that goes with {}", ip.display()),
        })?;
        Ok(Some(read_pair(&ip, &lp)?))
    };
    let train = pair("train-images-idx3-ubyte", "train-labels-idx1-ubyte")?;
    let test = pair("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")?;
    match (train, test) {
        (Some(train), Some(test)) => {
            if (train.height, train.width) != (test.height, test.width) {
                return Err(DataError::SizeMismatch {
                    path: dir.display().to_string(),
                    message: format!(
                        "training images are {}×{} but test images are {}×{}",
                        train.height, train.width, test.height, test.width
                    ),
                });
            }
            Ok(Found::TrainTest { train, test })
        }
        (Some(_), None) | (None, Some(_)) => Err(DataError::Missing {
            path: dir.display().to_string(),
            what: "both train-* and t10k-* IDX files (found only one of the pairs)".into(),
        }),
        (None, None) => match pair("images-idx3-ubyte", "labels-idx1-ubyte")? {
            Some(all) => Ok(Found::Single(all)),
            None => Err(DataError::Missing {
                path: dir.join("train-images-idx3-ubyte").display().to_string(),
                what: "IDX image files (train-images-idx3-ubyte[.gz] and \
                       t10k-images-idx3-ubyte[.gz], or images-idx3-ubyte[.gz])"
                    .into(),
            }),
        },
    }
}

fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Reads one images file and its labels file; checks magic numbers, lengths and counts.
pub fn read_pair(images: &Path, labels: &Path) -> Result<Raw, DataError> {
    let ib = read_maybe_gzip(images)?;
    let lb = read_maybe_gzip(labels)?;
    let header = |b: &[u8], path: &Path, len: usize, magic: u32| -> Result<(), DataError> {
        if b.len() < len {
            return Err(DataError::Truncated {
                path: path.display().to_string(),
                message: format!("{} bytes, shorter than the {len}-byte IDX header", b.len()),
            });
        }
        let found = be_u32(b, 0);
        if found != magic {
            return Err(DataError::BadMagic {
                path: path.display().to_string(),
                expected: format!("{magic:#010x}"),
                found: format!("{found:#010x}"),
            });
        }
        Ok(())
    };
    header(&ib, images, 16, IMAGES_MAGIC)?;
    header(&lb, labels, 8, LABELS_MAGIC)?;
    let (n, rows, cols) = (
        be_u32(&ib, 4) as usize,
        be_u32(&ib, 8) as usize,
        be_u32(&ib, 12) as usize,
    );
    // a header's counts multiply past any file size (and past usize: a wrapped product once
    // passed this check and panicked on the slice below)
    let expected = n
        .checked_mul(rows)
        .and_then(|v| v.checked_mul(cols))
        .and_then(|v| v.checked_add(16))
        .unwrap_or(usize::MAX);
    if ib.len() < expected {
        return Err(DataError::Truncated {
            path: images.display().to_string(),
            message: format!(
                "header says {n} images of {rows}×{cols} (at least {expected} bytes), file has {} \
                 bytes",
                ib.len()
            ),
        });
    }
    let nl = be_u32(&lb, 4) as usize;
    if lb.len() < 8 + nl {
        return Err(DataError::Truncated {
            path: labels.display().to_string(),
            message: format!(
                "header says {nl} labels ({} bytes), file has {} bytes",
                8 + nl,
                lb.len()
            ),
        });
    }
    if nl != n {
        return Err(DataError::SizeMismatch {
            path: labels.display().to_string(),
            message: format!("{nl} labels for {n} images in {}", images.display()),
        });
    }
    Ok(Raw {
        pixels: ib[16..expected].to_vec(),
        labels: lb[8..8 + n].iter().map(|&l| l as u32).collect(),
        n,
        channels: 1,
        height: rows,
        width: cols,
        source: images.display().to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts whose product wraps past 2^64 (2 × 4042815511 × 2281422937 = 2^64 − 2) are a short
    /// file, not a panic.
    #[test]
    fn header_counts_that_overflow_are_a_truncated_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (images, labels) = (dir.path().join("i"), dir.path().join("l"));
        let mut ib = Vec::new();
        for v in [IMAGES_MAGIC, 2, 4_042_815_511, 2_281_422_937] {
            ib.extend_from_slice(&v.to_be_bytes());
        }
        std::fs::write(&images, &ib).expect("images");
        let mut lb = Vec::new();
        for v in [LABELS_MAGIC, 2] {
            lb.extend_from_slice(&v.to_be_bytes());
        }
        lb.extend_from_slice(&[0, 1]);
        std::fs::write(&labels, &lb).expect("labels");
        match read_pair(&images, &labels) {
            Err(e) => assert!(matches!(e, DataError::Truncated { .. }), "{e}"),
            Ok(_) => panic!("16 bytes read as 2 huge images"),
        }
    }
}
