-- The MySQL / MariaDB adapter's statements. {t} is the checked table name. `key` is reserved.
-- namespace is VARCHAR(191): 191 * 4 bytes of utf8mb4 fit the 767-byte index prefix limit of old
-- row formats; utf8mb4_bin makes namespaces case-sensitive, as on SQLite and PostgreSQL.
-- name: create_table
CREATE TABLE IF NOT EXISTS {t} (namespace VARCHAR(191) NOT NULL PRIMARY KEY,
    version BIGINT NOT NULL, data LONGTEXT NOT NULL)
    ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;
-- name: create_meta
CREATE TABLE IF NOT EXISTS {t}_meta (`key` VARCHAR(64) NOT NULL PRIMARY KEY,
    value VARCHAR(255) NOT NULL) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;
-- name: insert_meta
-- INSERT IGNORE turns some errors into warnings; for a constant row only a duplicate key can be.
INSERT IGNORE INTO {t}_meta (`key`, value) VALUES ('schema_version', %s);
-- name: schema_version
SELECT value FROM {t}_meta WHERE `key` = 'schema_version';
-- name: insert_row
INSERT IGNORE INTO {t} (namespace, version, data) VALUES (%s, 0, %s);
-- name: lock_row
-- The pessimistic path: two round trips of several statements each (CLIENT.MULTI_STATEMENTS).
-- The sessions are read after the row's lock is granted (REPEATABLE READ takes its snapshot at
-- the first plain read): no session an entry of the row names can be missed.
START TRANSACTION; SELECT version, data FROM {t} WHERE namespace = %s FOR UPDATE;
SELECT id, expires - {now} FROM {t}_sessions WHERE expires > {now};
-- name: read_row
SELECT version, data FROM {t} WHERE namespace = %s;
SELECT id, expires - {now} FROM {t}_sessions WHERE expires > {now};
-- name: check
-- Is the hint still the row? MD5 hashes the column's utf8mb4 bytes, which are the UTF-8 bytes
-- Python hashes (https://dev.mysql.com/doc/refman/8.0/en/encryption-functions.html#function_md5).
SELECT version, MD5(data) FROM {t} WHERE namespace = %s;
-- name: update_commit
-- The affected-row count is rows *changed* (no CLIENT.FOUND_ROWS) and version always changes: 1
-- means the swap happened. The adapter quotes the values in itself.
UPDATE {t} SET data = %s, version = version + 1 WHERE namespace = %s AND version = %s; COMMIT;
-- name: update_if
-- The optimistic swap also compares the data, so a hand edit that kept the version is noticed.
UPDATE {t} SET data = %s, version = version + 1
    WHERE namespace = %s AND version = %s AND MD5(data) = %s;
-- name: fast_acquire
-- One-statement changes (FastPaths) of a format-3 document, under the row lock of the UPDATE
-- alone. {sets}: a path and a value per name; {paths}: a path per name; {compact}: JSON_COMPACT
-- on MariaDB. The lease's record goes into procs (its path is checked: the lease is a plain
-- name), and each name gets [lease, token]. SET runs left to right unless MariaDB's
-- SIMULTANEOUS_ASSIGNMENT is set (https://mariadb.com/kb/en/update/): data comes first, so its
-- version + 1 is the new version either way; LAST_INSERT_ID(expr) hands it back in the OK
-- packet (cursor.lastrowid). The record must be an array: a NULL must never reach the NOT NULL
-- data column.
UPDATE {t} SET data = {compact}(JSON_SET(data, %s, JSON_EXTRACT(%s, '$'){sets})),
    version = LAST_INSERT_ID(version + 1)
WHERE namespace = %s AND LENGTH(data) <= {fast_max} AND {valid}
    AND JSON_CONTAINS_PATH(data, 'one'{paths}) = 0 AND {entries}
    AND JSON_TYPE(JSON_EXTRACT(%s, '$')) = 'ARRAY';
-- name: fast_set
, %s, JSON_ARRAY(%s, version + 1)
-- name: fast_release
-- {leases} holds one fast_lease test per name. The lease's record goes with its last entry:
-- the names' removal, and the record's too unless an entry left names the lease.
UPDATE {t} SET data = {compact}(IF(EXISTS(
        SELECT 1 FROM JSON_TABLE(JSON_REMOVE(data{paths}), '$.locks.*'
                                 COLUMNS (l VARCHAR(255) PATH '$[0]')) AS j
        WHERE CAST(j.l AS BINARY) = CAST(%s AS BINARY)),
    JSON_REMOVE(data{paths}), JSON_REMOVE(data{paths}, %s))),
    version = LAST_INSERT_ID(version + 1)
WHERE namespace = %s AND LENGTH(data) <= {fast_max} AND {valid}{leases} AND {entries};
-- name: fast_lease
-- Leases compare as bytes: the column's utf8mb4_bin collation would ignore trailing spaces.
 AND CAST(JSON_UNQUOTE(JSON_EXTRACT(data, %s)) AS BINARY) = CAST(%s AS BINARY)
-- name: valid
-- JSON_VALID first: MariaDB's other JSON functions scan lazily, and may miss trailing garbage.
-- Format 3 without a queue (a queue, or a shared name, is the full path's).
JSON_VALID(data) AND JSON_TYPE(JSON_EXTRACT(data, '$.format')) = 'INTEGER'
    AND JSON_EXTRACT(data, '$.format') = 3 AND JSON_TYPE(JSON_EXTRACT(data, '$.locks')) = 'OBJECT'
    AND JSON_TYPE(JSON_EXTRACT(data, '$.procs')) = 'OBJECT'
    AND COALESCE(JSON_TYPE(JSON_EXTRACT(data, '$.queue')), 'ARRAY') = 'ARRAY'
    AND COALESCE(JSON_LENGTH(data, '$.queue'), 0) = 0
-- name: entries
-- Every entry is [lease, token] with its lease's record in procs, and every record has the
-- field types _doc.decode wants (a hand-edited bad entry stops the fast paths as it stops the
-- full one); {columns} and {tests}, one per field of a record, are built of the entry_*
-- fragments. A JSON column holds the value's JSON text: its first character tells the type.
-- JSON_CONTAINS over the keys of procs compares JSON strings exactly (no path is built of a
-- stored lease); the document is small (fast_max), so entries times records stays small too.
NOT EXISTS (SELECT 1 FROM JSON_TABLE(data, '$.locks.*' COLUMNS (e JSON PATH '$',
                l0 JSON PATH '$[0]', l1 JSON PATH '$[1]')) AS j
            WHERE NOT COALESCE(LEFT(e, 1) = '[' AND JSON_LENGTH(e) = 2 AND LEFT(l0, 1) = '"'
                               AND l1 REGEXP '^-?[0-9]+$'
                               AND JSON_CONTAINS(JSON_KEYS(data, '$.procs'), l0), FALSE))
AND NOT EXISTS (SELECT 1 FROM JSON_TABLE(data, '$.procs.*' COLUMNS (e JSON PATH '$', {columns}))
                AS p WHERE NOT COALESCE(LEFT(e, 1) = '[' AND JSON_LENGTH(e) = 10 AND {tests},
                                        FALSE))
-- name: entry_column
f_{i} JSON PATH '$[{i}]'
-- name: entry_str
LEFT(f_{i}, 1) = '"'
-- name: entry_int
f_{i} REGEXP '^-?[0-9]+$'
-- name: entry_num
f_{i} REGEXP '^-?[0-9]'
-- name: entry_nullable
(f_{i} IS NULL OR CAST(f_{i} AS CHAR) = 'null' OR {test})
-- name: now
-- The server's clock, in seconds since 1970 whatever the session's time zone.
(TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', UTC_TIMESTAMP(6)) / 1000000)
-- name: create_sessions
CREATE TABLE IF NOT EXISTS {t}_sessions (id VARCHAR(64) NOT NULL PRIMARY KEY,
    owner VARCHAR(255) NOT NULL, host VARCHAR(255) NOT NULL, pid BIGINT, ttl DOUBLE NOT NULL,
    expires DOUBLE NOT NULL, KEY {t}_sessions_expires (expires))
    ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;
-- name: index_sessions
-- For a sessions table made before the index (see postgres.sql). MariaDB only: MySQL has no
-- IF NOT EXISTS here, and there the index comes with new tables.
CREATE INDEX IF NOT EXISTS {t}_sessions_expires ON {t}_sessions (expires);
-- name: open_session
INSERT IGNORE INTO {t}_sessions (id, owner, host, pid, ttl, expires)
    VALUES (%s, %s, %s, %s, %s, {now} + %s);
-- name: task_types
text:LONGTEXT, json:LONGTEXT, state:VARCHAR(32), float:DOUBLE, int:BIGINT
-- name: create_tasks
-- AUTO_INCREMENT ids are not reused while no row is deleted (tasks never are), across restarts.
CREATE TABLE IF NOT EXISTS {t}_tasks (id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
    version BIGINT NOT NULL, {task_columns}, INDEX {t}_tasks_state (state))
    ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;
