//! PostgreSQL's data page checksums, for a backup that reads relation files itself
//! (`docs/design/file-level-backups.md`): the same check `pg_basebackup` makes on every page
//! it sends when the cluster has data checksums.
//!
//! The checksum (PostgreSQL's `checksum_impl.h`): the page read as 32 lanes of native-endian
//! 32-bit words, each lane folded FNV-1a style from its own seed, two rounds of zeros more,
//! the lanes XORed together, the page's block number in its relation XORed in, and the result
//! reduced to 16 bits as `sum % 65535 + 1` (never 0). The page's own `pd_checksum` counts as
//! zero.

/// PostgreSQL's page size (pgherd supports the default only).
pub const PAGE: usize = 8192;
/// Pages in one 1 GiB segment file of a relation.
pub const PAGES_PER_SEGMENT: u32 = 131_072;

const LANES: usize = 32;
const FNV_PRIME: u32 = 16_777_619;
const SEEDS: [u32; LANES] = [
    0x5B1F36E9, 0xB8525960, 0x02AB50AA, 0x1DE66D2A, 0x79FF467A, 0x9BB9F8A3, 0x217E7CD2, 0x83E13D2C,
    0xF8D4474F, 0xE39EB970, 0x42C6AE16, 0x993216FA, 0x7B093B5D, 0x98DAFF3C, 0xF718902A, 0x0B1C9CDB,
    0xE58F764B, 0x187636BC, 0x5D7B3BB1, 0xE73DE7DE, 0x92BEC979, 0xCCA6C0B2, 0x304A0979, 0x85AA43D4,
    0x783125BB, 0x6CA8EAA2, 0xE407EAC6, 0x4B5CFC3E, 0x9FBF8C76, 0x15CA20BE, 0xF2CA9FD3, 0x959BD756,
];

/// Where the header fields lie in a page.
const PD_CHECKSUM: usize = 8;
const PD_UPPER: usize = 14;

fn mix(sum: u32, value: u32) -> u32 {
    let t = sum ^ value;
    t.wrapping_mul(FNV_PRIME) ^ (t >> 17)
}

/// The checksum PostgreSQL stores in `pd_checksum` for `page`, block `blkno` of its
/// relation (`segment * PAGES_PER_SEGMENT + block in the segment`).
pub fn checksum(page: &[u8; PAGE], blkno: u32) -> u16 {
    let mut sums = SEEDS;
    // Row by row, all 32 lanes at once (as checksum_impl.h lays it out, so the compiler
    // can use vector instructions).
    for (row, bytes) in page.chunks_exact(4 * LANES).enumerate() {
        let mut words = [0u32; LANES];
        for (w, b) in words.iter_mut().zip(bytes.chunks_exact(4)) {
            *w = u32::from_ne_bytes([b[0], b[1], b[2], b[3]]);
        }
        if row == 0 {
            // pd_checksum (bytes 8 and 9, in the third word) counts as zero.
            let mut third = words[PD_CHECKSUM / 4].to_ne_bytes();
            third[0] = 0;
            third[1] = 0;
            words[PD_CHECKSUM / 4] = u32::from_ne_bytes(third);
        }
        for (s, w) in sums.iter_mut().zip(words) {
            *s = mix(*s, w);
        }
    }
    for _ in 0..2 {
        for s in sums.iter_mut() {
            *s = mix(*s, 0);
        }
    }
    let folded = sums.iter().fold(0u32, |acc, s| acc ^ s) ^ blkno;
    (folded % 65_535 + 1) as u16
}

/// What checking one page found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Valid,
    /// Not checked: a new (all-zero header) page, or one written at or after the backup's
    /// start, which WAL replay rewrites (it may be torn in the copy).
    Skipped,
    /// The stored checksum is not the page's.
    Invalid {
        stored: u16,
        computed: u16,
    },
}

/// Checks `page` (block `blkno` of its relation) as `pg_basebackup` does during a backup
/// that started at WAL position `start_lsn`.
pub fn verify(page: &[u8; PAGE], blkno: u32, start_lsn: u64) -> Verdict {
    let u16_at = |at: usize| u16::from_ne_bytes([page[at], page[at + 1]]);
    let u32_at =
        |at: usize| u32::from_ne_bytes([page[at], page[at + 1], page[at + 2], page[at + 3]]);
    if u16_at(PD_UPPER) == 0 {
        return Verdict::Skipped;
    }
    let lsn = (u64::from(u32_at(0)) << 32) | u64::from(u32_at(4));
    if lsn >= start_lsn {
        return Verdict::Skipped;
    }
    let (stored, computed) = (u16_at(PD_CHECKSUM), checksum(page, blkno));
    if stored == computed {
        Verdict::Valid
    } else {
        Verdict::Invalid { stored, computed }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A page that looks used: a header with an LSN, pd_upper set, and some content.
    fn page(lsn: u64) -> [u8; PAGE] {
        let mut p = [0u8; PAGE];
        p[0..4].copy_from_slice(&((lsn >> 32) as u32).to_ne_bytes());
        p[4..8].copy_from_slice(&(lsn as u32).to_ne_bytes());
        p[12..14].copy_from_slice(&40u16.to_ne_bytes());
        p[14..16].copy_from_slice(&8000u16.to_ne_bytes());
        for (i, b) in p[8000..].iter_mut().enumerate() {
            *b = i as u8;
        }
        p
    }

    fn with_checksum(mut p: [u8; PAGE], blkno: u32) -> [u8; PAGE] {
        let c = checksum(&p, blkno);
        p[8..10].copy_from_slice(&c.to_ne_bytes());
        p
    }

    #[test]
    fn the_stored_checksum_does_not_count_and_the_block_number_does() {
        let p = page(0x1_0000_0028);
        let c = checksum(&p, 7);
        assert_ne!(c, 0, "a checksum is never 0");
        let mut other = p;
        other[8..10].copy_from_slice(&0xBEEFu16.to_ne_bytes());
        assert_eq!(checksum(&other, 7), c);
        assert_ne!(checksum(&p, 8), c);
        assert_ne!(checksum(&p, 7 + PAGES_PER_SEGMENT), c);
    }

    #[test]
    fn new_pages_and_pages_written_since_the_start_are_not_checked() {
        let start = 0x2_0000_0000;
        let good = with_checksum(page(start - 1), 3);
        assert_eq!(verify(&good, 3, start), Verdict::Valid);
        // One changed byte anywhere, or the page at another place, is caught.
        for at in [0usize, 20, 4096, PAGE - 1] {
            let mut bad = good;
            bad[at] ^= 0x01;
            assert!(
                matches!(verify(&bad, 3, start), Verdict::Invalid { .. }),
                "a change at byte {at} passed"
            );
        }
        assert!(matches!(verify(&good, 4, start), Verdict::Invalid { .. }));
        // Written at or after the backup's start: replay rewrites it.
        let mut late = page(start);
        late[100] = 1;
        assert_eq!(verify(&late, 3, start), Verdict::Skipped);
        // A new page (pd_upper 0) is all zeros in a valid cluster.
        assert_eq!(verify(&[0u8; PAGE], 3, start), Verdict::Skipped);
    }
}
