# The pipeline image for docker-compose.yml: Airflow 3.3 with the project's pinned libraries and code.
FROM apache/airflow:3.3.2-python3.11
COPY --chown=airflow:root requirements.txt requirements.lock pyproject.toml /opt/trafficwatch/
COPY --chown=airflow:root plugins /opt/trafficwatch/plugins
RUN pip install --no-cache-dir -r /opt/trafficwatch/requirements.txt -c /opt/trafficwatch/requirements.lock \
    && pip install --no-cache-dir --no-deps -e /opt/trafficwatch
COPY --chown=airflow:root dbt_project /opt/trafficwatch/dbt_project
COPY --chown=airflow:root dags /opt/airflow/dags
