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
-- name: now
-- The server's clock, in seconds since 1970 whatever the session's time zone.
(TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', UTC_TIMESTAMP(6)) / 1000000)
-- name: freed
-- A row whose lease its holder released by a marker (name_release_marked): read as no lease at
-- all. The marker is a user-level lock, kept by the releasing connection until a durable batch
-- release (free_marked) writes the row; it is lost with that connection's server session, and
-- the lease is then held again until its process, reconnecting, writes the row in a batch and
-- gives the lease back (design.md, "MariaDB: a release marked by a user lock"). In
-- parentheses: under HIGH_NOT_PRECEDENCE, NOT binds tighter than IS.
(IS_USED_LOCK({marker}) IS NOT NULL)
-- name: marker
-- The name of a lease's marker. LEFT keeps it within MySQL's 64 characters (only a lease shorter
-- than 48 is marked: MySQLStore.fast_release); COALESCE gives a row without a lease a name that
-- no marker has (MySQL refuses a NULL one). The servers compare these names without regard to
-- case: tasklocks' leases are lowercase hex.
CONCAT('tasklocks.free:', LEFT(COALESCE(lease, ''), 48))
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
-- name: create_names
-- A row per lock name (see store/_names.py and postgres.sql). The name is compared as bytes
-- (VARBINARY): a PAD SPACE collation would make "a" and "a " one row. No key beside the primary
-- one: a take or a release sets the lease, and a key over it (as schema 2 first had, `held
-- (namespace, lease)`) costs each of them a delete-marked entry and a new one in that key, and
-- the purge of the old: about a fifth of the server's CPU a pair (design.md, "MariaDB: no key
-- over the held names"). The names of a namespace held in their rows are then found by the
-- primary key's range, in all its rows.
CREATE TABLE IF NOT EXISTS {t}_names (namespace VARCHAR(191) NOT NULL, name VARBINARY(255) NOT NULL,
    version BIGINT NOT NULL, lease VARBINARY(255), record TEXT, mark TINYINT NOT NULL DEFAULT 0,
    PRIMARY KEY (namespace, name))
    ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;
-- name: upgrade_meta
UPDATE {t}_meta SET value = %s WHERE `key` = 'schema_version' AND value = %s;
-- name: name_acquire
-- Take a free name (see postgres.sql; the row statements take named parameters, as there). MySQL reads the row '' into a temporary table first (it
-- is the table written: https://dev.mysql.com/doc/refman/8.0/en/insert-select.html). SET runs left to right: version and record test the lease
-- before it is set. LAST_INSERT_ID(expr) hands the token back in the OK packet (lastrowid): 1 for
-- a new row, the version + 1 for a free one, and 0 when the name was not taken (the SELECT set 1
-- before the row was found; the affected-row count cannot tell, as CLIENT.FOUND_ROWS changes it).
-- Whether the row is free is decided once, into @tasklocks_take (a marker looked at three times
-- could vanish between two looks), which also holds under MariaDB's SIMULTANEOUS_ASSIGNMENT
-- (expressions are still evaluated left to right; only the columns are set at once). MySQL 8
-- warns that setting a variable in an expression is deprecated (1287), and runs it.
INSERT INTO {t}_names (namespace, name, version, lease, record, mark)
SELECT %(ns)s, %(name)s, LAST_INSERT_ID(1), %(lease)s, %(record)s, 0 FROM DUAL
WHERE EXISTS (SELECT 1 FROM {t}_names WHERE namespace = %(ns)s AND name = '' AND mark = 1)
ON DUPLICATE KEY UPDATE
    version = IF(@tasklocks_take := ((lease IS NULL OR {freed}) AND mark = 0),
                 LAST_INSERT_ID(version + 1), version + LAST_INSERT_ID(0)),
    record = IF(@tasklocks_take, VALUES(record), record),
    lease = IF(@tasklocks_take, VALUES(lease), lease);
-- name: name_retake
-- name_acquire of a name whose row this process has seen (rows are never deleted): the row's
-- UPDATE alone, without the insert and its look at the layout row, which cost MariaDB a
-- temporary table each time. It changes nothing if the row is held, kept by the document or
-- (against expectation) gone: the full path decides then.
-- (version is set first: its LAST_INSERT_ID is the token in the OK packet, 0 if nothing changed.)
UPDATE {t}_names SET version = LAST_INSERT_ID(version + 1), lease = %(lease)s,
    record = %(record)s
WHERE namespace = %(ns)s AND name = %(name)s AND (lease IS NULL OR {freed}) AND mark = 0;
-- name: name_release
UPDATE {t}_names SET lease = NULL, record = NULL, version = LAST_INSERT_ID(version)
WHERE namespace = %(ns)s AND name = %(name)s AND lease = %(lease)s AND mark = 0;
-- name: name_release_marked
-- name_release without a durable write: the row keeps the lease and the releasing connection
-- takes the lease's marker (see freed), in an UPDATE that changes nothing (no redo to flush). The
-- insert id is the version if the row was held so and the marker taken, 0 otherwise (the
-- affected rows are 0 either way). The row is written by free_marked later.
UPDATE {t}_names SET version = version
    + 0 * LAST_INSERT_ID(IF(GET_LOCK({marker}, 0) = 1, version, 0))
WHERE namespace = %(ns)s AND name = %(name)s AND lease = %(lease)s AND mark = 0;
-- name: free_marked
-- The rows of marked releases, written free (their markers are no longer needed), those of them
-- a document took over meanwhile, then the markers let go, in one round trip: {rows} is an OR of
-- (namespace, name, lease) tests, {taken} the same of (namespace, name), {leases} a SELECT of
-- each lease marked (a UNION ALL). A row taken since (another lease) is left alone.
UPDATE {t}_names SET lease = NULL, record = NULL WHERE mark = 0 AND ({rows});
SELECT namespace, name FROM {t}_names WHERE mark = 1 AND ({taken});
SELECT COUNT(RELEASE_LOCK({marker})) FROM ({leases}) AS marked;
-- name: select_kept
-- A namespace's document and the names held in their rows, in one statement (one snapshot),
-- then the sessions.
SELECT 0, version, data, NULL, NULL FROM {t} WHERE namespace = %s
UNION ALL SELECT 1, version, name, lease, record FROM {t}_names
    WHERE namespace = %s AND lease IS NOT NULL AND mark = 0 AND NOT {freed}
ORDER BY 1, 3;
SELECT id, expires - {now} FROM {t}_sessions WHERE expires > {now};
-- name: lock_kept
-- The full path of this layout, its first round trip: the document's row, then the names held
-- in their rows ({only}: of some names only), locked, then the sessions. READ COMMITTED: a
-- locking read at REPEATABLE READ would keep every row and gap it reads locked (the namespace's
-- whole range of the primary key, or of the `held` key a table made by an earlier release
-- has), and every name taken in its row in the namespace would wait for this transaction; at
-- READ COMMITTED a row that is not held is let go once read (after waiting, as any locking read
-- does, for a statement that is changing it to commit) (claim_names locks the rows it needs
-- itself).
SET TRANSACTION ISOLATION LEVEL READ COMMITTED; START TRANSACTION; SELECT version, data FROM {t} WHERE namespace = %s FOR UPDATE;
SELECT name, version, lease, record FROM {t}_names
WHERE namespace = %s AND lease IS NOT NULL AND mark = 0 AND NOT {freed}{only}
ORDER BY name FOR UPDATE;
SELECT id, expires - {now} FROM {t}_sessions WHERE expires > {now};
-- name: lock_and_claim
-- lock_kept of the names a change names, and claim_names of them all, in one round trip: the
-- document's row, the names' rows made where missing ({rows}, {names} as in claim_names) and
-- locked, then the sessions.
SET TRANSACTION ISOLATION LEVEL READ COMMITTED; START TRANSACTION; SELECT version, data FROM {t} WHERE namespace = %s FOR UPDATE;
INSERT IGNORE INTO {t}_names (namespace, name, version, mark) VALUES {rows};
SELECT name, version, IF({freed}, NULL, lease), record, mark FROM {t}_names
WHERE namespace = %s AND name IN ({names}) ORDER BY name FOR UPDATE;
SELECT id, expires - {now} FROM {t}_sessions WHERE expires > {now};
-- name: claim_names
-- Names a change brings into the document that were in none of its rows when it locked them
-- (see postgres.sql): {rows} is a (namespace, name, 0, 0) per name, {names} the names again.
INSERT IGNORE INTO {t}_names (namespace, name, version, mark) VALUES {rows};
SELECT name, version, IF({freed}, NULL, lease), record, mark FROM {t}_names
WHERE namespace = %s AND name IN ({names}) ORDER BY name FOR UPDATE;
-- name: set_names_commit
-- {rows}: a (namespace, name, version, mark) per name, quoted by the adapter; then the document,
-- whose version is set (see postgres.sql update_to), and COMMIT.
INSERT INTO {t}_names (namespace, name, version, mark) VALUES {rows}
ON DUPLICATE KEY UPDATE version = GREATEST(version, VALUES(version)), lease = NULL,
    record = NULL, mark = VALUES(mark);
UPDATE {t} SET data = %s, version = %s WHERE namespace = %s AND version = %s; COMMIT;
-- name: update_to_commit
UPDATE {t} SET data = %s, version = %s WHERE namespace = %s AND version = %s; COMMIT;
