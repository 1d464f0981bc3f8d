"""Fixtures of the unit tests: S3 as moto fakes it (the integration tests use a real server)."""

from __future__ import annotations

import boto3
import pytest
from moto import mock_aws

BUCKET = "trafficwatch"


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch):
    """A moto S3 client with the bucket `trafficwatch`."""
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)  # moto intercepts AWS's own endpoints only
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)
        yield client
