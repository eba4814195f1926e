-- Per-server limits and daily usage. Direct messages use guild_id 0.
-- One statement per line-ending `;` (the store runs them one by one inside a transaction).

-- A server's overrides; NULL means "use the bot-wide default from Settings".
CREATE TABLE guild_settings (
    guild_id               INTEGER PRIMARY KEY,
    generations_per_user   INTEGER CHECK (generations_per_user >= 0),
    questions_per_user     INTEGER CHECK (questions_per_user >= 0),
    generations_per_server INTEGER CHECK (generations_per_server >= 0),
    cooldown_seconds       INTEGER CHECK (cooldown_seconds >= 0),
    max_queued_per_user    INTEGER CHECK (max_queued_per_user >= 0),
    max_prompt_length      INTEGER CHECK (max_prompt_length >= 1),
    nsfw_only              INTEGER CHECK (nsfw_only IN (0, 1)),
    log_channel_id         INTEGER
);

-- Channels the bot answers in; none listed = every channel.
CREATE TABLE allowed_channels (
    guild_id   INTEGER NOT NULL,
    channel_id INTEGER NOT NULL,
    PRIMARY KEY (guild_id, channel_id)
) WITHOUT ROWID;

-- Roles whose members skip the per-member limits.
CREATE TABLE exempt_roles (
    guild_id INTEGER NOT NULL,
    role_id  INTEGER NOT NULL,
    PRIMARY KEY (guild_id, role_id)
) WITHOUT ROWID;

-- Case-folded words and phrases refused in prompts.
CREATE TABLE banned_words (
    guild_id INTEGER NOT NULL,
    word     TEXT NOT NULL CHECK (word <> ''),
    PRIMARY KEY (guild_id, word)
) WITHOUT ROWID;

-- Requests counted per member, kind and UTC day (YYYY-MM-DD); a server's total is the sum over its members.
-- The key order serves both the member lookup and the per-server sum.
CREATE TABLE usage (
    guild_id INTEGER NOT NULL,
    day      TEXT NOT NULL,
    kind     TEXT NOT NULL CHECK (kind IN ('imagine', 'ask')),
    user_id  INTEGER NOT NULL,
    count    INTEGER NOT NULL CHECK (count >= 0),
    PRIMARY KEY (guild_id, day, kind, user_id)
) WITHOUT ROWID;

-- A member's last counted request on a server (UTC ISO 8601), for the cooldown.
CREATE TABLE member_activity (
    guild_id        INTEGER NOT NULL,
    user_id         INTEGER NOT NULL,
    last_request_at TEXT,
    PRIMARY KEY (guild_id, user_id)
) WITHOUT ROWID;
