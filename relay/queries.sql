-- Every SQL statement the relay runs against Postgres. Blocks start with `-- name: <query> --`;
-- relay/sql.py parses them once at import. $1, $2, ... are asyncpg parameters.
-- "Owned buckets" = bucket leases held by this relay ($1) that have not expired: every statement
-- that reads or changes events is fenced by them, so a relay that lost a lease changes nothing.

-- name: claim_batch --
-- The claim, in one statement: the oldest available events of the buckets this relay owns, in
-- sequence order, skipping any event whose key has an earlier event still waiting for a retry or
-- a delayed delivery (per-key order, relay/ordering.py). Only the owner reads a bucket, so no row
-- locks are needed. $3: seqs already in flight in this relay (claimed while the previous batch is
-- published). `held_behind` is set for an event of a quarantined key: the id of the poison
-- event it must be parked behind.
-- At most $2 events, and at most $4 bytes of payload (the first event always): `upto` sums the
-- payloads' stored sizes, and a compressed (toasted) payload counts 4 times its stored size,
-- so the relay's memory follows bytes, not only the event count, without Postgres having to
-- decompress payloads that will not be sent.
-- Cost: an index scan of the primary key in seq order. Each of the two per-key checks is an
-- InitPlan run once per claim ("is any row waiting / any key held at all?") and, only when that
-- is true, one probe per row into a small partial index of the waiting rows / held keys; so
-- the claim does not slow down with the number of waiting rows or quarantined keys.
-- "w.available_at > w.created_at" always holds for a waiting row (now() >= created_at); it
-- matches the partial indexes' predicate.
SELECT c.seq, c.id, c.topic, c.key, c.payload, c.headers, c.event_type, c.created_at,
       c.attempts, c.held_behind, c.upto
FROM (
    SELECT e.seq, e.id, e.topic, e.key, e.payload, e.headers, e.event_type, e.created_at,
           e.attempts,
           CASE WHEN e.key IS NOT NULL
                     AND (SELECT EXISTS (SELECT 1 FROM outbox_dead_letters WHERE holds_key))
                THEN (SELECT coalesce(q.held_behind, q.event_id) FROM outbox_dead_letters AS q
                      WHERE q.key = e.key AND q.holds_key
                      ORDER BY q.original_seq LIMIT 1)
           END AS held_behind,
           pg_column_size(e.payload)
             * CASE WHEN pg_column_compression(e.payload) IS NULL THEN 1 ELSE 4 END AS size,
           sum(pg_column_size(e.payload)
               * CASE WHEN pg_column_compression(e.payload) IS NULL THEN 1 ELSE 4 END)
             OVER (ORDER BY e.seq ROWS UNBOUNDED PRECEDING) AS upto
    FROM outbox_events AS e
    WHERE e.available_at <= now()
      AND e.bucket = ANY (ARRAY(SELECT l.bucket FROM outbox_bucket_leases AS l
                           WHERE l.owner = $1 AND l.lease_until > now()))
      AND e.seq <> ALL ($3::bigint[])
      AND (e.key IS NULL
           OR NOT (SELECT EXISTS (SELECT 1 FROM outbox_events AS w
                                  WHERE w.available_at > now() AND w.available_at > w.created_at))
           OR NOT EXISTS (SELECT 1 FROM outbox_events AS w
                          WHERE w.key = e.key AND w.seq < e.seq
                            AND w.available_at > w.created_at AND w.available_at > now()))
    ORDER BY e.seq
    LIMIT $2
) AS c
WHERE c.upto - c.size < $4
ORDER BY c.seq;

-- name: delete_delivered --
DELETE FROM outbox_events
WHERE seq = ANY ($2::bigint[])
  AND bucket = ANY (ARRAY(SELECT l.bucket FROM outbox_bucket_leases AS l
                     WHERE l.owner = $1 AND l.lease_until > now()));

-- name: schedule_retries --
UPDATE outbox_events AS e
SET attempts = e.attempts + 1,
    available_at = now() + make_interval(secs => r.delay),
    first_failed_at = coalesce(e.first_failed_at, now()),
    last_error = r.error
FROM unnest($2::bigint[], $3::float8[], $4::text[]) AS r(seq, delay, error)
WHERE e.seq = r.seq
  AND e.bucket = ANY (ARRAY(SELECT l.bucket FROM outbox_bucket_leases AS l
                       WHERE l.owner = $1 AND l.lease_until > now()));

-- name: move_to_dead_letters --
-- Delete-returning into insert: a row is in exactly one of the two tables at any time.
-- A parked event ($6 set) moves only while its key is still held: when a replay lifted the
-- quarantine meanwhile, FOR SHARE waits for the replay to commit, finds no held row, and the
-- event stays pending (it is then published after the replayed chain, in seq order).
-- A parked event made no attempt, so its attempts are not counted up.
WITH failed AS (
    SELECT * FROM unnest($2::bigint[], $3::text[], $4::text[], $5::bool[], $6::uuid[])
        AS f(seq, error_class, error_message, holds_key, held_behind)
), moved AS (
    DELETE FROM outbox_events AS e USING failed AS f
    WHERE e.seq = f.seq
      AND e.bucket = ANY (ARRAY(SELECT l.bucket FROM outbox_bucket_leases AS l
                           WHERE l.owner = $1 AND l.lease_until > now()))
      AND (f.held_behind IS NULL
           OR EXISTS (SELECT 1 FROM outbox_dead_letters AS q
                      WHERE q.key = e.key AND q.holds_key FOR SHARE))
    RETURNING e.*, f.error_class, f.error_message, f.holds_key AS holds,
              f.held_behind AS behind
)
INSERT INTO outbox_dead_letters (event_id, original_seq, topic, key, payload, headers, event_type,
                                 created_at, attempts, first_failed_at, last_failed_at,
                                 error_class, error_message, relay_id, holds_key, held_behind)
SELECT id, seq, topic, key, payload, headers, event_type, created_at,
       attempts + CASE WHEN behind IS NULL THEN 1 ELSE 0 END,
       coalesce(first_failed_at, now()), now(), error_class, error_message, $1, holds, behind
FROM moved;

-- name: backlog --
-- For the gauges, every few seconds: pending rows, counted exactly up to 1,000 (an index-only
-- scan of the primary key) and above that Postgres's running estimate (pg_stat's n_live_tup,
-- which follows inserts and deletes within seconds); and the age of the oldest pending event,
-- the first one in seq order (one index probe); the buckets no live relay holds; and the
-- age of the oldest snapshot that holds back the cleanup of deleted rows.
SELECT CASE WHEN counted < 1000 THEN counted
            ELSE greatest(counted, (SELECT n_live_tup FROM pg_stat_user_tables
                                    WHERE relid = 'outbox_events'::regclass)) END AS pending,
       extract(epoch FROM now() - (SELECT created_at FROM outbox_events
                                   ORDER BY seq LIMIT 1))::float8 AS oldest_age,
       (SELECT count(*) FROM outbox_bucket_leases
        WHERE owner IS NULL OR lease_until <= now())::int AS unowned_buckets,
       -- The oldest open transaction of this database that holds a snapshot (or a prepared
       -- one): while it lives, Postgres may not clean up the rows the relay deletes.
       extract(epoch FROM now() - least(
           (SELECT min(xact_start) FROM pg_stat_activity
            WHERE datname = current_database() AND pid <> pg_backend_pid()
              AND (backend_xmin IS NOT NULL OR backend_xid IS NOT NULL)),
           (SELECT min(prepared) FROM pg_prepared_xacts
            WHERE database = current_database())))::float8 AS oldest_snapshot_age
FROM (SELECT count(*) AS counted FROM (SELECT 1 FROM outbox_events LIMIT 1000) AS head) AS c;

-- name: heartbeat --
INSERT INTO outbox_relays (relay_id, hostname, pid) VALUES ($1, $2, $3)
ON CONFLICT (relay_id) DO UPDATE SET heartbeat_at = now();

-- name: renew_leases --
UPDATE outbox_bucket_leases SET lease_until = now() + make_interval(secs => $2)
WHERE owner = $1
RETURNING bucket;

-- name: live_relays --
SELECT relay_id FROM outbox_relays
WHERE heartbeat_at > now() - make_interval(secs => $1)
ORDER BY relay_id;

-- name: acquire_buckets --
-- Free or expired buckets, taken without waiting on a relay that is taking them too.
UPDATE outbox_bucket_leases SET owner = $1, lease_until = now() + make_interval(secs => $3)
WHERE bucket IN (SELECT bucket FROM outbox_bucket_leases
                 WHERE owner IS NULL OR lease_until <= now()
                 ORDER BY bucket LIMIT $2
                 FOR UPDATE SKIP LOCKED)
RETURNING bucket;

-- name: release_buckets --
UPDATE outbox_bucket_leases SET owner = NULL, lease_until = NULL
WHERE owner = $1 AND bucket = ANY ($2::smallint[]);

-- name: release_all --
UPDATE outbox_bucket_leases SET owner = NULL, lease_until = NULL WHERE owner = $1;

-- name: deregister --
DELETE FROM outbox_relays WHERE relay_id = $1;

-- name: forget_dead_relays --
DELETE FROM outbox_relays WHERE heartbeat_at < now() - interval '1 day';

-- name: take_dead_letters --
-- Replay, step 1 (same transaction as step 2): remove the chosen dead letters ($1 ids, $2 topic,
-- $3 key; NULL matches all) and, with every chosen one that holds its key, the whole chain of
-- that key, so that a chain goes back whole. Removing the held rows lifts the quarantine.
WITH chosen AS (
    SELECT dead_letter_id, key, holds_key FROM outbox_dead_letters
    WHERE ($1::uuid[] IS NULL OR event_id = ANY ($1::uuid[]))
      AND ($2::text IS NULL OR topic = $2)
      AND ($3::text IS NULL OR key = $3)
)
DELETE FROM outbox_dead_letters AS d
WHERE d.dead_letter_id IN (SELECT dead_letter_id FROM chosen)
   OR (d.holds_key AND d.key IN (SELECT key FROM chosen WHERE holds_key))
RETURNING event_id, original_seq, topic, key, payload::text AS payload, headers::text AS headers,
          event_type, created_at;

-- name: requeue_events --
-- Replay, step 2: back into the outbox with their original id and seq, so that a chain keeps its
-- place before later events of its key, and consumers that compare seqs per key stay right.
INSERT INTO outbox_events (seq, id, topic, key, bucket, payload, headers, event_type, created_at)
SELECT * FROM unnest($1::bigint[], $2::uuid[], $3::text[], $4::text[], $5::smallint[],
                     $6::jsonb[], $7::jsonb[], $8::text[], $9::timestamptz[]);

-- name: chain_tails --
-- Replay refuses an id in the middle of a quarantine chain: these are the chosen ids ($1) that
-- hold their key behind an earlier dead letter of the key (the head), with that head.
SELECT d.event_id, d.key, h.event_id AS head
FROM outbox_dead_letters AS d
CROSS JOIN LATERAL (SELECT q.event_id FROM outbox_dead_letters AS q
                    WHERE q.key = d.key AND q.holds_key
                    ORDER BY q.original_seq LIMIT 1) AS h
WHERE d.event_id = ANY ($1::uuid[]) AND d.holds_key AND h.event_id <> d.event_id;

-- name: discard_dead_letters --
-- Drop dead letters for good ($1 ids or $2 key). Dropping a key's held rows lifts its quarantine.
DELETE FROM outbox_dead_letters
WHERE ($1::uuid[] IS NOT NULL AND event_id = ANY ($1::uuid[])) OR ($2::text IS NOT NULL AND key = $2)
RETURNING event_id;

-- name: list_dead_letters --
-- Newest first; with a key ($2), the key's dead letters in their original order (its chain).
SELECT event_id, original_seq, topic, key, event_type, attempts, last_failed_at, error_class,
       error_message, holds_key, held_behind
FROM outbox_dead_letters
WHERE ($1::text IS NULL OR topic = $1)
  AND ($2::text IS NULL OR key = $2)
ORDER BY CASE WHEN $2::text IS NULL THEN last_failed_at END DESC, original_seq
LIMIT $3;
