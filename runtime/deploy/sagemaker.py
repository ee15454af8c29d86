"""SageMaker deployment as a list of API calls: planned from the artifact and the request without touching AWS
(what ``--dry-run`` prints), then applied in order with boto3.

A plain endpoint is a model (kiln's runtime image, ``ModelDataSource`` = the artifact's directory tree in S3,
uncompressed, copied by SageMaker into ``/opt/ml/model``), an endpoint configuration (instance type and count, the
container's start-up health-check and download timeouts) and the endpoint. With inference components the endpoint
configuration names no model; a base component runs the model with LoRA enabled (``SM_VLLM_ENABLE_LORA``) and one
component per adapter names it as ``BaseInferenceComponentName`` with the adapter's ``.tar.gz`` as
``Container.ArtifactUrl``; SageMaker registers each adapter with the container's ``POST /adapters``.

Model and endpoint-configuration names end with a hash of what they hold, so a rerun of the same deployment
creates nothing new and a changed one creates new resources and moves the endpoint onto them (UpdateEndpoint);
inference components keep their names (clients address them) and are updated in place.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("kiln.runtime.deploy")
VARIANT = "AllTraffic"
NAME_LIMIT = 63  # SageMaker resource names: [a-zA-Z0-9](-*[a-zA-Z0-9])*, at most 63 characters
_NAME_RE = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$")
_SECRET_RE = re.compile(r"TOKEN|SECRET|PASSWORD|CREDENTIAL|(^|_)KEY($|_)", re.IGNORECASE)
IC_POLL_S = 15.0


@dataclass(frozen=True)
class Adapter:
    name: str  # the inference component's name suffix, and what clients pass as InferenceComponentName's tail
    artifact_url: str  # s3://…/<adapter>.tar.gz
    rank: int


@dataclass(frozen=True)
class Request:
    """What to deploy where: validated by the CLI (runtime/deploy/cli.py) before it gets here."""

    endpoint: str
    image: str
    role: str
    instance_type: str
    model_data: str  # s3://…/trees/<name>/<hex>/
    device: str  # the device kind the instance serves on (cpu, cuda, neuron)
    devices: int  # accelerators the model takes (its tensor-parallel degree)
    memory_mb: int  # host memory an inference component reserves
    instance_count: int = 1
    startup_timeout_s: int = 1800
    download_timeout_s: int = 1800
    env: Mapping[str, str] = field(default_factory=dict)
    inference_components: bool = False
    adapters: tuple[Adapter, ...] = ()


@dataclass(frozen=True)
class Call:
    """One SageMaker API call: the boto3 method and its exact parameters."""

    method: str  # boto3's name: create_model, create_endpoint_config, …
    params: Mapping[str, Any]

    @property
    def operation(self) -> str:  # the API's name, as in AWS's documentation and CloudTrail
        return "".join(part.title() for part in self.method.split("_"))

    def render(self) -> str:
        return f"{self.operation} {json.dumps(redacted(dict(self.params)), indent=2)}"


def name_problem(name: str) -> str | None:
    if _NAME_RE.match(name):
        return None
    return f"{name!r} is not a SageMaker name (letters, digits and '-', starting with a letter or digit, <= 63)"


def _hashed(base: str, content: Any) -> str:
    digest = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:10]
    return f"{base[: NAME_LIMIT - 11].rstrip('-')}-{digest}"


def environment(req: Request) -> dict[str, str]:
    """The container's environment: the caller's, plus LoRA serving for a base component with adapters."""
    env = dict(req.env)
    if req.adapters:
        env.setdefault("SM_VLLM_ENABLE_LORA", "true")
        env.setdefault("SM_VLLM_MAX_LORA_RANK", str(max(a.rank for a in req.adapters)))
    return env


def plan(req: Request) -> list[Call]:
    """Every call the deployment makes, in order."""
    container = {
        "Image": req.image,
        "ModelDataSource": {
            "S3DataSource": {"S3Uri": req.model_data, "S3DataType": "S3Prefix", "CompressionType": "None"}
        },
        "Environment": environment(req),
    }
    model_name = _hashed(req.endpoint, {"PrimaryContainer": container, "ExecutionRoleArn": req.role})
    model: dict[str, Any] = {"ModelName": model_name, "PrimaryContainer": container, "ExecutionRoleArn": req.role}
    variant: dict[str, Any] = {
        "VariantName": VARIANT,
        "InstanceType": req.instance_type,
        "InitialInstanceCount": req.instance_count,
    }
    config: dict[str, Any] = {"ProductionVariants": [variant]}
    if req.inference_components:
        variant["RoutingConfig"] = {"RoutingStrategy": "LEAST_OUTSTANDING_REQUESTS"}
        config["ExecutionRoleArn"] = req.role
    else:
        variant |= {
            "ModelName": model_name,
            "ModelDataDownloadTimeoutInSeconds": req.download_timeout_s,
            "ContainerStartupHealthCheckTimeoutInSeconds": req.startup_timeout_s,
        }
    config = {"EndpointConfigName": _hashed(req.endpoint, config), **config}
    calls = [
        Call("create_model", model),
        Call("create_endpoint_config", config),
        Call("create_endpoint", {"EndpointName": req.endpoint, "EndpointConfigName": config["EndpointConfigName"]}),
    ]
    if req.inference_components:
        calls += _components(req, model_name)
    return calls


def base_component(endpoint: str) -> str:
    return f"{endpoint[: NAME_LIMIT - 5]}-base"


def adapter_component(endpoint: str, adapter: str) -> str:
    return f"{endpoint}-{adapter}"[:NAME_LIMIT]


def _components(req: Request, model_name: str) -> list[Call]:
    resources: dict[str, Any] = {"MinMemoryRequiredInMb": req.memory_mb}
    if req.device == "cpu":
        resources["NumberOfCpuCoresRequired"] = 1
    else:
        resources["NumberOfAcceleratorDevicesRequired"] = req.devices
    base = {
        "InferenceComponentName": base_component(req.endpoint),
        "EndpointName": req.endpoint,
        "VariantName": VARIANT,
        "Specification": {
            "ModelName": model_name,
            "StartupParameters": {
                "ModelDataDownloadTimeoutInSeconds": req.download_timeout_s,
                "ContainerStartupHealthCheckTimeoutInSeconds": req.startup_timeout_s,
            },
            "ComputeResourceRequirements": resources,
        },
        "RuntimeConfig": {"CopyCount": req.instance_count},
    }
    calls = [Call("create_inference_component", base)]
    for adapter in req.adapters:
        spec = {
            "BaseInferenceComponentName": base["InferenceComponentName"],
            "Container": {"ArtifactUrl": adapter.artifact_url},
        }
        calls.append(
            Call(
                "create_inference_component",
                {
                    "InferenceComponentName": adapter_component(req.endpoint, adapter.name),
                    "EndpointName": req.endpoint,
                    "Specification": spec,
                },
            )
        )
    return calls


def redacted(value: Any, key: str = "") -> Any:
    """``value`` with the values of secret-looking environment keys replaced, for printing and logging."""
    if isinstance(value, Mapping):
        return {k: redacted(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [redacted(v) for v in value]
    if isinstance(value, str) and key and _SECRET_RE.search(key):
        return "***"
    return value


# ------------------------------------------------------------------------------------------------------- apply


def apply(client: Any, calls: list[Call], *, wait: bool, say: Callable[[str], None] = log.info) -> None:
    """Make the calls. Creating what exists already is skipped (names are content-hashed); the endpoint is created
    or moved onto the new configuration; inference components are created or updated, after the endpoint is
    in service (SageMaker places them only then)."""
    components = any(c.method == "create_inference_component" for c in calls)
    for call in calls:
        if call.method == "create_endpoint":
            _endpoint(client, call, say)
            if wait or components:
                say(f"waiting for endpoint {call.params['EndpointName']} to be InService")
                client.get_waiter("endpoint_in_service").wait(EndpointName=call.params["EndpointName"])
        elif call.method == "create_inference_component":
            _component(client, call, say)
        else:
            _create_once(client, call, say)
    if wait and components:
        for call in calls:
            if call.method == "create_inference_component":
                _wait_component(client, call.params["InferenceComponentName"], say)


def _error_code(exc: Exception) -> tuple[str, str]:
    response = getattr(exc, "response", None) or {}
    err = response.get("Error", {})
    return str(err.get("Code", "")), str(err.get("Message", ""))


def _create_once(client: Any, call: Call, say: Callable[[str], None]) -> None:
    from botocore.exceptions import ClientError

    name = next(v for k, v in call.params.items() if k.endswith("Name"))
    try:
        getattr(client, call.method)(**call.params)
    except ClientError as exc:
        code, message = _error_code(exc)
        if code == "ValidationException" and "already exist" in message:
            say(f"{call.operation}: {name} exists (same content), kept")
            return
        raise
    say(f"{call.operation}: {name}")


def _described(client: Any, method: str, **params: Any) -> dict[str, Any] | None:
    """``client.<method>(**params)``'s answer, or None where SageMaker says the resource does not exist."""
    from botocore.exceptions import ClientError

    try:
        return dict(getattr(client, method)(**params))
    except ClientError as exc:
        code, message = _error_code(exc)
        if code != "ValidationException" or "Could not find" not in message:
            raise
        return None


def _endpoint(client: Any, call: Call, say: Callable[[str], None]) -> None:
    name, config = call.params["EndpointName"], call.params["EndpointConfigName"]
    current = _described(client, "describe_endpoint", EndpointName=name)
    if current is None:
        client.create_endpoint(**call.params)
        say(f"CreateEndpoint: {name} on {config}")
        return
    if current.get("EndpointConfigName") == config:
        say(f"endpoint {name} is on {config} already, kept")
        return
    client.update_endpoint(EndpointName=name, EndpointConfigName=config)
    say(f"UpdateEndpoint: {name} onto {config}")


def _component(client: Any, call: Call, say: Callable[[str], None]) -> None:
    name = call.params["InferenceComponentName"]
    if _described(client, "describe_inference_component", InferenceComponentName=name) is None:
        client.create_inference_component(**call.params)
        say(f"CreateInferenceComponent: {name}")
        return
    update = {k: v for k, v in call.params.items() if k in ("InferenceComponentName", "Specification", "RuntimeConfig")}
    client.update_inference_component(**update)
    say(f"UpdateInferenceComponent: {name}")


def _wait_component(client: Any, name: str, say: Callable[[str], None], timeout_s: float = 3600) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        status = client.describe_inference_component(InferenceComponentName=name)
        state = status.get("InferenceComponentStatus")
        if state == "InService":
            say(f"inference component {name} is InService")
            return
        if state == "Failed":
            raise RuntimeError(f"inference component {name} failed: {status.get('FailureReason', 'no reason given')}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"inference component {name} is still {state} after {timeout_s:.0f} s")
        time.sleep(IC_POLL_S)
