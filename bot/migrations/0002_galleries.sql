-- Each /imagine result, so its buttons (Re-roll, Delete, Describe) keep working after a restart.
CREATE TABLE galleries (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    guild_id     INTEGER NOT NULL,
    requester_id INTEGER NOT NULL,
    prompt       TEXT NOT NULL,
    count        INTEGER NOT NULL CHECK (count >= 1),
    guidance     REAL NOT NULL,
    temperature  REAL NOT NULL,
    seed         INTEGER NOT NULL,
    created_at   TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now'))
);
