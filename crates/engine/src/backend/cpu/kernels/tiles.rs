//! The loop arithmetic both packed GEMMs (`avx2::gemm_packed`, `avx512::gemm_packed`)
//! share: how rows are cut into register tiles, and which panel block comes next.

/// How a call's `m` activation rows are cut into register tiles of `mr` rows: whole tiles,
/// then the rest. A remainder of at most half a tile has too few accumulators to hide the
/// multiply-add latency, so it is merged with the last whole tile and the pair is split
/// evenly (m = 32 with mr = 6 runs 6+6+6+6+4+4, not 6+6+6+6+6+2).
#[derive(Clone, Copy, Debug)]
pub(super) struct RowTiles {
    m: usize,
    mr: usize,
    /// Rows in whole tiles of `mr`.
    full: usize,
    /// Rows after them (at most `mr + mr / 2`).
    tail: usize,
}

impl RowTiles {
    pub(super) fn new(m: usize, mr: usize) -> RowTiles {
        let mut full = m - m % mr;
        let mut tail = m - full;
        if tail > 0 && tail < mr / 2 + 1 && full >= mr {
            full -= mr;
            tail += mr;
        }
        RowTiles { m, mr, full, tail }
    }

    /// How many tiles there are.
    pub(super) fn count(&self) -> usize {
        self.full / self.mr
            + if self.tail > self.mr {
                2
            } else {
                usize::from(self.tail > 0)
            }
    }

    /// Rows of the tile that starts at row `i` (never more than `mr`).
    pub(super) fn rows_at(&self, i: usize) -> usize {
        if i + self.mr <= self.full {
            self.mr
        } else if self.m - i == self.tail && self.tail > self.mr {
            self.tail.div_ceil(2)
        } else {
            self.m - i
        }
    }
}

/// The block swept after panel `jp`'s block at `pc` (length `kc`), as (panel, k offset,
/// length), for prefetching while this one is computed: the next panel's block, else the
/// first panel's next block; `None` after the last. `k` and the blocks are in the
/// kernel's own units of `k` (elements or pairs).
pub(super) fn next_block(
    jp: usize,
    (p0, p1): (usize, usize),
    pc: usize,
    kc: usize,
    k: usize,
    kc_block: usize,
) -> Option<(usize, usize, usize)> {
    if jp + 1 < p1 {
        Some((jp + 1, pc, kc))
    } else if pc + kc < k {
        Some((p0, pc + kc, kc_block.min(k - pc - kc)))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_cover_every_row_once_and_merge_short_remainders() {
        for mr in [4, 6, 8] {
            for m in 1..100 {
                let t = RowTiles::new(m, mr);
                let mut sizes = Vec::new();
                let mut i = 0;
                while i < m {
                    let rows = t.rows_at(i);
                    assert!((1..=mr).contains(&rows), "m={m} mr={mr} at {i}: {rows}");
                    sizes.push(rows);
                    i += rows;
                }
                assert_eq!(i, m);
                assert_eq!(sizes.len(), t.count(), "m={m} mr={mr}: {sizes:?}");
                if m > mr {
                    // No tile shorter than half a tile once there is more than one tile.
                    assert!(
                        sizes.iter().all(|&s| s >= mr / 2),
                        "m={m} mr={mr}: {sizes:?}"
                    );
                }
            }
        }
        let t = RowTiles::new(32, 6);
        let sizes: Vec<usize> = std::iter::successors(Some((0, t.rows_at(0))), |&(i, r)| {
            (i + r < 32).then(|| (i + r, t.rows_at(i + r)))
        })
        .map(|(_, r)| r)
        .collect();
        assert_eq!(sizes, [6, 6, 6, 6, 4, 4]);
    }
}
