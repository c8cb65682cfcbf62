#![cfg_attr(not(feature = "cuda"), allow(dead_code))]
//! Launch geometry of the CUDA kernels in kernels.cu: how many blocks of how many threads each
//! kind of kernel runs with. Plain numbers, outside the `cuda` feature, so that cuda.rs launches
//! with them and the tests that run the kernels on the CPU (crate `cuda-emu`) use the same.

/// Threads per block of the element-wise kernels (grid-stride loops).
const ELEMENTWISE_THREADS: u32 = 256;
/// The widest row that one warp takes (kernels.cu's `WARP_ROW_COLS`), and the rows of a block then.
pub(super) const WARP_ROW_COLS: usize = 1024;
const WARP_ROWS_PER_BLOCK: usize = 8;
/// Most threads per block of the wider rows' kernels (one block per row; kernels.cu allows 1024).
const ROW_THREADS: usize = 256;
/// Column sums: the fewest rows one block sums, and the most blocks (chunks) down the rows.
const MIN_ROWS_PER_CHUNK: usize = 64;
const MAX_CHUNKS: usize = 1024;
/// Threads per block of the column-sum kernels: 32 columns × 8 rows (`COL_SUM_ROWS_PER_STEP`).
const COL_SUM_BLOCK: (u32, u32, u32) = (32, 8, 1);
/// CUDA's limit on a grid's second dimension.
const MAX_GRID_Y: usize = 65535;

/// `kernel<<<grid, block>>>`: blocks in the grid, threads in a block, (x, y, z) each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Geometry {
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
}

/// Grid-stride launch over `n` > 0 values.
pub(super) fn elementwise_cfg(n: usize) -> Geometry {
    let blocks = n.div_ceil(ELEMENTWISE_THREADS as usize).min(1 << 20) as u32;
    Geometry {
        grid: (blocks, 1, 1),
        block: (ELEMENTWISE_THREADS, 1, 1),
    }
}

/// The row-wise kernels (layer norm, softmax): rows of at most `WARP_ROW_COLS` values one warp
/// per row, `WARP_ROWS_PER_BLOCK` rows per block; wider rows one block per row, as many threads
/// as the row has values (a multiple of 32, at most 256). kernels.cu's `ROW_KERNEL` picks the same
/// way from the row's width.
pub(super) fn row_cfg(rows: usize, cols: usize) -> Geometry {
    if cols <= WARP_ROW_COLS {
        return Geometry {
            grid: (rows.div_ceil(WARP_ROWS_PER_BLOCK) as u32, 1, 1),
            block: (32 * WARP_ROWS_PER_BLOCK as u32, 1, 1),
        };
    }
    let threads = cols.next_power_of_two().clamp(32, ROW_THREADS) as u32;
    Geometry {
        grid: (rows as u32, 1, 1),
        block: (threads, 1, 1),
    }
}

/// How column sums split `rows` rows: (rows per chunk, chunks).
pub(super) fn col_sum_chunks(rows: usize) -> (usize, usize) {
    let per = rows.div_ceil(MAX_CHUNKS).max(MIN_ROWS_PER_CHUNK);
    (per, rows.div_ceil(per))
}

/// Grid of a `*_partial` column-sum kernel: 32 columns × one chunk of rows per block.
pub(super) fn col_sum_cfg(cols: usize, chunks: usize) -> Geometry {
    Geometry {
        grid: (cols.div_ceil(32) as u32, chunks as u32, 1),
        block: COL_SUM_BLOCK,
    }
}

/// Grid of `scatter_rows_sum`: 32 columns × a source row per block, rows past the grid's limit
/// taken by a grid-stride loop.
pub(super) fn scatter_rows_cfg(rows: usize, cols: usize) -> Geometry {
    Geometry {
        grid: (cols.div_ceil(32) as u32, rows.min(MAX_GRID_Y) as u32, 1),
        block: COL_SUM_BLOCK,
    }
}

/// Grid of `sum_squares_pieces`: a block of 256 threads (a power of two) per piece, up to 4096
/// blocks taking the pieces in turn.
pub(super) fn sum_squares_cfg(pieces: usize) -> Geometry {
    Geometry {
        grid: (pieces.clamp(1, 4096) as u32, 1, 1),
        block: (256, 1, 1),
    }
}
