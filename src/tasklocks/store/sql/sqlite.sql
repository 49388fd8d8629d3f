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
-- name: commit
COMMIT;
-- name: rollback
ROLLBACK;
-- name: insert_row
INSERT OR IGNORE INTO {t} (namespace, version, data) VALUES (?, 0, ?);
-- name: select
SELECT version, data FROM {t} WHERE namespace = ?;
-- name: select_version
SELECT version FROM {t} WHERE namespace = ?;
-- name: check
SELECT version, data FROM {t} WHERE namespace = ?;
-- name: update
UPDATE {t} SET data = ?, version = version + 1 WHERE namespace = ? AND version = ?;
-- name: update_if
UPDATE {t} SET data = ?, version = version + 1 WHERE namespace = ? AND version = ? AND data = ?;
-- name: namespaces
SELECT namespace FROM {t};
-- name: task_types
text:TEXT, json:TEXT, state:TEXT, float:REAL, int:INTEGER
-- name: create_tasks
CREATE TABLE IF NOT EXISTS {t}_tasks (id INTEGER PRIMARY KEY AUTOINCREMENT,
    version INTEGER NOT NULL, {task_columns});
-- name: create_tasks_index
CREATE INDEX IF NOT EXISTS {t}_tasks_state ON {t}_tasks (state);
-- name: get_task
SELECT * FROM {t}_tasks WHERE id = ?;
-- name: insert_task
INSERT INTO {t}_tasks (version{columns}) VALUES (0{values});
-- name: update_task
UPDATE {t}_tasks SET version = version + 1{sets} WHERE id = ? AND version = ?;
-- name: list_tasks
SELECT * FROM {t}_tasks{where} ORDER BY id DESC{limit};
