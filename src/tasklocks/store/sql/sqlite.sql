-- The SQLite adapter's statements. {t} is the checked table name.
-- name: page_size
-- Of a new file only (a no-op once the file has its first table). A change writes each page it
-- touches whole into the WAL, and checksums it: a name's row and its entry in the held-names
-- index are two pages, and at 1 KB instead of 4 a pair of one-statement changes costs about 4 us
-- less (bench section 1). Large documents simply take more overflow pages.
PRAGMA page_size=1024;
-- name: journal_wal
PRAGMA journal_mode=WAL;
-- name: synchronous_normal
PRAGMA synchronous=NORMAL;
-- name: journal_size_limit
-- Once a checkpoint lets the WAL start over, the file is cut back to this size (4 MiB), instead
-- of keeping the largest size it ever reached. It starts over only at a moment when no reader is
-- in it: under a steady load of many processes that moment may not come until the load eases
-- (32 processes grew it to 300 MB in 6 s), and without this the file then kept those 300 MB.
PRAGMA journal_size_limit=4194304;
-- name: wal_restart
-- Copy the WAL into the database and wait for the readers still in it, so that the next change
-- starts the file over (and journal_size_limit cuts it back): see SQLiteStore._bound_wal; under
-- a steady load the WAL never starts over by itself. (TRUNCATE, which empties the file at once,
-- kept every change waiting longer: p99.9 40-46 ms against 30-34 under 32 processes.)
PRAGMA wal_checkpoint(RESTART);
-- name: busy_timeout_checkpoint
-- How long the checkpoint of _bound_wal waits for the readers still in the WAL (ms)...
PRAGMA busy_timeout=20;
-- name: busy_timeout_off
-- ...and after it, as tasklocks opens every connection: no waiting SQLite's way (see _retry).
PRAGMA busy_timeout=0;
-- name: create_table
CREATE TABLE IF NOT EXISTS {t} (namespace TEXT PRIMARY KEY, version INTEGER NOT NULL,
    data TEXT NOT NULL);
-- name: create_meta
CREATE TABLE IF NOT EXISTS {t}_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
-- name: insert_meta
INSERT OR IGNORE INTO {t}_meta (key, value) VALUES ('schema_version', ?);
-- name: schema_version
SELECT value FROM {t}_meta WHERE key = 'schema_version';
-- name: begin_immediate
BEGIN IMMEDIATE;
-- name: insert_row
INSERT OR IGNORE INTO {t} (namespace, version, data) VALUES (?, 0, ?);
-- name: now
-- The host's boot clock (seconds since boot, read from /proc/uptime by the adapter: no process's
-- faked or stepped wall clock can move it); sessions of an earlier boot are forgotten. A scalar
-- subquery, so that a statement reads it once, not once per row.
(SELECT tasklocks_now())
-- name: create_sessions
CREATE TABLE IF NOT EXISTS {t}_sessions (id TEXT PRIMARY KEY, owner TEXT NOT NULL,
    host TEXT NOT NULL, pid INTEGER, ttl REAL NOT NULL, expires REAL NOT NULL, boot TEXT);
-- name: index_sessions
-- Reads ask for the live sessions; expired ones stay for an hour (see postgres.sql).
CREATE INDEX IF NOT EXISTS {t}_sessions_expires ON {t}_sessions (expires);
-- name: forget_sessions
DELETE FROM {t}_sessions WHERE expires < {now} - 3600 OR boot IS NOT tasklocks_boot();
-- name: open_session
INSERT OR IGNORE INTO {t}_sessions (id, owner, host, pid, ttl, expires, boot)
    VALUES (?, ?, ?, ?, ?, {now} + ?, tasklocks_boot());
-- name: task_types
text:TEXT, json:TEXT, state:TEXT, float:REAL, int:INTEGER
-- name: create_tasks
CREATE TABLE IF NOT EXISTS {t}_tasks (id INTEGER PRIMARY KEY AUTOINCREMENT,
    version INTEGER NOT NULL, {task_columns});
-- name: create_tasks_index
CREATE INDEX IF NOT EXISTS {t}_tasks_state ON {t}_tasks (state);
-- name: create_names
-- A row per lock name (see store/_names.py and postgres.sql).
CREATE TABLE IF NOT EXISTS {t}_names (namespace TEXT NOT NULL, name TEXT NOT NULL,
    version INTEGER NOT NULL, lease TEXT, record TEXT, mark INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (namespace, name));
-- name: index_names
CREATE INDEX IF NOT EXISTS {t}_names_held ON {t}_names (namespace) WHERE lease IS NOT NULL;
-- name: upgrade_meta
UPDATE {t}_meta SET value = ? WHERE key = 'schema_version' AND value = ?;
-- name: name_acquire
-- Take a free name (see postgres.sql): one statement, its own transaction. The token comes back
-- through tasklocks_token(v), which hands v to the adapter and returns it (as MySQL's
-- LAST_INSERT_ID(expr)); the adapter reads it only when the statement changed a row. Not
-- RETURNING: SQLite gathers RETURNING rows in a temporary table, whose page cache (about 84 KB)
-- is allocated and freed on every statement, which doubled the statement's cost where the
-- allocator gave that memory back to the kernel each time.
INSERT INTO {t}_names AS n (namespace, name, version, lease, record, mark)
SELECT :ns, :name, tasklocks_token(1), :lease, :record, 0
WHERE EXISTS (SELECT 1 FROM {t}_names WHERE namespace = :ns AND name = '' AND mark)
ON CONFLICT (namespace, name) DO UPDATE SET version = tasklocks_token(n.version + 1),
    lease = excluded.lease, record = excluded.record WHERE n.lease IS NULL AND NOT n.mark;
-- name: name_retake
-- name_acquire of a name whose row this process has seen (rows are never deleted): the row's
-- UPDATE alone, without the insert and its look at the layout row, which cost MariaDB a
-- temporary table each time. It changes nothing if the row is held, kept by the document or
-- (against expectation) gone: the full path decides then.
UPDATE {t}_names SET version = tasklocks_token(version + 1), lease = :lease, record = :record
WHERE namespace = :ns AND name = :name AND lease IS NULL AND NOT mark;
-- name: name_release
UPDATE {t}_names SET lease = NULL, record = NULL, version = tasklocks_token(version)
WHERE namespace = :ns AND name = :name AND lease = :lease AND NOT mark;
-- name: select_kept
SELECT 0, version, data, NULL, NULL FROM {t} WHERE namespace = :ns
UNION ALL SELECT 1, version, name, lease, record FROM {t}_names
    WHERE namespace = :ns AND lease IS NOT NULL AND NOT mark
ORDER BY 1, 3;
-- name: lock_held_names
-- Inside BEGIN IMMEDIATE: the database's write lock is the lock of every row. {only}: of some
-- names only (a placeholder each), or nothing.
SELECT name, version, lease, record FROM {t}_names
WHERE namespace = ? AND lease IS NOT NULL AND NOT mark{only} ORDER BY name;
-- name: claimed_names
-- {names}: a placeholder per name. Inside BEGIN IMMEDIATE: read, not locked (see postgres.sql).
SELECT name, version, lease, record, mark FROM {t}_names
WHERE namespace = ? AND name IN ({names});
-- name: set_names
INSERT INTO {t}_names AS n (namespace, name, version, mark) VALUES (?, ?, ?, ?)
ON CONFLICT (namespace, name) DO UPDATE SET version = max(n.version, excluded.version),
    lease = NULL, record = NULL, mark = excluded.mark;
-- name: update_to
UPDATE {t} SET data = ?, version = ? WHERE namespace = ? AND version = ?;
