# The pipeline image for docker-compose.yml: Airflow 3.3 with the project's pinned libraries and code.
FROM apache/airflow:3.3.2-python3.11
COPY --chown=airflow:root requirements.txt requirements.lock pyproject.toml /opt/trafficwatch/
# The pipeline only: devtools/ (the local feed and the demo's history, `trafficwatch-dev`) stays out.
COPY --chown=airflow:root plugins /opt/trafficwatch/plugins
RUN pip install --no-cache-dir -r /opt/trafficwatch/requirements.txt -c /opt/trafficwatch/requirements.lock \
    && pip install --no-cache-dir --no-deps -e /opt/trafficwatch
COPY --chown=airflow:root dbt_project /opt/trafficwatch/dbt_project
COPY --chown=airflow:root dags /opt/airflow/dags
# docker-compose.yml's s3-security volume: a new named volume takes this directory's owner and mode, so the
# s3-security service (this image, user airflow) can write the SeaweedFS credentials there, for nobody else.
USER root
RUN install -d -m 700 -o airflow -g root /etc/seaweedfs/trafficwatch
USER airflow
