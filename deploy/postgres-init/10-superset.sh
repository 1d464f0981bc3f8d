#!/bin/sh
# docker-compose.yml: PostgreSQL holds Airflow's metadata (database airflow, owned by the image's superuser
# airflow) and Superset's, under its own role: `superset` logs in with SUPERSET_DB_PASSWORD, owns the database
# superset and nothing else, is no superuser and cannot connect to Airflow's database. The password comes
# from the container's environment (compose refuses to start without it), never from this file.
# The image runs this once, when the postgres-data volume is first initialised; it can be run again
# (docker compose exec postgres sh /docker-entrypoint-initdb.d/10-superset.sh): it changes only what differs.
set -eu
: "${SUPERSET_DB_PASSWORD:?set SUPERSET_DB_PASSWORD}"
psql -v ON_ERROR_STOP=1 --no-psqlrc --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
  -v superset_password="$SUPERSET_DB_PASSWORD" -v airflow_db="$POSTGRES_DB" <<'SQL'
SELECT 'CREATE ROLE superset' WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'superset') \gexec
ALTER ROLE superset WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS
  PASSWORD :'superset_password';
SELECT 'CREATE DATABASE superset OWNER superset'
  WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'superset') \gexec
ALTER DATABASE superset OWNER TO superset;
-- Each database is its owner's: no other role may connect (superusers always can).
REVOKE ALL ON DATABASE superset FROM PUBLIC;
REVOKE ALL ON DATABASE :"airflow_db" FROM PUBLIC;
SQL
