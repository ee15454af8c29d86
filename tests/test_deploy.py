"""``python -m runtime deploy``: sizing against the instance table, the target check before any call, the staged
directory tree SageMaker copies into /opt/ml/model, and the exact SageMaker requests (botocore's Stubber, which
also validates every request against SageMaker's published API model), with no secret in any output."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest

from artifacts.manifest import Manifest, Target
from artifacts.ops import copy, load_manifest, read_dir_manifest, verify_dir
from artifacts.uri import parse_ref
from runtime.deploy import cli, fit
from runtime.deploy.sagemaker import Request, plan
from tests.conftest import run_cli
from tests.s3_server import MotoS3

pytestmark = pytest.mark.integration
IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/kiln-runtime:vllm-cpu"
ROLE = "arn:aws:iam::123456789012:role/kiln-sagemaker"
SECRET = "hf_SeCrEt0123456789"
ARN = "arn:aws:sagemaker:us-east-1:123456789012:"


def _target(**kw: Any) -> Target:
    base = {
        "engine": "vllm", "engine_version": "", "devices": ("cuda",), "dtype": "bfloat16", "tensor_parallel_degree": 1,
        "max_model_len": 4096,
    }  # fmt: skip
    return Target(**{**base, **kw})


# -------------------------------------------------------------------------------------------- sizing (unit)


@pytest.mark.unit
def test_the_kv_cache_is_sized_from_the_config_and_the_limits() -> None:
    # 2 layers x 2 KV heads x head_dim 64 x (K and V) x 2 bytes (bfloat16) = 1024 bytes per token
    config = {"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 256}
    manifest = Manifest.create(
        "m",
        [],
        _target(max_model_len=100),
        serving={},
        provenance={},
    )
    need = fit.estimate(manifest, config, max_model_len=100, max_num_seqs=10)
    assert need.kv == 1024 * 100 * 10


@pytest.mark.unit
@pytest.mark.parametrize(
    ("instance", "target", "field"),
    [
        ("ml.m5.xlarge", _target(devices=("cuda",)), "devices"),  # a GPU artifact on a CPU instance
        ("ml.g5.xlarge", _target(compile={"device": "cuda", "gpu_capability": "9.0"}), "compile.gpu_capability"),
        ("ml.p5.48xlarge", _target(compile={"device": "cuda", "gpu_capability": "9.0"}), None),  # H100 is sm_90
        ("ml.g5.xlarge", _target(tensor_parallel_degree=2), "tensor_parallel_degree"),
        ("ml.g5.12xlarge", _target(tensor_parallel_degree=2), None),
        (
            "ml.inf2.xlarge",
            _target(devices=("neuron",), compile={"instance_family": "trn1"}),
            "compile.instance_family",
        ),
        ("ml.trn1.2xlarge", _target(devices=("neuron",), compile={"instance_family": "trn1"}), None),
        ("ml.g5.xlarge", _target(devices=("cpu", "cuda"), compile={"device": "cpu"}), "compile.device"),
    ],
)
def test_instances_are_checked_against_the_target_block(instance: str, target: Target, field: str | None) -> None:
    need = fit.Need(weights=1 << 30, kv=0, tensor_parallel_degree=target.tensor_parallel_degree, max_model_len=1,
                    max_num_seqs=1)  # fmt: skip
    row = fit.table().get(instance)
    assert row is not None
    why = fit.problem(row, target, need)
    assert (why[0] if why else None) == field, why


@pytest.mark.unit
def test_memory_decides_between_gpus_and_the_list_is_cheapest_first() -> None:
    # 30 GiB of bfloat16 weights: more than an A10G/L4 (24 GiB) holds, within an L40S (48 GiB) or an A100 (40 GiB)
    need = fit.Need(weights=30 << 30, kv=0, tensor_parallel_degree=1, max_model_len=1, max_num_seqs=1)
    table = fit.table()
    ok = fit.fitting(table.instances, _target(), {"cuda": need})
    assert [i.type for i in ok][:2] == ["ml.g6e.xlarge", "ml.g6e.12xlarge"]
    assert {"ml.g5.xlarge", "ml.g6.xlarge", "ml.g4dn.xlarge"}.isdisjoint(i.type for i in ok)
    prices = [i.usd_per_hour for i in ok]
    assert prices == sorted(prices)
    g5 = table.get("ml.g5.xlarge")
    assert g5 is not None
    assert fit.problem(g5, _target(), need) == ("memory", "needs 31.5 GiB per device; ml.g5.xlarge gives 21.6 GiB "
                                                          "(90% of 1 x A10G 24 GiB)")  # fmt: skip


@pytest.mark.unit
def test_the_instance_table_names_its_source_and_date() -> None:
    table = fit.table()
    assert "pricing" in table.source
    assert table.read.startswith("20")
    assert table.region
    kinds = {i.device for i in table.instances}
    assert kinds == {"cpu", "cuda", "neuron"}
    assert all(i.accelerators and i.accelerator_memory_gib for i in table.instances if i.device != "cpu")


@pytest.mark.unit
def test_resource_names_are_content_hashed_and_valid() -> None:
    req = Request("kiln-tiny", IMAGE, ROLE, "ml.m5.xlarge", "s3://b/p/trees/t/0/", "cpu", 1, 5000)
    first, again = plan(req), plan(req)
    other = plan(Request("kiln-tiny", IMAGE + "2", ROLE, "ml.m5.xlarge", "s3://b/p/trees/t/0/", "cpu", 1, 5000))
    name = first[0].params["ModelName"]
    assert name == again[0].params["ModelName"]
    assert name != other[0].params["ModelName"]
    assert name.startswith("kiln-tiny-")
    assert len(name) <= 63
    long = plan(Request("e" * 63, IMAGE, ROLE, "ml.m5.xlarge", "s3://b/p/", "cpu", 1, 5000))
    assert all(len(v) <= 63 for c in long for k, v in c.params.items() if k.endswith("ConfigName"))


# ------------------------------------------------------------------------------------------ against S3 + Stubber


@pytest.fixture
def s3_model(moto_s3: MotoS3, tiny_uri: str) -> tuple[str, str, Manifest]:
    bucket = moto_s3.bucket("deploy")
    ref = copy(parse_ref(tiny_uri), f"s3://{bucket}/models")
    return bucket, str(ref), load_manifest(ref)[1]


def _args(uri: str, *extra: str) -> list[str]:
    return [uri, "--endpoint-name", "kiln-tiny", "--image", IMAGE, "--role", ROLE, *extra]


def test_dry_run_sizes_lists_and_prints_the_calls_writing_nothing(
    moto_s3: MotoS3, s3_model: tuple[str, str, Manifest]
) -> None:
    bucket, uri, manifest = s3_model
    before = moto_s3.keys(bucket)
    proc = run_cli("runtime", "deploy", *_args(uri, "--env", f"HF_TOKEN={SECRET}", "--dry-run"), timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert SECRET not in out + proc.stderr
    assert moto_s3.keys(bucket) == before  # a dry run writes nothing
    # the tiny artifact runs on CPU or CUDA: the cheapest row of the table (a CPU instance) is chosen
    assert "instance type: ml.m5.xlarge" in out
    listed = [line.split()[0] for line in out.splitlines() if line.startswith("  ml.")]
    assert listed[0] == "ml.m5.xlarge"
    assert "ml.g4dn.xlarge" in listed
    model = json.loads(out.split("CreateModel ", 1)[1].split("\nCreateEndpointConfig", 1)[0])
    source = model["PrimaryContainer"]["ModelDataSource"]["S3DataSource"]
    assert source == {
        "S3Uri": f"s3://{bucket}/models/trees/{manifest.name}/{manifest.digest.split(':')[1]}/",
        "S3DataType": "S3Prefix",
        "CompressionType": "None",
    }
    assert model["PrimaryContainer"]["Environment"]["HF_TOKEN"] == "***"
    assert model["PrimaryContainer"]["Image"] == IMAGE
    assert model["ExecutionRoleArn"] == ROLE


def test_an_instance_that_does_not_fit_is_refused_before_any_call(s3_model: tuple[str, str, Manifest]) -> None:
    _, uri, _ = s3_model
    proc = run_cli("runtime", "deploy", *_args(uri, "--instance-type", "ml.inf2.xlarge", "--dry-run"), timeout=120)
    assert proc.returncode == 1
    assert "--instance-type ml.inf2.xlarge does not fit this artifact: target.devices:" in proc.stderr
    assert "instance types that fit: ml.m5.xlarge" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_local_artifact_is_refused_with_the_copy_command(tiny_uri: str) -> None:
    proc = run_cli("runtime", "deploy", *_args(tiny_uri, "--dry-run"), timeout=120)
    assert proc.returncode == 1
    assert f"python -m artifacts copy {tiny_uri} s3://BUCKET/PREFIX" in proc.stderr


class Recorder:
    """A real boto3 SageMaker client behind botocore's Stubber, keeping the parameters of every call."""

    def __init__(self) -> None:
        import boto3
        from botocore.stub import Stubber

        self.client = boto3.session.Session().client("sagemaker", region_name="us-east-1")
        self.stub = Stubber(self.client)
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.client.meta.events.register("provide-client-params.sagemaker.*", self._keep)

    def _keep(self, params: dict[str, Any], model: Any, **_: Any) -> None:
        self.calls.append((model.name, json.loads(json.dumps(params))))

    def missing(self, op: str, what: str, **params: Any) -> None:
        self.stub.add_client_error(
            op, "ValidationException", f'Could not find {what} "x".', 400, expected_params=params
        )


def _endpoint(name: str, config: str, status: str = "InService") -> dict[str, Any]:
    return {
        "EndpointName": name,
        "EndpointArn": f"arn:aws:sagemaker:us-east-1:123456789012:endpoint/{name}",
        "EndpointConfigName": config,
        "EndpointStatus": status,
        "CreationTime": "2026-12-04T00:00:00Z",
        "LastModifiedTime": "2026-12-04T00:00:00Z",
    }


def test_deploy_stages_the_tree_and_makes_the_exact_calls(
    moto_s3: MotoS3, s3_model: tuple[str, str, Manifest], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from botocore.stub import ANY

    bucket, uri, manifest = s3_model
    rec = Recorder()
    monkeypatch.setattr(cli, "_client", lambda region: rec.client)
    hexd = manifest.digest.split(":")[1]
    tree = f"s3://{bucket}/models/trees/{manifest.name}/{hexd}/"
    container = {
        "Image": IMAGE,
        "ModelDataSource": {"S3DataSource": {"S3Uri": tree, "S3DataType": "S3Prefix", "CompressionType": "None"}},
        "Environment": {"HF_TOKEN": SECRET, "OPTION_MAX_NUM_SEQS": "8"},
    }
    rec.stub.add_response(
        "create_model",
        {"ModelArn": ARN + "model/m"},
        {"ModelName": ANY, "PrimaryContainer": container, "ExecutionRoleArn": ROLE},
    )
    variant = {
        "VariantName": "AllTraffic",
        "InstanceType": "ml.m5.2xlarge",
        "InitialInstanceCount": 2,
        "ModelName": ANY,
        "ModelDataDownloadTimeoutInSeconds": 1800,
        "ContainerStartupHealthCheckTimeoutInSeconds": 600,
    }
    rec.stub.add_response(
        "create_endpoint_config",
        {"EndpointConfigArn": ARN + "endpoint-config/c"},
        {"EndpointConfigName": ANY, "ProductionVariants": [variant]},
    )
    rec.missing("describe_endpoint", "endpoint", EndpointName="kiln-tiny")
    rec.stub.add_response(
        "create_endpoint", {"EndpointArn": ARN + "endpoint/e"}, {"EndpointName": "kiln-tiny", "EndpointConfigName": ANY}
    )
    out = io.StringIO()
    args = _args(uri, "--instance-type", "ml.m5.2xlarge", "--instance-count", "2", "--max-num-seqs", "8",
                 "--startup-timeout", "600", "--env", f"HF_TOKEN={SECRET}")  # fmt: skip
    with rec.stub:
        assert cli.main(args, out=out) == 0
        rec.stub.assert_no_pending_responses()
    assert SECRET not in out.getvalue()
    ops = dict(rec.calls)
    assert ops["CreateEndpointConfig"]["ProductionVariants"][0]["ModelName"] == ops["CreateModel"]["ModelName"]
    assert ops["CreateEndpoint"]["EndpointConfigName"] == ops["CreateEndpointConfig"]["EndpointConfigName"]

    # The tree SageMaker copies into /opt/ml/model is a complete, verifying artifact directory.
    model_dir = tmp_path / "opt-ml-model"
    s3 = moto_s3.client()
    prefix = f"models/trees/{manifest.name}/{hexd}/"
    for key in moto_s3.keys(bucket, prefix):
        (model_dir / key[len(prefix) :]).parent.mkdir(parents=True, exist_ok=True)
        s3.download_file(bucket, key, str(model_dir / key[len(prefix) :]))
    assert read_dir_manifest(model_dir).digest == manifest.digest
    assert verify_dir(model_dir, manifest) == []

    # The same deployment again: SageMaker answers "already existing" and the endpoint is on that config already.
    rec2 = Recorder()
    monkeypatch.setattr(cli, "_client", lambda region: rec2.client)
    for op, what in (("create_model", "model"), ("create_endpoint_config", "endpoint configuration")):
        rec2.stub.add_client_error(op, "ValidationException", f'Cannot create already existing {what} "x".', 400)
    config = ops["CreateEndpointConfig"]["EndpointConfigName"]
    rec2.stub.add_response("describe_endpoint", _endpoint("kiln-tiny", config), {"EndpointName": "kiln-tiny"})
    out2 = io.StringIO()
    with rec2.stub:
        assert cli.main(args, out=out2) == 0
        rec2.stub.assert_no_pending_responses()
    assert "staged already" in out2.getvalue()
    assert f"is on {config} already, kept" in out2.getvalue()


def test_adapters_become_inference_components_on_their_base(
    moto_s3: MotoS3, s3_model: tuple[str, str, Manifest], lora_uris: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from botocore.stub import ANY

    bucket, uri, manifest = s3_model
    adapter_ref = copy(parse_ref(lora_uris["lora0"]), f"s3://{bucket}/models")
    adapter = load_manifest(adapter_ref)[1]
    rec = Recorder()
    monkeypatch.setattr(cli, "_client", lambda region: rec.client)
    rec.stub.add_response("create_model", {"ModelArn": ARN + "model/m"}, None)
    rec.stub.add_response(
        "create_endpoint_config",
        {"EndpointConfigArn": ARN + "endpoint-config/c"},
        {
            "EndpointConfigName": ANY,
            "ProductionVariants": [
                {
                    "VariantName": "AllTraffic",
                    "InstanceType": "ml.m5.xlarge",
                    "InitialInstanceCount": 1,
                    "RoutingConfig": {"RoutingStrategy": "LEAST_OUTSTANDING_REQUESTS"},
                }
            ],
            "ExecutionRoleArn": ROLE,
        },
    )
    rec.missing("describe_endpoint", "endpoint", EndpointName="kiln-tiny")
    rec.stub.add_response("create_endpoint", {"EndpointArn": ARN + "endpoint/e"}, None)
    rec.stub.add_response("describe_endpoint", _endpoint("kiln-tiny", "c"), {"EndpointName": "kiln-tiny"})
    rec.missing("describe_inference_component", "inference component", InferenceComponentName="kiln-tiny-base")
    rec.stub.add_response("create_inference_component", {"InferenceComponentArn": ARN + "inference-component/b"}, None)
    name = f"kiln-tiny-{adapter.name}"
    rec.missing("describe_inference_component", "inference component", InferenceComponentName=name)
    tarball = f"s3://{bucket}/models/trees/{adapter.name}/{adapter.digest.split(':')[1]}.tar.gz"
    rec.stub.add_response(
        "create_inference_component",
        {"InferenceComponentArn": ARN + "inference-component/a"},
        {
            "InferenceComponentName": name,
            "EndpointName": "kiln-tiny",
            "Specification": {"BaseInferenceComponentName": "kiln-tiny-base", "Container": {"ArtifactUrl": tarball}},
        },
    )
    with rec.stub:
        assert cli.main(_args(uri, "--adapter", str(adapter_ref)), out=io.StringIO()) == 0
        rec.stub.assert_no_pending_responses()
    ops = {op: p for op, p in rec.calls if op != "DescribeInferenceComponent"}
    env = ops["CreateModel"]["PrimaryContainer"]["Environment"]
    assert env == {"SM_VLLM_ENABLE_LORA": "true", "SM_VLLM_MAX_LORA_RANK": str(adapter.adapter["rank"])}  # type: ignore[index]
    base = [p for op, p in rec.calls if op == "CreateInferenceComponent"][0]
    assert base["Specification"]["ModelName"] == ops["CreateModel"]["ModelName"]
    assert base["Specification"]["ComputeResourceRequirements"]["NumberOfCpuCoresRequired"] == 1
    assert base["VariantName"] == "AllTraffic"
    assert base["RuntimeConfig"] == {"CopyCount": 1}

    # The adapter's archive holds the adapter artifact, verifiable once SageMaker unpacks it for POST /adapters.
    body = moto_s3.client().get_object(Bucket=bucket, Key=tarball.split(f"{bucket}/", 1)[1])["Body"].read()
    with tarfile.open(fileobj=io.BytesIO(body)) as tar:
        names = set(tar.getnames())
        packed = Manifest.from_bytes(tar.extractfile("manifest.json").read())  # type: ignore[union-attr]
    assert packed.digest == adapter.digest
    assert names == {"manifest.json", *(e.path for e in adapter.files)}


def test_an_adapter_for_another_base_is_refused(
    s3_model: tuple[str, str, Manifest], lora_uris: dict[str, str], moto_s3: MotoS3
) -> None:
    bucket, uri, _ = s3_model
    narrow = copy(parse_ref(lora_uris["narrow"]), f"s3://{bucket}/models")
    proc = run_cli("runtime", "deploy", *_args(uri, "--adapter", str(narrow), "--dry-run"), timeout=120)
    assert proc.returncode == 1
    assert "was built for base sha256:" in proc.stderr
    assert "rebuild it against this model" in proc.stderr


@pytest.mark.unit
def test_when_nothing_fits_the_largest_instance_says_why() -> None:
    import argparse

    from artifacts.manifest import FileEntry

    weights = FileEntry("model.safetensors", 500 << 30, "sha256:" + "0" * 64)  # 500 GiB on one GPU
    manifest = Manifest.create("big", [weights], _target(), serving={}, provenance={})
    args = argparse.Namespace(instance_type=None, max_model_len=None, max_num_seqs=1, skip_fit_check=False)
    with pytest.raises(cli.DeployError) as err:
        cli.size(manifest, {}, args)
    # the largest CUDA instance by total GPU memory is the P5 (8 x 80 GiB); one device must hold it all at TP 1
    assert "the largest cuda instance, ml.p5.48xlarge: memory: needs 501.5 GiB per device" in str(err.value)
