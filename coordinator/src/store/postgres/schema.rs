//! The registry's tables, as numbered migrations applied at start.
//!
//! Several routers may start at once on a new database: each applies the
//! missing migrations inside one transaction that first takes a
//! transaction-level advisory lock, so one of them does the work and the
//! others, once they get the lock, find it done. A migration is never
//! edited once released; a change of schema is a new entry at the end.

use tokio_postgres::Client;

/// Taken for the length of a migration transaction.
const MIGRATION_LOCK: i64 = 0x6c6c_6d72_0001;
/// Taken by every transaction that draws change numbers, so that numbers
/// commit in the order they are drawn (see `writer`).
pub const CHANGE_LOCK: i64 = 0x6c6c_6d72_0002;
/// The same for batches of heartbeats, apart, so that a large batch of
/// heartbeats never holds up a registration at another router.
pub const HEARD_LOCK: i64 = 0x6c6c_6d72_0003;
/// The channel on which a committed change is announced.
pub const CHANGE_CHANNEL: &str = "llm_router_changes";

/// `(version, SQL)`, oldest first.
const MIGRATIONS: &[(i32, &str)] = &[(
    1,
    r"
    -- One number for every change, drawn under CHANGE_LOCK, and one for
    -- every agent in a batch of heartbeats, drawn under HEARD_LOCK: a
    -- router that has read up to n has seen all of them up to n.
    CREATE SEQUENCE llm_router_change_seq;
    CREATE SEQUENCE llm_router_heard_seq;

    CREATE TABLE llm_router_agents (
        id uuid PRIMARY KEY,
        machine_name text NOT NULL,
        port integer NOT NULL,
        -- The stored form (store::StoredAgent), as the data files hold it.
        record jsonb NOT NULL,
        -- The change that last wrote `record`.
        change_seq bigint NOT NULL,
        -- The last batch of heartbeats that named it, at any router.
        heard_seq bigint NOT NULL DEFAULT 0,
        last_seen timestamptz NOT NULL,
        online boolean NOT NULL,
        UNIQUE (machine_name, port)
    );
    CREATE INDEX llm_router_agents_change_seq ON llm_router_agents (change_seq);
    CREATE INDEX llm_router_agents_heard_seq ON llm_router_agents (heard_seq);

    -- Deleted ids, so that a router catching up learns of the deletion and
    -- no router writes the id back.
    CREATE TABLE llm_router_deleted (
        id uuid PRIMARY KEY,
        change_seq bigint NOT NULL,
        deleted_at timestamptz NOT NULL DEFAULT now()
    );
    CREATE INDEX llm_router_deleted_change_seq ON llm_router_deleted (change_seq);

    -- The routers sharing this database, each kept alive by its own
    -- heartbeat; times are the database's clock, the one all share.
    CREATE TABLE llm_router_routers (
        id uuid PRIMARY KEY,
        address text NOT NULL,
        version text NOT NULL,
        started_at timestamptz NOT NULL DEFAULT now(),
        last_seen timestamptz NOT NULL DEFAULT now()
    );
    ",
)];

/// Applies the migrations this database lacks. Returns how many it applied.
pub async fn migrate(client: &mut Client) -> Result<usize, tokio_postgres::Error> {
    let transaction = client.transaction().await?;
    transaction
        .execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    // "Already exists, skipping" is the normal case: not worth a log line.
    transaction
        .batch_execute("SET LOCAL client_min_messages = warning")
        .await?;
    transaction
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS llm_router_migrations (
                version integer PRIMARY KEY,
                applied_at timestamptz NOT NULL DEFAULT now()
            )",
        )
        .await?;
    let applied: i32 = transaction
        .query_one(
            "SELECT coalesce(max(version), 0) FROM llm_router_migrations",
            &[],
        )
        .await?
        .get(0);
    let mut count = 0;
    for (version, sql) in MIGRATIONS {
        if *version <= applied {
            continue;
        }
        transaction.batch_execute(sql).await?;
        transaction
            .execute(
                "INSERT INTO llm_router_migrations (version) VALUES ($1)",
                &[version],
            )
            .await?;
        count += 1;
    }
    transaction.commit().await?;
    Ok(count)
}
