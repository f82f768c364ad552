//! Raw redb, the baseline the benchmarks set Concord beside: one-row
//! durable commits, each a 64-byte value under the next key of one table.

use std::path::Path;

const ROWS: redb::TableDefinition<'_, u64, &[u8]> = redb::TableDefinition::new("raw");

/// A redb file taking one-row commits.
pub struct RawRows {
    db: redb::Database,
    next: u64,
}

impl RawRows {
    /// A new redb file at `path`.
    pub fn create(path: &Path) -> Self {
        Self {
            db: redb::Database::create(path).expect("create redb file"),
            next: 0,
        }
    }

    /// One durable commit of one new row, with or without redb's two-phase
    /// commit.
    pub fn commit(&mut self, two_phase: bool) {
        let mut tx = self.db.begin_write().expect("begin");
        tx.set_two_phase_commit(two_phase);
        tx.open_table(ROWS)
            .expect("table")
            .insert(self.next, [7u8; 64].as_slice())
            .expect("insert");
        tx.commit().expect("commit");
        self.next += 1;
    }
}
