-- docker-compose.yml: Postgres holds Airflow's metadata (database airflow, made by the image) and
-- Superset's (this one). Runs once, when the postgres-data volume is first initialised.
CREATE DATABASE superset;
