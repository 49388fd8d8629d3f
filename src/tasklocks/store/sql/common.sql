-- Statements every dialect runs alike (a dialect's own file may name one differently). {t} is the
-- checked table name, {mark} the driver's placeholder, {now} the dialect's clock (its "now").
-- name: select
SELECT version, data FROM {t} WHERE namespace = {mark};
-- name: select_version
SELECT version FROM {t} WHERE namespace = {mark};
-- name: namespaces
SELECT namespace FROM {t};
-- name: probe_table
-- Whether a table of the lock table's name that has no _meta beside it is one (see _base).
SELECT namespace, version, data FROM {t} WHERE 1 = 0;
-- name: commit
COMMIT;
-- name: rollback
ROLLBACK;
-- name: forget_sessions
-- Sessions that expired an hour ago: their entries are free anyway (a missing one is expired).
DELETE FROM {t}_sessions WHERE expires < {now} - 3600;
-- name: renew_session
-- A session renews only while it lives: once expired it stays expired, and its holder knows.
UPDATE {t}_sessions SET expires = {now} + ttl WHERE id = {mark} AND expires > {now};
-- name: session_seen
-- Whether a session row is there, live or not (ServerStore._check_side's probe).
SELECT 1 FROM {t}_sessions WHERE id = {mark};
-- name: forget_session
DELETE FROM {t}_sessions WHERE id = {mark};
-- name: sessions
-- Seconds each live session has left, by the database's clock (the others have expired). A closed
-- range: PostgreSQL's planner takes an open bound on a value it cannot see (the clock) for a
-- third of the table and scans it all, a closed one for a few rows, and uses the index.
SELECT id, expires - {now} FROM {t}_sessions WHERE expires > {now} AND expires < 1e300;
-- name: get_task
SELECT * FROM {t}_tasks WHERE id = {mark};
-- name: insert_task
INSERT INTO {t}_tasks (version{columns}) VALUES (0{values});
-- name: update_task
UPDATE {t}_tasks SET version = version + 1{sets} WHERE id = {mark} AND version = {mark};
-- name: list_tasks
SELECT * FROM {t}_tasks{where} ORDER BY id DESC{limit};
-- name: find_task
-- A task whose insert lost its reply (create_task): {where} names the process that started it
-- and the time it gave.
SELECT id FROM {t}_tasks WHERE {where} ORDER BY id;
