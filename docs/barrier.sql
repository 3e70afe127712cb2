-- The transaction barrier table of tempomq's SDK (tempomq.client.Barrier), for a migration tool.
-- Barrier(engine).create_table() creates the same. Create it in the database your transactional
-- producer writes to; the name is Barrier(engine, table=...)'s (this is the default).
--
-- One row per transaction: 'commit' written inside your local transaction, or 'rollback' written
-- by a check-back that found no 'commit'. The primary key decides which came first.
-- Rows may be deleted once the coordinator stops asking about them, e.g. daily:
--   DELETE FROM tempomq_tx_barrier WHERE created_at < NOW() - INTERVAL 7 DAY;      -- MySQL
--   DELETE FROM tempomq_tx_barrier WHERE created_at < datetime('now', '-7 days');  -- SQLite

-- MySQL / MariaDB (InnoDB: the check-back's insert waits on the row lock of an open insert)
CREATE TABLE IF NOT EXISTS tempomq_tx_barrier (
    tx_id      VARCHAR(64) NOT NULL PRIMARY KEY,
    outcome    VARCHAR(16) NOT NULL,
    created_at DATETIME    NOT NULL DEFAULT CURRENT_TIMESTAMP
) ENGINE=InnoDB;

-- SQLite (the check-back's insert waits on the database write lock)
CREATE TABLE IF NOT EXISTS tempomq_tx_barrier (
    tx_id      VARCHAR(64) NOT NULL PRIMARY KEY,
    outcome    VARCHAR(16) NOT NULL,
    created_at DATETIME    NOT NULL DEFAULT CURRENT_TIMESTAMP
);
