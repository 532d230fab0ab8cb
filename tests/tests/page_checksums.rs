//! pgherd's port of PostgreSQL's data page checksum (`backup::pagecheck`) against pages a
//! real PostgreSQL wrote: every used page of a table, its index and a system catalog carries
//! the checksum the port computes, and a page changed by one byte, or read as another
//! block, does not.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use pgherd_agent::backup::pagecheck::{self, Verdict, PAGE};
use pgherd_tests::{sql_batch, sql_value, Cluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_port_of_the_page_checksum_matches_every_page_postgresql_wrote() -> Result<()> {
    let cluster = Cluster::builder().members(1).configure().await?;
    cluster
        .start_with_leader("node1", Duration::from_secs(120))
        .await?;
    let leader = cluster.member("node1");
    // pgherd's initdb always enables data checksums.
    let on: String = sql_value(leader, "SHOW data_checksums").await?;
    ensure!(on == "on", "data_checksums is {on}");
    sql_batch(
        leader,
        "CREATE TABLE t (id int PRIMARY KEY, v text);
         INSERT INTO t SELECT g, repeat(md5(g::text), 3) FROM generate_series(1, 20000) g;
         UPDATE t SET v = 'changed' WHERE id % 7 = 0;
         CHECKPOINT;",
    )
    .await?;
    // The checkpoint wrote every page; nothing writes them since.
    let start_lsn = u64::MAX;
    let mut checked = 0;
    for relation in ["t", "t_pkey", "pg_class"] {
        let path: String = sql_value(
            leader,
            &format!("SELECT pg_relation_filepath('{relation}')"),
        )
        .await?;
        let file = leader.data_dir().join(&path);
        let bytes =
            std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
        ensure!(
            bytes.len() % PAGE == 0 && !bytes.is_empty(),
            "{relation}: {} is {} bytes",
            file.display(),
            bytes.len()
        );
        for (blkno, chunk) in bytes.chunks_exact(PAGE).enumerate() {
            let page: &[u8; PAGE] = chunk.try_into()?;
            let blkno = blkno as u32;
            match pagecheck::verify(page, blkno, start_lsn) {
                Verdict::Valid => checked += 1,
                Verdict::Skipped => continue,
                Verdict::Invalid { stored, computed } => {
                    // Read again once, as pg_basebackup does: the background writer may
                    // have been writing that very page (autovacuum's hint bits).
                    let again = std::fs::read(&file)?;
                    let fresh: &[u8; PAGE] = again[blkno as usize * PAGE..][..PAGE].try_into()?;
                    ensure!(
                        pagecheck::verify(fresh, blkno, start_lsn) == Verdict::Valid,
                        "{relation} block {blkno}: PostgreSQL stored {stored:#06x}, the port computes {computed:#06x}"
                    );
                    checked += 1;
                }
            }
            // The same page changed by one byte, or taken for another block, is refused.
            let mut changed = *page;
            changed[PAGE / 2] ^= 0x40;
            ensure!(
                matches!(
                    pagecheck::verify(&changed, blkno, start_lsn),
                    Verdict::Invalid { .. }
                ),
                "{relation} block {blkno} changed by one byte passed"
            );
            ensure!(
                matches!(
                    pagecheck::verify(page, blkno + 1, start_lsn),
                    Verdict::Invalid { .. }
                ),
                "{relation} block {blkno} passed as block {}",
                blkno + 1
            );
        }
    }
    ensure!(checked > 200, "only {checked} pages were checked");
    Ok(())
}
