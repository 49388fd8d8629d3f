-- The PostgreSQL adapter's statements. {t} is the checked table name, unquoted (folded alike).
-- name: create_table
CREATE TABLE IF NOT EXISTS {t} (namespace TEXT PRIMARY KEY, version BIGINT NOT NULL,
    data TEXT NOT NULL);
-- name: create_meta
CREATE TABLE IF NOT EXISTS {t}_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
-- name: insert_meta
INSERT INTO {t}_meta (key, value) VALUES ('schema_version', %s) ON CONFLICT DO NOTHING;
-- name: schema_version
SELECT value FROM {t}_meta WHERE key = 'schema_version';
-- name: insert_row
INSERT INTO {t} (namespace, version, data) VALUES (%s, 0, %s) ON CONFLICT DO NOTHING;
-- name: select_for_update
SELECT version, data FROM {t} WHERE namespace = %s FOR UPDATE;
-- name: check
-- Is the hint still the row? convert_to: hash UTF-8 bytes whatever the encoding, as Python does.
SELECT version, md5(convert_to(data, 'UTF8')) FROM {t} WHERE namespace = %s;
-- name: update_notify
-- One row if the swap happened; pg_notify runs per updated row, and notifies at commit.
WITH u AS (UPDATE {t} SET data = %s, version = version + 1
           WHERE namespace = %s AND version = %s RETURNING version)
SELECT version, pg_notify(%s, %s) FROM u;
-- name: update_if
-- The optimistic swaps also compare the data, so a hand edit that kept the version is noticed.
UPDATE {t} SET data = %s, version = version + 1 WHERE namespace = %s AND version = %s
    AND md5(convert_to(data, 'UTF8')) = %s;
-- name: update_if_notify
WITH u AS (UPDATE {t} SET data = %s, version = version + 1 WHERE namespace = %s
           AND version = %s AND md5(convert_to(data, 'UTF8')) = %s RETURNING version)
SELECT version, pg_notify(%s, %s) FROM u;
-- name: fast_acquire
-- One-statement changes (FastPaths) of a format-3 document, under the row lock of this statement
-- alone. The CTE parses the text once (the LATERAL s) and locks the row only if the change
-- applies to it: a row its WHERE rejects is not locked, so a change that does not apply writes
-- nothing (no WAL, no flush). FOR NO KEY UPDATE rechecks that WHERE on the newest row version
-- (READ COMMITTED), so the UPDATE computes on the row it locked; no condition of the UPDATE may
-- compare t with r. SET sees the row as it was: t.version + 1 is the new version. The lease's
-- record goes into procs, and each name gets [lease, token]. {valid} guards the rest in a CASE,
-- as jsonb_each fails on a non-object.
WITH r AS (SELECT s.d FROM {t} AS t0, LATERAL (SELECT t0.data::jsonb AS d) AS s
           WHERE t0.namespace = %(ns)s AND octet_length(t0.data) <= {fast_max}
               AND jsonb_typeof(%(record)s::jsonb) = 'array'
               AND CASE WHEN {valid} THEN NOT (s.d->'locks' ?| %(names)s::text[]) AND {entries}
                   ELSE false END
           FOR NO KEY UPDATE OF t0)
UPDATE {t} AS t SET version = t.version + 1, data = (r.d || jsonb_build_object(
    'procs', (r.d->'procs') || jsonb_build_object(%(lease)s::text, %(record)s::jsonb),
    'locks', (r.d->'locks') || (SELECT jsonb_object_agg(n, jsonb_build_array(%(lease)s::text,
                                                                             t.version + 1))
                                FROM unnest(%(names)s::text[]) AS n)))::text
FROM r WHERE t.namespace = %(ns)s
RETURNING t.version;
-- name: fast_release
-- A lease compares as jsonb: a missing name gives NULL, which NOT EXISTS counts as a mismatch.
-- The lease's record goes with its last entry. Locks only a row the release applies to, as
-- fast_acquire does.
WITH r AS (SELECT s.d, (s.d->'locks') - %(names)s::text[] AS left
           FROM {t} AS t0, LATERAL (SELECT t0.data::jsonb AS d) AS s
           WHERE t0.namespace = %(ns)s AND octet_length(t0.data) <= {fast_max}
               AND CASE WHEN {valid} THEN NOT EXISTS (
                   SELECT FROM unnest(%(names)s::text[]) AS n
                   WHERE (s.d->'locks'->n->0) IS DISTINCT FROM to_jsonb(%(lease)s::text))
                   AND {entries} ELSE false END
           FOR NO KEY UPDATE OF t0),
u AS (UPDATE {t} AS t SET version = t.version + 1, data = (r.d || jsonb_build_object(
          'procs', CASE WHEN EXISTS (SELECT FROM jsonb_each(r.left) AS e(k, v)
                                     WHERE e.v->0 = to_jsonb(%(lease)s::text))
                   THEN r.d->'procs' ELSE (r.d->'procs') - %(lease)s::text END,
          'locks', r.left))::text
      FROM r WHERE t.namespace = %(ns)s
      RETURNING t.version)
SELECT version, pg_notify(%(channel)s, %(ns)s) FROM u;
-- name: valid
-- Format 3 without a queue (a queue, or a shared name, is the full path's).
(s.d->'format')::text = '3' AND jsonb_typeof(s.d->'locks') = 'object'
    AND jsonb_typeof(s.d->'procs') = 'object' AND coalesce(s.d->'queue', '[]') = '[]'
-- name: entries
-- Every entry is [lease, token] with its lease's record in procs, and every record has the
-- field types _doc.decode wants (a hand-edited bad entry stops the fast paths as it stops the
-- full one); {tests}, one per field of a record, are built of the entry_* fragments. (A record
-- no entry names is harmless: decode ignores it, and the full path's next write drops it.)
NOT EXISTS (SELECT FROM jsonb_each(s.d->'locks') AS e(k, v)
            WHERE NOT coalesce(CASE WHEN jsonb_typeof(e.v) = 'array' THEN
                jsonb_array_length(e.v) = 2 AND jsonb_typeof(e.v->0) = 'string'
                AND jsonb_typeof(e.v->1) = 'number' AND (e.v->1)::text ~ '^-?[0-9]+$'
                AND (s.d->'procs') ? (e.v->>0)
                ELSE false END, false))
AND NOT EXISTS (SELECT FROM jsonb_each(s.d->'procs') AS p(k, v)
            WHERE NOT coalesce(CASE WHEN jsonb_typeof(p.v) = 'array' THEN
                jsonb_array_length(p.v) = 10 AND {tests} ELSE false END, false))
-- name: entry_str
jsonb_typeof(p.v->{i}) = 'string'
-- name: entry_int
jsonb_typeof(p.v->{i}) = 'number' AND (p.v->{i})::text ~ '^-?[0-9]+$'
-- name: entry_num
jsonb_typeof(p.v->{i}) = 'number'
-- name: entry_nullable
(jsonb_typeof(p.v->{i}) = 'null' OR {test})
-- name: prefer_lz4
-- attcompression 'l' is lz4; the column does not exist before PostgreSQL 14.
DO $$ BEGIN
    IF (SELECT attcompression FROM pg_attribute WHERE attrelid = '{t}'::regclass
        AND attname = 'data') <> 'l' THEN
        SET LOCAL lock_timeout = '100ms';
        ALTER TABLE {t} ALTER COLUMN data SET COMPRESSION lz4;
    END IF;
EXCEPTION WHEN OTHERS THEN NULL;
END $$;
-- name: begin
BEGIN;
-- name: ping
SELECT 1;
-- name: now
-- The server's clock (clock_timestamp: the time of the statement's execution, not its start). A
-- scalar subquery, read once per statement (an InitPlan): clock_timestamp() is volatile, and a
-- volatile comparison would be evaluated once per row.
(SELECT extract(epoch FROM clock_timestamp())::float8)
-- name: create_sessions
CREATE TABLE IF NOT EXISTS {t}_sessions (id TEXT PRIMARY KEY, owner TEXT NOT NULL,
    host TEXT NOT NULL, pid BIGINT, ttl DOUBLE PRECISION NOT NULL,
    expires DOUBLE PRECISION NOT NULL);
-- name: index_sessions
-- Reads ask for the live sessions (expires > now), and expired ones stay for an hour: an index,
-- so a read does not scan every session of the last hour. Concurrent creators may collide (the
-- catalog's unique index): whoever loses has the index anyway.
DO $$ BEGIN
    CREATE INDEX IF NOT EXISTS {t}_sessions_expires ON {t}_sessions (expires);
EXCEPTION WHEN OTHERS THEN NULL;
END $$;
-- name: open_session
-- A retry after a lost reply finds it there: nothing to do.
INSERT INTO {t}_sessions (id, owner, host, pid, ttl, expires)
    VALUES (%s, %s, %s, %s, %s, {now} + %s) ON CONFLICT (id) DO NOTHING;
-- name: task_types
text:TEXT, json:TEXT, state:TEXT, float:DOUBLE PRECISION, int:BIGINT
-- name: create_tasks
CREATE TABLE IF NOT EXISTS {t}_tasks (id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    version BIGINT NOT NULL, {task_columns});
-- name: create_tasks_index
CREATE INDEX IF NOT EXISTS {t}_tasks_state ON {t}_tasks (state);
-- name: insert_task
INSERT INTO {t}_tasks (version{columns}) VALUES (0{values}) RETURNING id;
