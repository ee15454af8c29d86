"""S3 faults through the CLIs, each against a real loopback server: a clear message naming the object and the
fix, exit status 1, no traceback, nothing left behind, and never a credential in the output (logs at DEBUG)."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.s3_server import ACCESS_KEY, SECRET_KEY, CannedS3, ContainerCredentials, MotoS3, free_port
from tests.test_s3_store import make_artifact

pytestmark = pytest.mark.integration
LOUD = {"KILN_LOG_LEVEL": "DEBUG"}


def fails_cleanly(proc: subprocess.CompletedProcess[str], *needles: str, secrets: tuple[str, ...] = ()) -> str:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    for needle in needles:
        assert needle in proc.stderr, proc.stderr
    assert "Traceback" not in out
    for secret in (ACCESS_KEY, SECRET_KEY, *secrets):
        assert secret not in out, f"a credential leaked into the output:\n{out}"
    return proc.stderr


@pytest.fixture
def published(moto_s3: MotoS3, tmp_path: Path) -> str:
    bucket = moto_s3.bucket()
    src, _ = make_artifact(tmp_path)
    push = run_cli("artifacts", "push", str(src), f"s3://{bucket}/store", "--tag", "latest")
    assert push.returncode == 0, push.stderr
    return f"s3://{bucket}/store/demo:latest"


@pytest.mark.usefixtures("moto_s3")
def test_missing_bucket(tmp_path: Path) -> None:
    proc = run_cli("artifacts", "ls", "s3://kiln-no-such-bucket/x", env=LOUD)
    fails_cleanly(proc, "bucket 'kiln-no-such-bucket' does not exist")
    proc = run_cli("build", "publish=s3", "publish.uri=s3://kiln-no-such-bucket/models", env=LOUD)
    fails_cleanly(proc, "[publish] publish.uri: cannot use s3://kiln-no-such-bucket/models: bucket")
    assert "convert" not in proc.stderr  # refused before any stage ran
    proc = run_cli("runtime", "serve", "s3://kiln-no-such-bucket/x/demo:latest", "--port", "1", env=LOUD, timeout=120)
    fails_cleanly(proc, "does not exist")


@pytest.fixture
def iam_user(moto_s3: MotoS3) -> Iterator[dict[str, str]]:
    """An IAM user with no permissions; moto's authentication switched on while the test runs."""
    import boto3

    iam = boto3.session.Session().client("iam", endpoint_url=moto_s3.endpoint)
    user = f"kiln-nobody-{uuid.uuid4().hex[:8]}"  # one per test: moto's IAM lives as long as the session
    iam.create_user(UserName=user)
    key = iam.create_access_key(UserName=user)["AccessKey"]
    moto_s3.set_auth(True)
    try:
        yield {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}
    finally:
        moto_s3.set_auth(False)


def test_no_permission_and_rejected_credentials(published: str, iam_user: dict[str, str], tmp_path: Path) -> None:
    env = {**iam_user, **LOUD}
    secrets = (iam_user["AWS_SECRET_ACCESS_KEY"],)
    proc = run_cli("artifacts", "pull", published, str(tmp_path / "out"), env=env)
    fails_cleanly(proc, "access denied", "s3:GetObject", secrets=secrets)
    assert not (tmp_path / "out").exists()
    src, _ = make_artifact(tmp_path / "other", name="other")
    proc = run_cli("artifacts", "push", str(src), published.rsplit("/", 1)[0], env=env)
    fails_cleanly(proc, "access denied", secrets=secrets)
    # The session's own key is unknown to IAM: S3 rejects it.
    proc = run_cli("artifacts", "verify", published, env=LOUD)
    fails_cleanly(proc, "rejected the AWS credentials (InvalidAccessKeyId)")


def test_a_role_that_may_only_get_objects_pulls(published: str, moto_s3: MotoS3, tmp_path: Path) -> None:
    """Pulling needs s3:GetObject only: the signature listing a pull does (artifacts/signing.py) falls back to
    "unsigned" where s3:ListBucket is denied, saying so, instead of failing the pull."""
    import json

    import boto3

    bucket = published.split("/")[2]
    iam = boto3.session.Session().client("iam", endpoint_url=moto_s3.endpoint)
    user = f"kiln-reader-{uuid.uuid4().hex[:8]}"
    iam.create_user(UserName=user)
    policy = {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "s3:GetObject", "Resource": f"arn:aws:s3:::{bucket}/*"}]}  # fmt: skip
    iam.put_user_policy(UserName=user, PolicyName="get-only", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName=user)["AccessKey"]
    env = {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"], **LOUD}
    moto_s3.set_auth(True)
    try:
        proc = run_cli("artifacts", "pull", published, str(tmp_path / "out"), env=env)
    finally:
        moto_s3.set_auth(False)
    assert proc.returncode == 0, proc.stderr
    assert "treating the artifact as unsigned" in proc.stderr
    assert (tmp_path / "out" / "manifest.json").is_file()


def test_wrong_endpoint_and_wrong_region(published: str) -> None:
    port = free_port()
    closed = f"http://proxyuser:proxy-password-1234@127.0.0.1:{port}"  # userinfo in the URL must not show either
    proc = run_cli("artifacts", "show", published, env={"AWS_ENDPOINT_URL": closed, "AWS_MAX_ATTEMPTS": "1", **LOUD})
    msg = fails_cleanly(proc, f"the S3 endpoint http://127.0.0.1:{port} cannot be reached", "AWS_ENDPOINT_URL")
    assert "proxy-password-1234" not in msg
    # What S3 answers when the bucket lives in another region (botocore retries it once, re-signed).
    other = CannedS3(
        301,
        "PermanentRedirect",
        "The bucket you are attempting to access must be addressed using the specified endpoint.",
        headers={"x-amz-bucket-region": "eu-west-1"},
    )
    try:
        proc = run_cli("artifacts", "show", published, env={"AWS_ENDPOINT_URL": other.endpoint, **LOUD})
    finally:
        other.close()
    fails_cleanly(proc, "not served by region 'us-east-1'", "AWS_REGION=eu-west-1")


@pytest.mark.usefixtures("moto_s3")
def test_expired_credentials(published: str, tmp_path: Path) -> None:
    # Static credentials whose session token S3 says has expired.
    token = "kilnSessionToken/DoNotPrint+0123456789abcdef"
    expired = CannedS3(400, "ExpiredToken", "The provided token has expired.")
    try:
        env = {"AWS_ENDPOINT_URL": expired.endpoint, "AWS_SESSION_TOKEN": token, **LOUD}
        proc = run_cli("artifacts", "pull", published, str(tmp_path / "out"), env=env)
    finally:
        expired.close()
    fails_cleanly(proc, "credentials have expired (ExpiredToken)", secrets=(token,))
    # Credentials from the container credentials endpoint that are already expired when handed out.
    creds = ContainerCredentials()
    try:
        env = {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "", "AWS_CONTAINER_CREDENTIALS_FULL_URI": creds.uri}
        proc = run_cli("runtime", "serve", published, "--port", "1", env={**env, **LOUD}, timeout=120)
    finally:
        creds.close()
    fails_cleanly(proc, "credentials have expired", secrets=(creds.TOKEN, creds.SECRET, "ASIAKILNEXPIRED00001"))
