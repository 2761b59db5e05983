-- Every SQL statement the relay runs against Postgres. Blocks start with `-- name: <query> --`;
-- relay/sql.py parses them once at import. $1, $2, ... are asyncpg parameters.
-- "Owned buckets" = bucket leases held by this relay ($1) that have not expired: every statement
-- that reads or changes events is fenced by them, so a relay that lost a lease changes nothing.

-- name: claim_batch --
-- The claim, in one statement: the oldest available events of the buckets this relay owns, in
-- sequence order, skipping any event whose key has an earlier event still waiting for a retry or
-- a delayed delivery (per-key order, relay/ordering.py). Only the owner reads a bucket, so no row
-- locks are needed. $3: seqs already in flight in this relay (claimed while the previous batch is
-- published), left out through a hashed subplan: `seq <> ALL($3)` compared every row walked with
-- every seq in a generic plan, a cost that grew with the batch size squared. `held_behind` is
-- set for an event of a quarantined key: the id of the poison event it must be parked behind.
-- At most $2 events, and at most $4 bytes of payload (the first event always): `upto` sums the
-- payloads' stored sizes, and a compressed (toasted) payload counts 4 times its stored size,
-- so the relay's memory follows bytes, not only the event count, without Postgres having to
-- decompress payloads that will not be sent.
-- Cost: an index scan of the primary key in seq order. Each of the two per-key checks is an
-- InitPlan run once per claim ("is any row waiting / any key held at all?", one probe of
-- ix_outbox_events_waiting_at / the quarantine index) and, only when that is true, one probe
-- per row into a small partial index of the waiting rows / held keys; so the claim does not
-- slow down with the number of waiting rows (due or not) or quarantined keys.
-- "w.available_at > w.created_at" always holds for a waiting row (now() >= created_at); it
-- matches the partial indexes' predicate ("w.attempts >= 0", always true, that of
-- ix_outbox_events_waiting_at: see migration 0009).
-- $5, the floor: the relay knows that no event of its buckets with a lower seq is left to
-- claim (relay/floor.py), so the scan starts there instead of walking the rows deleted since
-- the oldest open transaction began. Waiting rows (retries, delays, replayed dead letters) are
-- the exception: the floor drops below the lowest of them (one probe of
-- ix_outbox_events_waiting_seq), in the same snapshot as the claim.
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
      AND e.seq > least($5::bigint, (SELECT min(f.seq) - 1 FROM outbox_events AS f
                                     WHERE f.available_at > f.created_at))
      AND e.bucket = ANY (ARRAY(SELECT l.bucket FROM outbox_bucket_leases AS l
                           WHERE l.owner = $1 AND l.lease_until > now()))
      AND e.seq NOT IN (SELECT unnest($3::bigint[]))
      AND (e.key IS NULL
           OR NOT (SELECT EXISTS (SELECT 1 FROM outbox_events AS w
                                  WHERE w.available_at > now() AND w.available_at > w.created_at
                                    AND w.attempts >= 0))
           OR NOT EXISTS (SELECT 1 FROM outbox_events AS w
                          WHERE w.key = e.key AND w.seq < e.seq
                            AND w.available_at > w.created_at AND w.available_at > now()))
    ORDER BY e.seq
    LIMIT $2
) AS c
WHERE c.upto - c.size < $4
ORDER BY c.seq;

-- name: schema_revision --
-- The outbox migrations' revision (their own Alembic version table), once at start.
SELECT version_num FROM outbox_alembic_version;

-- name: horizon_last_seq --
-- The last seq handed out (migration 0006's SECURITY DEFINER function: no sequence grant).
SELECT outbox_last_seq();

-- name: horizon_writers --
-- The transactions holding a lock to write outbox_events: an INSERT takes it before it draws
-- its seq, so a transaction drew a seq up to a given `outbox_last_seq()` only if it was among
-- these right after (relay/floor.py).
SELECT coalesce(array_agg(virtualtransaction), '{}') AS writers
FROM pg_locks
WHERE locktype = 'relation' AND relation = 'outbox_events'::regclass
  AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND mode = 'RowExclusiveLock' AND granted;

-- name: delete_delivered --
DELETE FROM outbox_events
WHERE seq = ANY ($2::bigint[])
  AND bucket = ANY (ARRAY(SELECT l.bucket FROM outbox_bucket_leases AS l
                     WHERE l.owner = $1 AND l.lease_until > now()));

-- name: move_delivered --
-- delete_delivered with `history = on`: the same delete, and in the same statement the rows
-- go into outbox_delivered, so a row is in exactly one of the two tables at any time.
-- $3, $4, $5: where the broker stored each event of $2 (Kafka partition and offset, Redis
-- entry id), index for index; shorter arrays (none known) leave NULL. The seqs are unique,
-- so the join finds one position per moved row (a hash of at most a batch).
WITH moved AS (
    DELETE FROM outbox_events
    WHERE seq = ANY ($2::bigint[])
      AND bucket = ANY (ARRAY(SELECT l.bucket FROM outbox_bucket_leases AS l
                         WHERE l.owner = $1 AND l.lease_until > now()))
    RETURNING seq, id, topic, key, event_type, payload, headers, created_at, attempts
)
INSERT INTO outbox_delivered (event_id, seq, topic, key, event_type, payload, headers,
                              created_at, relay_id, attempts, broker_partition, broker_offset,
                              broker_entry_id)
SELECT m.id, m.seq, m.topic, m.key, m.event_type, m.payload, m.headers, m.created_at, $1,
       m.attempts + 1, p.part, p.off, p.entry
FROM moved AS m
LEFT JOIN unnest($2::bigint[], $3::int[], $4::bigint[], $5::text[]) AS p(seq, part, off, entry)
       ON p.seq = m.seq;

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

-- The `prune_*` family: retention, run by one relay at a time (the one holding the session
-- advisory lock `prune_lock` on its own connection, released when it closes), one short
-- statement per batch.

-- name: prune_lock --
SELECT pg_try_advisory_lock(hashtext('outbox-relay prune'));

-- name: prune_history --
-- One batch: of the next $2 history rows after delivered_id $3 (a walk of the primary key,
-- oldest first), delete those delivered more than $1 seconds ago. Returns how many went, and
-- where the next batch starts: after the head's last row, or before its first row that is
-- still too young (`young`; then this round is over). Resuming there, a walk never rescans
-- the rows it deleted (dead until vacuumed). Row locks only, on rows nobody else writes,
-- held until the commit right after `took`: the statement's own time, read last.
WITH head AS (
    SELECT delivered_id AS id, delivered_at < now() - make_interval(secs => $1) AS old
    FROM outbox_delivered
    WHERE delivered_id > $3
    ORDER BY delivered_id
    LIMIT $2
), gone AS (
    DELETE FROM outbox_delivered
    WHERE delivered_id = ANY (ARRAY(SELECT id FROM head WHERE old))
    RETURNING 1
)
SELECT (SELECT count(*) FROM gone) AS deleted, (SELECT count(*) FROM head) AS walked,
       (SELECT max(id) FROM head) AS last, (SELECT min(id) FROM head WHERE NOT old) AS young,
       extract(epoch FROM clock_timestamp() - statement_timestamp())::float8 AS took;

-- name: prune_dead_letters --
-- As prune_history, for dead letters whose last failure is older than $1 seconds. A dead
-- letter that holds its key (a quarantine chain) is kept and walked past: deleting it would
-- release the key's later events out of order; replay or purge the chain.
WITH head AS (
    SELECT dead_letter_id AS id, last_failed_at < now() - make_interval(secs => $1) AS old,
           holds_key
    FROM outbox_dead_letters
    WHERE dead_letter_id > $3
    ORDER BY dead_letter_id
    LIMIT $2
), gone AS (
    DELETE FROM outbox_dead_letters
    WHERE dead_letter_id = ANY (ARRAY(SELECT id FROM head WHERE old AND NOT holds_key))
    RETURNING 1
)
SELECT (SELECT count(*) FROM gone) AS deleted, (SELECT count(*) FROM head) AS walked,
       (SELECT max(id) FROM head) AS last, (SELECT min(id) FROM head WHERE NOT old) AS young,
       extract(epoch FROM clock_timestamp() - statement_timestamp())::float8 AS took;

-- The `dlq_*` family: `outbox-relay dlq ...` (relay/admin.py). `dlq_chosen` is the one filter
-- of every dead-letter command; the blocks after it read its rows as `chosen`, and admin.py
-- runs each as `WITH chosen AS (<dlq_chosen>) <block>`, so list, show, count, replay and purge
-- choose alike. Every value is a bound parameter, NULL when the flag is not given. The admin
-- connection plans each statement with its values (plan_cache_mode = force_custom_plan): an
-- absent filter folds away, and the planner picks the index of the filters given
-- (ix_outbox_dead_letters_event_id, _topic_last_failed_at, _key, _last_failed_at; the event
-- type and the error class have none, see docs/operations.md).

-- name: dlq_chosen --
-- $1 event ids (any of them), $2 topic, $3 key, $4 event type, $5 error class,
-- $6 since / $7 until: the time it was dead-lettered (last_failed_at), since inclusive.
SELECT * FROM outbox_dead_letters
WHERE ($1::uuid[] IS NULL OR event_id = ANY ($1::uuid[]))
  AND ($2::text IS NULL OR topic = $2)
  AND ($3::text IS NULL OR key = $3)
  AND ($4::text IS NULL OR event_type = $4)
  AND ($5::text IS NULL OR error_class = $5)
  AND ($6::timestamptz IS NULL OR last_failed_at >= $6)
  AND ($7::timestamptz IS NULL OR last_failed_at < $7);

-- name: dlq_list --
-- At most $8, newest first; with a key ($3), the key's dead letters in their original order
-- (its chain). A CASE on a bound value folds away when planned with it.
SELECT dead_letter_id, event_id, original_seq, topic, key, event_type, error_class,
       error_message, attempts, created_at, first_failed_at, last_failed_at, relay_id,
       holds_key, held_behind
FROM chosen
ORDER BY CASE WHEN $3::text IS NULL THEN last_failed_at END DESC, original_seq
LIMIT $8;

-- name: dlq_show --
-- As dlq_list, with the headers and the payload, in original order.
SELECT dead_letter_id, event_id, original_seq, topic, key, event_type, error_class,
       error_message, attempts, created_at, first_failed_at, last_failed_at, relay_id,
       holds_key, held_behind, headers::text AS headers, payload::text AS payload
FROM chosen
ORDER BY original_seq, dead_letter_id
LIMIT $8;

-- name: dlq_summary --
-- Count, and what purge shows before it deletes: per topic and error class, over the first $8
-- chosen in dead-letter order (the order replay and purge take them; NULL: all, and then the
-- ORDER BY is a constant and sorts nothing).
SELECT c.topic, c.error_class, count(*) AS dead, count(*) FILTER (WHERE c.holds_key) AS held,
       min(c.last_failed_at) AS oldest, max(c.last_failed_at) AS newest
FROM (SELECT topic, error_class, holds_key, last_failed_at FROM chosen
      ORDER BY CASE WHEN $8::bigint IS NOT NULL THEN dead_letter_id END
      LIMIT $8) AS c
GROUP BY c.topic, c.error_class
ORDER BY dead DESC, c.topic, c.error_class;

-- name: dlq_orphans --
-- Replay's chain rule: a quarantine chain (a key's holds_key rows) goes back with its head,
-- the held row of lowest seq. These are the keys whose chain the selection (the first $8
-- chosen, as dlq_summary) enters without its head: replay refuses them. One index probe of
-- ix_outbox_dead_letters_quarantine per chosen key; `keys` counts them.
SELECT c.key, c.first_event AS event_id, h.event_id AS head, count(*) OVER () AS keys
FROM (SELECT p.key, min(p.original_seq) AS first_seq,
             (array_agg(p.event_id ORDER BY p.original_seq))[1] AS first_event
      FROM (SELECT key, original_seq, event_id, holds_key FROM chosen
            ORDER BY CASE WHEN $8::bigint IS NOT NULL THEN dead_letter_id END
            LIMIT $8) AS p
      WHERE p.holds_key
      GROUP BY p.key) AS c
CROSS JOIN LATERAL (SELECT q.event_id, q.original_seq FROM outbox_dead_letters AS q
                    WHERE q.key = c.key AND q.holds_key
                    ORDER BY q.original_seq LIMIT 1) AS h
WHERE h.original_seq < c.first_seq
ORDER BY c.key
LIMIT 1;

-- name: dlq_pick --
-- One batch of replay: the next $9 chosen after dead_letter_id $8, in dead-letter order (a
-- walk of the primary key that each batch resumes; no payloads leave the database).
SELECT dead_letter_id, event_id, key, holds_key
FROM chosen
WHERE dead_letter_id > $8
ORDER BY dead_letter_id
LIMIT $9;

-- name: dlq_purge --
-- One batch of purge, as dlq_pick: delete them for good. Deleting a key's held rows lifts its
-- quarantine once none is left; purge takes exactly what is chosen (no chain rule).
-- `= ANY (ARRAY(...))`: the batch's ids are found first (an InitPlan), then deleted through
-- the primary key; `IN (...)` let the planner hash-join them against the whole table.
DELETE FROM outbox_dead_letters
WHERE dead_letter_id = ANY (ARRAY(SELECT dead_letter_id FROM chosen
                                  WHERE dead_letter_id > $8
                                  ORDER BY dead_letter_id
                                  LIMIT $9))
RETURNING dead_letter_id;

-- name: dlq_requeue --
-- One batch of replay, in one statement (not filtered): delete the picked dead letters ($1)
-- and the whole chain of each key they hold ($2: every held row of those keys, from
-- ix_outbox_dead_letters_quarantine), so that a chain goes back whole; removing the held rows
-- lifts the quarantine. Then insert them into outbox_events with their original id and seq,
-- so that a chain keeps its place before later events of its key, and consumers that compare
-- seqs per key stay right. Postgres sets their bucket, as for every insert (migration 0004).
-- The DELETE locks the chain: a relay parking an event of the key meanwhile waits (FOR SHARE),
-- finds the key no longer held, and leaves the event pending, to be published after the chain.
WITH taken AS (
    DELETE FROM outbox_dead_letters AS d
    WHERE d.dead_letter_id = ANY ($1::bigint[])
       OR (d.holds_key AND d.key = ANY ($2::text[]))
    RETURNING d.*
), requeued AS (
    INSERT INTO outbox_events (seq, id, topic, key, payload, headers, event_type, created_at)
    SELECT t.original_seq, t.event_id, t.topic, t.key, t.payload, t.headers, t.event_type,
           t.created_at
    FROM taken AS t
    RETURNING seq
)
SELECT (SELECT count(*) FROM requeued) AS replayed,
       (SELECT count(DISTINCT key) FROM taken WHERE holds_key) AS released;

-- The `history_*` family: `outbox-relay republish` (relay/admin.py), as the dlq_* family:
-- admin.py runs each block as `WITH chosen AS (<history_chosen>) <block>`.

-- name: history_chosen --
-- $1 event ids (any of them), $2 topic, $3 key, $4 event type, $5 since / $6 until: the time
-- it was delivered, since inclusive.
SELECT * FROM outbox_delivered
WHERE ($1::uuid[] IS NULL OR event_id = ANY ($1::uuid[]))
  AND ($2::text IS NULL OR topic = $2)
  AND ($3::text IS NULL OR key = $3)
  AND ($4::text IS NULL OR event_type = $4)
  AND ($5::timestamptz IS NULL OR delivered_at >= $5)
  AND ($6::timestamptz IS NULL OR delivered_at < $6);

-- name: history_summary --
-- What republish would take (--dry-run), per topic.
SELECT topic, count(*) AS events, min(delivered_at) AS oldest, max(delivered_at) AS newest
FROM chosen
GROUP BY topic
ORDER BY topic;

-- name: history_republish --
-- One batch of republish: the next $8 chosen after delivered_id $7 (a walk of the primary
-- key), back into outbox_events with their original id, seq and created_at, so that they
-- keep their relative order (the relay claims in seq order) and consumers see the same
-- event, plus the header `outbox-republished-at` ($9). Postgres sets the bucket (migration
-- 0004); available_at = now() > created_at makes them waiting rows, so the relays' claim
-- floors go below them (as for a dead-letter replay). An event whose seq is in the outbox
-- already (still pending, or republished and not delivered yet) is skipped.
WITH picked AS (
    SELECT delivered_id, event_id, seq, topic, key, payload, headers, event_type, created_at
    FROM chosen
    WHERE delivered_id > $7
    ORDER BY delivered_id
    LIMIT $8
), requeued AS (
    INSERT INTO outbox_events (seq, id, topic, key, payload, headers, event_type, created_at)
    SELECT p.seq, p.event_id, p.topic, p.key, p.payload,
           p.headers || jsonb_build_object('outbox-republished-at', $9::text), p.event_type,
           p.created_at
    FROM picked AS p
    ORDER BY p.seq
    ON CONFLICT (seq) DO NOTHING
    RETURNING seq
)
SELECT (SELECT count(*) FROM picked) AS picked, (SELECT count(*) FROM requeued) AS republished,
       (SELECT max(delivered_id) FROM picked) AS last;

-- The `status_*` family: `outbox-relay status` (relay/status.py), run in one read-only
-- REPEATABLE READ transaction with the relay's planner settings, so that every statement walks
-- an index and none counts a whole table unless asked: a count stops at $1 rows (NULL: all,
-- `--exact`) and the caller falls back to pg_stat's running estimate above it.

-- name: status_now --
SELECT now() AS now, to_regclass('outbox_events') IS NOT NULL AS migrated,
       to_regclass('outbox_delivered') IS NOT NULL AS has_history;

-- name: status_history --
-- The delivered history (migration 0008): rows counted up to $1, and the oldest row (the
-- head of the primary key, which retention walks).
SELECT (SELECT count(*) FROM (SELECT 1 FROM outbox_delivered LIMIT $1) AS h) AS counted,
       (SELECT delivered_at FROM outbox_delivered ORDER BY delivered_id LIMIT 1) AS oldest;

-- name: status_counts --
-- Rows of each table, counted up to $1 (index-only scans of the primary keys).
SELECT (SELECT count(*) FROM (SELECT 1 FROM outbox_events LIMIT $1) AS e) AS events,
       (SELECT count(*) FROM (SELECT 1 FROM outbox_dead_letters LIMIT $1) AS d) AS dead_letters;

-- name: status_oldest_pending --
-- The first pending event in seq order, due or not: one probe of the primary key.
SELECT seq, id, topic, key, created_at, available_at, attempts
FROM outbox_events
ORDER BY seq
LIMIT 1;

-- name: status_oldest_due --
-- The first event in seq order that a relay could claim now: the claim's own walk of the
-- primary key, past the events not due yet (delayed, or waiting for a retry).
SELECT seq, id, topic, key, created_at, available_at, attempts
FROM outbox_events
WHERE available_at <= now()
ORDER BY seq
LIMIT 1;

-- name: status_waiting --
-- Events not due yet, at most $1 of them (NULL: all), from the partial index
-- ix_outbox_events_waiting_at: retrying (attempts > 0) or delayed, how many wait longer than
-- $2 seconds, and the soonest and latest time one becomes due.
SELECT count(*) AS counted,
       count(*) FILTER (WHERE w.attempts > 0) AS retrying,
       count(*) FILTER (WHERE w.available_at > now() + make_interval(secs => $2)) AS far,
       min(w.available_at) AS soonest,
       max(w.available_at) AS latest
FROM (SELECT available_at, attempts FROM outbox_events
      WHERE available_at > created_at AND attempts >= 0 AND available_at > now()
      LIMIT $1) AS w;

-- name: status_dead_letters --
-- Dead letters by topic and error class, over the newest $1 of them (NULL: all).
SELECT d.topic, d.error_class, count(*) AS dead, max(d.last_failed_at) AS last_failed_at
FROM (SELECT topic, error_class, last_failed_at FROM outbox_dead_letters
      ORDER BY last_failed_at DESC
      LIMIT $1) AS d
GROUP BY d.topic, d.error_class
ORDER BY dead DESC, d.topic, d.error_class;

-- name: status_quarantined_keys --
-- Distinct quarantined keys, up to $1: a skip scan of ix_outbox_dead_letters_quarantine, one
-- index probe per key, however many events are parked behind each.
WITH RECURSIVE held (key) AS (
    (SELECT key FROM outbox_dead_letters WHERE holds_key ORDER BY key LIMIT 1)
    UNION ALL
    SELECT (SELECT d.key FROM outbox_dead_letters AS d
            WHERE d.holds_key AND d.key > h.key
            ORDER BY d.key LIMIT 1)
    FROM held AS h
    WHERE h.key IS NOT NULL
)
SELECT count(*) AS counted FROM (SELECT 1 FROM held WHERE key IS NOT NULL LIMIT $1) AS k;

-- name: status_relays --
-- Every registered relay; live = a heartbeat within the last $1 seconds (lease_seconds, as
-- `live_relays`), with the buckets it holds an unexpired lease on.
SELECT r.relay_id, r.hostname, r.pid, r.started_at,
       extract(epoch FROM now() - r.heartbeat_at)::float8 AS heartbeat_age,
       r.heartbeat_at > now() - make_interval(secs => $1) AS live,
       (SELECT count(*) FROM outbox_bucket_leases AS l
        WHERE l.owner = r.relay_id AND l.lease_until > now()) AS buckets
FROM outbox_relays AS r
ORDER BY r.relay_id;

-- name: status_orphan_buckets --
-- Buckets with no live owner: free, expired, or leased to a relay without a heartbeat within
-- the last $1 seconds. Nobody publishes their events until a relay takes them.
SELECT l.bucket
FROM outbox_bucket_leases AS l
WHERE l.owner IS NULL
   OR l.lease_until <= now()
   OR NOT EXISTS (SELECT 1 FROM outbox_relays AS r
                  WHERE r.relay_id = l.owner
                    AND r.heartbeat_at > now() - make_interval(secs => $1))
ORDER BY l.bucket;

-- name: status_oldest_transaction --
-- The oldest open transaction of this database that holds a snapshot or an xid, or a prepared
-- one: while it lives, Postgres cannot clean up the rows the relays delete, so every claim
-- walks past them (status itself excluded).
SELECT * FROM (
    SELECT pid, application_name, state, false AS prepared,
           extract(epoch FROM now() - xact_start)::float8 AS age
    FROM pg_stat_activity
    WHERE datname = current_database() AND pid <> pg_backend_pid()
      AND (backend_xmin IS NOT NULL OR backend_xid IS NOT NULL)
    UNION ALL
    SELECT NULL, gid, 'prepared', true, extract(epoch FROM now() - prepared)::float8
    FROM pg_prepared_xacts
    WHERE database = current_database()
) AS t
ORDER BY age DESC
LIMIT 1;

-- name: status_tables --
-- Table health from the statistics collector: n_live_tup is Postgres's running estimate of
-- the rows, which follows inserts and deletes within seconds.
SELECT s.relname AS name, s.n_live_tup, s.n_dead_tup, s.last_vacuum, s.last_autovacuum,
       s.last_analyze, s.last_autoanalyze, pg_total_relation_size(s.relid) AS size_bytes
FROM pg_stat_user_tables AS s
WHERE s.relid IN ('outbox_events'::regclass, 'outbox_dead_letters'::regclass,
                 to_regclass('outbox_delivered'));
