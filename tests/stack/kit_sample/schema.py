"""The sample's one table (a module of its own: the conftest must not import the app,
whose setup() would replace the process-wide Database while pytest collects)."""

TABLE = "kit_sample_users"
SCHEMA = f"CREATE TABLE IF NOT EXISTS {TABLE} (id bigserial PRIMARY KEY, name text UNIQUE)"
