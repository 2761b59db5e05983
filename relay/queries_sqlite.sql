-- Every SQL statement the relay runs against SQLite (the embedded mode: one relay, one file).
-- Blocks start with `-- name: <query> --`, as in queries.sql; relay/sql.py parses them once.
-- A statement that PostgreSQL runs too has its name in queries.sql; SQLite's own are named
-- `sqlite_*`. Parameters are sqlite3's: `:name` in the store's statements; `?N` in the dlq_*
-- statements, standing for queries.sql's `$N`. SQLite has no arrays: a list is bound as a
-- JSON array and read with json_each(). Times are naive UTC text (relay/stores/sqlite.py), ids
-- 32 hex digits, booleans 0/1, as SQLAlchemy writes them. A block of several statements runs
-- them in order in one transaction (relay/admin.py); its result is the first one's rows.

-- name: claim_batch --
-- As Postgres's claim_batch (the rule: relay/ordering.py), without leases (this relay owns
-- every bucket): the oldest available events in seq order, skipping any event whose key has an
-- earlier event waiting for a retry or a delayed delivery; `held_behind` names the poison event
-- an event of a quarantined key is parked behind.
SELECT e.seq, e.id, e.topic, e.key, e.payload, e.headers, e.event_type, e.created_at, e.attempts,
       CASE WHEN e.key IS NOT NULL
                 AND EXISTS (SELECT 1 FROM outbox_dead_letters WHERE holds_key)
            THEN (SELECT coalesce(q.held_behind, q.event_id) FROM outbox_dead_letters AS q
                  WHERE q.key = e.key AND q.holds_key
                  ORDER BY q.original_seq LIMIT 1)
       END AS held_behind
FROM outbox_events AS e
WHERE e.available_at <= :now
  AND (e.key IS NULL
       OR NOT EXISTS (SELECT 1 FROM outbox_events AS w
                      WHERE w.available_at > :now AND w.available_at > w.created_at
                        AND w.attempts >= 0)
       OR NOT EXISTS (SELECT 1 FROM outbox_events AS w
                      WHERE w.key = e.key AND w.seq < e.seq
                        AND w.available_at > w.created_at AND w.available_at > :now))
ORDER BY e.seq
LIMIT :limit;

-- name: delete_delivered --
-- One row (run once per seq with executemany).
DELETE FROM outbox_events WHERE seq = :seq;

-- name: schedule_retries --
UPDATE outbox_events
SET attempts = attempts + 1,
    available_at = :available_at,
    first_failed_at = coalesce(first_failed_at, :now),
    last_error = :error
WHERE seq = :seq;

-- name: move_to_dead_letters --
-- Step 1 of a move; when it copied the row, the store deletes it (delete_delivered) in the
-- same transaction. The max() keeps the CHECK first_failed_at <= last_failed_at true even if
-- the clock stepped back. A parked event (:held_behind set) moves only while its key is still
-- held, and made no attempt (as in Postgres's move_to_dead_letters).
INSERT INTO outbox_dead_letters (event_id, original_seq, topic, key, payload, headers, event_type,
                                 created_at, attempts, first_failed_at, last_failed_at,
                                 error_class, error_message, relay_id, holds_key, held_behind)
SELECT id, seq, topic, key, payload, headers, event_type, created_at,
       attempts + (:held_behind IS NULL),
       coalesce(first_failed_at, :now), max(:now, coalesce(first_failed_at, :now)),
       :error_class, :error_message, :relay_id, :holds_key, :held_behind
FROM outbox_events AS e
WHERE seq = :seq
  AND (:held_behind IS NULL
       OR EXISTS (SELECT 1 FROM outbox_dead_letters AS q WHERE q.key = e.key AND q.holds_key));

-- name: backlog --
SELECT count(*), (SELECT created_at FROM outbox_events ORDER BY seq LIMIT 1) FROM outbox_events;

-- name: sqlite_tables --
-- Whether `outbox-relay migrate` ran: both tables the relay needs are there.
SELECT count(*) FROM sqlite_master
WHERE type = 'table' AND name IN ('outbox_events', 'outbox_dead_letters');

-- name: sqlite_enable_wal --
-- Readers never wait for the writer, nor it for them. Persistent: set once, for every
-- connection to the file (the application's too).
PRAGMA journal_mode = WAL;

-- The dlq_* family: `outbox-relay dlq` (relay/admin.py), as in queries.sql.

-- name: dlq_chosen --
-- ?1 event ids (a JSON array, any of them), ?2 topic, ?3 key, ?4 event type, ?5 error class,
-- ?6 since / ?7 until: the time it was dead-lettered (last_failed_at), since inclusive.
SELECT * FROM outbox_dead_letters
WHERE (?1 IS NULL OR event_id IN (SELECT value FROM json_each(?1)))
  AND (?2 IS NULL OR topic = ?2)
  AND (?3 IS NULL OR key = ?3)
  AND (?4 IS NULL OR event_type = ?4)
  AND (?5 IS NULL OR error_class = ?5)
  AND (?6 IS NULL OR last_failed_at >= ?6)
  AND (?7 IS NULL OR last_failed_at < ?7);

-- name: dlq_list --
-- At most ?8, newest first; with a key (?3), the key's dead letters in their original order.
SELECT dead_letter_id, event_id, original_seq, topic, key, event_type, error_class,
       error_message, attempts, created_at, first_failed_at, last_failed_at, relay_id,
       holds_key, held_behind
FROM chosen
ORDER BY CASE WHEN ?3 IS NULL THEN last_failed_at END DESC, original_seq
LIMIT ?8;

-- name: dlq_show --
-- As dlq_list, with the headers and the payload, in original order (?8 NULL: all).
SELECT dead_letter_id, event_id, original_seq, topic, key, event_type, error_class,
       error_message, attempts, created_at, first_failed_at, last_failed_at, relay_id,
       holds_key, held_behind, headers, payload
FROM chosen
ORDER BY original_seq, dead_letter_id
LIMIT coalesce(?8, -1);

-- name: dlq_summary --
-- Per topic and error class, over the first ?8 chosen in dead-letter order (NULL: all).
SELECT c.topic, c.error_class, count(*) AS dead, sum(c.holds_key) AS held,
       min(c.last_failed_at) AS oldest, max(c.last_failed_at) AS newest
FROM (SELECT topic, error_class, holds_key, last_failed_at FROM chosen
      ORDER BY CASE WHEN ?8 IS NOT NULL THEN dead_letter_id END
      LIMIT coalesce(?8, -1)) AS c
GROUP BY c.topic, c.error_class
ORDER BY dead DESC, c.topic, c.error_class;

-- name: dlq_orphans --
-- The keys whose quarantine chain the selection (the first ?8 chosen) enters without its head,
-- the held row of lowest seq. With min(), SQLite takes the bare column `event_id` from the row
-- of the minimum: the first chosen event of the key, and the head.
SELECT c.key, c.first_event AS event_id, h.event_id AS head, count(*) OVER () AS keys
FROM (SELECT p.key, min(p.original_seq) AS first_seq, p.event_id AS first_event
      FROM (SELECT key, original_seq, event_id, holds_key FROM chosen
            ORDER BY CASE WHEN ?8 IS NOT NULL THEN dead_letter_id END
            LIMIT coalesce(?8, -1)) AS p
      WHERE p.holds_key
      GROUP BY p.key) AS c
JOIN (SELECT q.key, min(q.original_seq) AS first_seq, q.event_id FROM outbox_dead_letters AS q
      WHERE q.holds_key
      GROUP BY q.key) AS h ON h.key = c.key
WHERE h.first_seq < c.first_seq
ORDER BY c.key
LIMIT 1;

-- name: dlq_pick --
-- One batch of replay: the next ?9 chosen after dead_letter_id ?8, in dead-letter order.
SELECT dead_letter_id, event_id, key, holds_key
FROM chosen
WHERE dead_letter_id > ?8
ORDER BY dead_letter_id
LIMIT ?9;

-- name: dlq_purge --
-- One batch of purge, as dlq_pick: delete them for good.
DELETE FROM outbox_dead_letters
WHERE dead_letter_id IN (SELECT dead_letter_id FROM chosen
                         WHERE dead_letter_id > ?8
                         ORDER BY dead_letter_id
                         LIMIT ?9)
RETURNING dead_letter_id;

-- name: dlq_requeue --
-- One batch of replay, three statements in one transaction: count, copy back, delete. The
-- picked dead letters (?1, a JSON array of ids) and the whole chain of each key they hold
-- (?2, a JSON array of keys) go back into outbox_events with their original id and seq;
-- removing the held rows lifts the quarantine. The bucket trigger sets their bucket.
SELECT count(*) AS replayed, count(DISTINCT CASE WHEN holds_key THEN key END) AS released
FROM outbox_dead_letters
WHERE dead_letter_id IN (SELECT value FROM json_each(?1))
   OR (holds_key AND key IN (SELECT value FROM json_each(?2)));
INSERT INTO outbox_events (seq, id, topic, key, payload, headers, event_type, created_at)
SELECT original_seq, event_id, topic, key, payload, headers, event_type, created_at
FROM outbox_dead_letters
WHERE dead_letter_id IN (SELECT value FROM json_each(?1))
   OR (holds_key AND key IN (SELECT value FROM json_each(?2)));
DELETE FROM outbox_dead_letters
WHERE dead_letter_id IN (SELECT value FROM json_each(?1))
   OR (holds_key AND key IN (SELECT value FROM json_each(?2)));
