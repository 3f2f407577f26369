#!/bin/sh
# Patroni post_bootstrap hook of the rwdb HA test stack: runs once, on the new primary,
# with a superuser connection string as $1 (Patroni 4 has no bootstrap.users).
# Idempotent: `scripts/stack.sh up` runs it again on a cluster that already exists, so
# that one made before a database was added here gets it too.
set -eu
@PSQL@ -X -q -v ON_ERROR_STOP=1 -d "$1" <<'SQL'
SELECT 'CREATE ROLE rwdb_app LOGIN' WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'rwdb_app')
\gexec
ALTER ROLE rwdb_app LOGIN PASSWORD 'rwdb_app_pw';
GRANT pg_monitor TO rwdb_app;
SELECT 'CREATE DATABASE rwdb OWNER rwdb_app' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'rwdb')
\gexec
-- the test suite's own database: what the tests write never shows in the demo (rwdb)
SELECT 'CREATE DATABASE rwdb_test OWNER rwdb_app' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'rwdb_test')
\gexec
SQL
