-- Every SQL statement the relay runs against Postgres. Blocks start with `-- name: <query> --`;
-- relay/sql.py parses them once at import. $1, $2, ... are asyncpg parameters.
-- "Owned buckets" = bucket leases held by this relay ($1) that have not expired: every statement
-- that reads or changes events is fenced by them, so a relay that lost a lease changes nothing.

-- name: claim_batch --
-- The claim, in one statement: the oldest available events of the buckets this relay owns, in
-- sequence order, skipping any event whose key has an earlier event still waiting for a retry or
-- a delayed delivery (per-key order). Only the owner reads a bucket, so no row locks are needed.
-- $3: seqs already in flight in this relay (claimed while the previous batch is published).
-- "w.available_at > w.created_at" always holds for a waiting row (now() >= created_at); it lets
-- the planner use the small partial index of waiting rows instead of one over every row.
SELECT e.seq, e.id, e.topic, e.key, e.payload, e.headers, e.event_type, e.created_at, e.attempts
FROM outbox_events AS e
WHERE e.available_at <= now()
  AND e.bucket = ANY (ARRAY(SELECT l.bucket FROM outbox_bucket_leases AS l
                       WHERE l.owner = $1 AND l.lease_until > now()))
  AND e.seq <> ALL ($3::bigint[])
  AND (e.key IS NULL
       OR NOT e.key = ANY (ARRAY(SELECT DISTINCT w.key FROM outbox_events AS w
                                  WHERE w.available_at > now() AND w.key IS NOT NULL
                                    AND w.available_at > w.created_at))
       OR NOT EXISTS (SELECT 1 FROM outbox_events AS w
                      WHERE w.key = e.key AND w.seq < e.seq AND w.available_at > now()
                        AND w.available_at > w.created_at))
ORDER BY e.seq
LIMIT $2;

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
WITH failed AS (
    SELECT * FROM unnest($2::bigint[], $3::text[], $4::text[]) AS f(seq, error_class, error_message)
), moved AS (
    DELETE FROM outbox_events AS e USING failed AS f
    WHERE e.seq = f.seq
      AND e.bucket = ANY (ARRAY(SELECT l.bucket FROM outbox_bucket_leases AS l
                           WHERE l.owner = $1 AND l.lease_until > now()))
    RETURNING e.*, f.error_class, f.error_message
)
INSERT INTO outbox_dead_letters (event_id, original_seq, topic, key, payload, headers, event_type,
                                 created_at, attempts, first_failed_at, last_failed_at,
                                 error_class, error_message, relay_id)
SELECT id, seq, topic, key, payload, headers, event_type, created_at, attempts + 1,
       coalesce(first_failed_at, now()), now(), error_class, error_message, $1
FROM moved;

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
-- Replay, step 1 (same transaction as step 2): remove the chosen dead letters.
DELETE FROM outbox_dead_letters
WHERE ($1::uuid[] IS NULL OR event_id = ANY ($1::uuid[]))
  AND ($2::text IS NULL OR topic = $2)
RETURNING event_id, topic, key, payload::text AS payload, headers::text AS headers, event_type,
          created_at;

-- name: requeue_events --
-- Replay, step 2: back into the outbox, at the end of the queue, with fresh attempts.
INSERT INTO outbox_events (id, topic, key, bucket, payload, headers, event_type, created_at)
SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::smallint[], $5::jsonb[], $6::jsonb[],
                     $7::text[], $8::timestamptz[]);

-- name: list_dead_letters --
SELECT event_id, topic, key, event_type, attempts, first_failed_at, last_failed_at, error_class,
       error_message, relay_id
FROM outbox_dead_letters
WHERE ($1::text IS NULL OR topic = $1)
ORDER BY last_failed_at DESC
LIMIT $2;
