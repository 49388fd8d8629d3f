-- The SQLite adapter's statements. {t} is the checked table name.
-- name: journal_wal
PRAGMA journal_mode=WAL;
-- name: synchronous_normal
PRAGMA synchronous=NORMAL;
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
-- name: check
SELECT version, data FROM {t} WHERE namespace = ?;
-- name: update_if
UPDATE {t} SET data = ?, version = version + 1 WHERE namespace = ? AND version = ? AND data = ?;
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
