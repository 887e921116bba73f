"""The per-run Secret and Job dicts: names, labels, the secretKeyRef, counts and pod options."""

from __future__ import annotations

import json
from typing import Any

import pydantic
import pytest

from queuejob.flows.core.errors import InvalidInput
from queuejob.flows.core.manifest import (
    APP_LABEL,
    ITEMS_ANNOTATION,
    MANAGED_BY_LABEL,
    QUEUE_ANNOTATION,
    RUN_ID_LABEL,
    SECRET_KEY,
    JobSpec,
    build_job,
    build_secret,
    check_counts,
    check_dns1123_label,
    check_image,
    is_dns1123_label,
    job_name,
    redact_secret,
    run_labels,
    run_selector,
    run_suffix,
    secret_name,
)

RUN_ID = "3f2a9c1e-7b4d-4e8f-9a0b-1c2d3e4f5a6b"
PASSWORD = "s3cr3t-Pa55word"
BROKER_URL = f"amqp://queuejob:{PASSWORD}@rabbitmq.queues.svc:5672/%2F"
IMAGE = "registry.example.invalid/queuejob-worker:1.0"


def spec(**overrides: Any) -> JobSpec:
    values: dict[str, Any] = {"image": IMAGE, "command": ("sh", "-c", "cat > /dev/null")}
    values.update(overrides)
    return JobSpec(**values)


def job(spec_: JobSpec | None = None, *, completions: int | None = 3, **kw: Any) -> dict[str, Any]:
    return build_job(spec_ or spec(), run_id=RUN_ID, queue="work", completions=completions, **kw)


def pod_spec(job_: dict[str, Any]) -> dict[str, Any]:
    return job_["spec"]["template"]["spec"]


def container(job_: dict[str, Any]) -> dict[str, Any]:
    (only,) = pod_spec(job_)["containers"]
    return only


def env_by_name(job_: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container(job_)["env"]}


# --- names --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("run_id", "suffix"),
    [
        pytest.param(RUN_ID, "3f2a9c1e7b4d", id="uuid"),
        pytest.param("RUN-0002", "run0002", id="short-upper"),
        pytest.param("a_b.c d", "abcd", id="punctuation-dropped"),
    ],
)
def test_run_suffix(run_id: str, suffix: str) -> None:
    assert run_suffix(run_id) == suffix


@pytest.mark.parametrize("run_id", ["", "---", "___..."], ids=["empty", "dashes", "punctuation"])
def test_run_suffix_needs_letters_or_digits(run_id: str) -> None:
    with pytest.raises(InvalidInput, match="has no letters or digits"):
        run_suffix(run_id)


def test_job_and_secret_names() -> None:
    name = job_name("queuejob", RUN_ID)
    assert name == "queuejob-3f2a9c1e7b4d"
    assert secret_name(name) == "queuejob-3f2a9c1e7b4d-broker"
    assert is_dns1123_label(name)


def test_job_name_at_exactly_63_characters() -> None:
    name = job_name("p" * 50, RUN_ID)
    assert len(name) == 63
    assert is_dns1123_label(name)


def test_job_name_over_63_characters_is_rejected_with_the_room_left() -> None:
    with pytest.raises(InvalidInput) as info:
        job_name("p" * 51, RUN_ID)
    message = str(info.value)
    assert "64 characters, over Kubernetes' 63" in message
    assert "use a prefix of at most 50 characters" in message


def test_prefix_over_50_is_rejected_by_the_spec() -> None:
    with pytest.raises(pydantic.ValidationError, match="at most 50 characters"):
        spec(name_prefix="p" * 51)


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        pytest.param("default", True, id="plain"),
        pytest.param("a", True, id="one-char"),
        pytest.param("team-1", True, id="dash-digit"),
        pytest.param("0abc", True, id="leading-digit"),
        pytest.param("a" * 63, True, id="63-chars"),
        pytest.param("a" * 64, False, id="64-chars"),
        pytest.param("", False, id="empty"),
        pytest.param("Team", False, id="upper-case"),
        pytest.param("-team", False, id="leading-dash"),
        pytest.param("team-", False, id="trailing-dash"),
        pytest.param("team_a", False, id="underscore"),
        pytest.param("team.a", False, id="dot"),
        pytest.param("team\n", False, id="trailing-newline"),
        pytest.param("tëam", False, id="non-ascii"),
    ],
)
def test_dns1123_labels(value: str, ok: bool) -> None:
    assert is_dns1123_label(value) is ok
    if ok:
        assert check_dns1123_label(value, "namespace") == value
    else:
        with pytest.raises(InvalidInput, match=r"namespace .* is not a valid DNS-1123 label"):
            check_dns1123_label(value, "namespace")


@pytest.mark.parametrize("field", ["namespace", "name_prefix"])
@pytest.mark.parametrize(
    "value",
    ["Default", "my_ns", "-ns", "ns-", "ns\n", "", "a" * 64],
    ids=["upper", "underscore", "leading-dash", "trailing-dash", "newline", "empty", "64-chars"],
)
def test_spec_rejects_non_dns1123_namespace_and_prefix(field: str, value: str) -> None:
    with pytest.raises(pydantic.ValidationError) as info:
        spec(**{field: value})
    assert field in str(info.value)


def test_spec_accepts_63_char_namespace() -> None:
    assert spec(namespace="n" * 63).namespace == "n" * 63


# --- images -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "image",
    [
        "busybox",
        "python:3.11-slim",
        "library/python:3.11",
        IMAGE,
        "localhost:5000/team/worker:v1",
        "ghcr.io/org/sub/worker@sha256:" + "a" * 64,
        "ghcr.io/org/worker:1.2.3@sha256:" + "0" * 64,
        "Registry.Example.com/worker",
    ],
    ids=["bare", "tag", "namespaced", "registry", "port", "digest", "tag-digest", "host-case"],
)
def test_valid_images(image: str) -> None:
    assert check_image(image) == image
    assert spec(image=image).image == image


@pytest.mark.parametrize(
    "image",
    [
        "",
        "Worker:1.0",
        "org/Worker",
        "worker:",
        "worker:-bad",
        "worker:" + "t" * 129,
        "worker@sha256:abc",
        "worker bad",
        "org//worker",
        "worker:1.0\n",
        "worker:tåg",
        "a/" * 300 + "b",
    ],
    ids=[
        "empty",
        "upper-repo",
        "upper-path",
        "empty-tag",
        "tag-leading-dash",
        "tag-too-long",
        "short-digest",
        "space",
        "empty-component",
        "trailing-newline",
        "non-ascii-tag",
        "over-512",
    ],
)
def test_invalid_images(image: str) -> None:
    with pytest.raises(InvalidInput, match="is not a valid image reference"):
        check_image(image)
    with pytest.raises(pydantic.ValidationError, match="is not a valid image reference"):
        spec(image=image)


# --- labels ------------------------------------------------------------------------------------


def test_run_labels_and_selector() -> None:
    labels = run_labels(RUN_ID)
    assert labels == {APP_LABEL: "queuejob", MANAGED_BY_LABEL: "queuejob", RUN_ID_LABEL: RUN_ID}
    assert run_selector(RUN_ID) == (
        f"app.kubernetes.io/name=queuejob,app.kubernetes.io/managed-by=queuejob,"
        f"queuejob.io/run-id={RUN_ID}"
    )


@pytest.mark.parametrize(
    "run_id",
    ["run id with spaces", "r" * 64, "-leading", "trailing\n"],
    ids=["spaces", "64-chars", "leading-dash", "trailing-newline"],
)
def test_run_label_falls_back_to_suffix_when_not_a_label_value(run_id: str) -> None:
    assert run_labels(run_id)[RUN_ID_LABEL] == run_suffix(run_id)


def test_job_labels_everywhere_and_run_labels_win_over_extra_labels() -> None:
    extra = {"team": "data", RUN_ID_LABEL: "spoofed"}
    out = job(spec(labels=extra))
    expected = {"team": "data", **run_labels(RUN_ID)}
    assert out["metadata"]["labels"] == expected
    assert out["spec"]["template"]["metadata"]["labels"] == expected


# --- the Secret ---------------------------------------------------------------------------------


def test_secret_holds_the_url_under_the_key_the_job_references() -> None:
    secret = build_secret(namespace="ns", name="qj-broker", run_id=RUN_ID, broker_url=BROKER_URL)
    assert secret["kind"] == "Secret"
    assert secret["type"] == "Opaque"
    assert secret["metadata"] == {
        "name": "qj-broker",
        "namespace": "ns",
        "labels": run_labels(RUN_ID),
    }
    assert secret["stringData"] == {SECRET_KEY: BROKER_URL}


@pytest.mark.parametrize("field", ["stringData", "data"])
def test_redact_secret_hides_every_value_and_keeps_the_rest(field: str) -> None:
    secret = build_secret(namespace="ns", name="qj-broker", run_id=RUN_ID, broker_url=BROKER_URL)
    if field == "data":
        secret["data"] = {SECRET_KEY: "YW1xcDovL3NlY3JldA==", "OTHER": "eA=="}
        del secret["stringData"]
    redacted = redact_secret(secret)
    assert set(redacted[field]) == set(secret[field])
    assert set(redacted[field].values()) == {"<redacted>"}
    assert redacted["metadata"] == secret["metadata"]
    assert PASSWORD not in repr(redacted) and PASSWORD not in json.dumps(redacted)
    # The original is left alone: the caller still needs it to create the Secret.
    assert secret[field][SECRET_KEY] != "<redacted>"


# --- the Job ----------------------------------------------------------------------------------


def test_job_shape() -> None:
    out = job(completions=5, confirmed_items=5)
    assert out["apiVersion"] == "batch/v1"
    assert out["kind"] == "Job"
    assert out["metadata"]["name"] == job_name("queuejob", RUN_ID)
    assert out["metadata"]["namespace"] == "default"
    assert out["metadata"]["annotations"] == {QUEUE_ANNOTATION: "work", ITEMS_ANNOTATION: "5"}
    assert pod_spec(out)["restartPolicy"] == "Never"
    assert container(out)["name"] == "worker"
    assert container(out)["image"] == IMAGE


def test_broker_url_reaches_pods_only_through_secret_key_ref() -> None:
    out = job()
    broker = env_by_name(out)[SECRET_KEY]
    assert broker == {
        "name": SECRET_KEY,
        "valueFrom": {
            "secretKeyRef": {"name": secret_name(out["metadata"]["name"]), "key": SECRET_KEY}
        },
    }
    text = json.dumps(out)
    for secret_part in (BROKER_URL, PASSWORD, "amqp://"):
        assert secret_part not in text


def test_job_env_sets_queue_run_and_pod_name_then_user_env_sorted() -> None:
    out = job(spec(env={"ZED": "1", "ALPHA": "2"}))
    names = [e["name"] for e in container(out)["env"]]
    assert names == [SECRET_KEY, "QUEUE", "QUEUEJOB_RUN_ID", "POD_NAME", "ALPHA", "ZED"]
    env = env_by_name(out)
    assert env["QUEUE"]["value"] == "work"
    assert env["QUEUEJOB_RUN_ID"]["value"] == RUN_ID
    assert env["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["ALPHA"] == {"name": "ALPHA", "value": "2"}


@pytest.mark.parametrize("name", [SECRET_KEY, "QUEUE", "QUEUEJOB_RUN_ID", "POD_NAME"])
def test_reserved_env_names_are_rejected(name: str) -> None:
    with pytest.raises(pydantic.ValidationError, match=rf"env may not set \['{name}'\]"):
        spec(env={name: "x", "FINE": "y"})


@pytest.mark.parametrize(
    ("completions", "parallelism", "want_completions", "want_parallelism"),
    [
        pytest.param(8, 2, 8, 2, id="coarse-8-items-2-pods"),
        pytest.param(1, 2, 1, 1, id="parallelism-capped-at-completions"),
        pytest.param(3, 3, 3, 3, id="equal"),
        pytest.param(None, 4, None, 4, id="fine-mode-no-completions"),
    ],
)
def test_completions_and_parallelism_mapping(
    completions: int | None, parallelism: int, want_completions: int | None, want_parallelism: int
) -> None:
    out = job(spec(parallelism=parallelism), completions=completions)
    assert out["spec"].get("completions") == want_completions
    assert ("completions" in out["spec"]) is (want_completions is not None)
    assert out["spec"]["parallelism"] == want_parallelism


def test_backoff_deadline_and_ttl_mapping() -> None:
    out = job(spec(backoff_limit=0, active_deadline_seconds=600, ttl_seconds_after_finished=0))
    assert out["spec"]["backoffLimit"] == 0
    assert out["spec"]["activeDeadlineSeconds"] == 600
    assert out["spec"]["ttlSecondsAfterFinished"] == 0


def test_optional_fields_are_absent_by_default() -> None:
    out = job()
    assert out["spec"]["backoffLimit"] == 6
    for key in ("activeDeadlineSeconds", "ttlSecondsAfterFinished", "suspend"):
        assert key not in out["spec"]
    assert set(pod_spec(out)) == {"restartPolicy", "containers"}
    assert set(container(out)) == {"name", "image", "command", "env"}
    assert ITEMS_ANNOTATION not in out["metadata"]["annotations"]


def test_fine_mode_job() -> None:
    out = job(spec(mode="fine", parallelism=5, idle_timeout_seconds=2.5), completions=None)
    assert "completions" not in out["spec"]
    assert out["spec"]["parallelism"] == 5
    assert container(out)["command"][:6] == [
        "queuejob",
        "worker",
        "--mode",
        "fine",
        "--idle-timeout",
        "2.5",
    ]


@pytest.mark.parametrize(
    ("overrides", "tail"),
    [
        pytest.param({}, ["--", "sh", "-c", "cat > /dev/null"], id="command"),
        pytest.param(
            {"command": (), "call": "pkg.mod:handle"}, ["--call", "pkg.mod:handle"], id="call"
        ),
    ],
)
def test_worker_command(overrides: dict[str, Any], tail: list[str]) -> None:
    cmd = container(job(spec(**overrides)))["command"]
    assert cmd[:6] == ["queuejob", "worker", "--mode", "coarse", "--idle-timeout", "10"]
    assert cmd[6:] == tail


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({"command": ()}, id="neither-command-nor-call"),
        pytest.param({"call": "pkg.mod:fn"}, id="both-command-and-call"),
        pytest.param({"command": (), "call": "no-colon"}, id="call-without-colon"),
        pytest.param({"command": (), "call": "pkg.mod:fn\n"}, id="call-trailing-newline"),
        pytest.param({"command": (), "call": "pkg mod:fn"}, id="call-with-space"),
    ],
)
def test_command_or_call_rules(overrides: dict[str, Any]) -> None:
    with pytest.raises(pydantic.ValidationError):
        spec(**overrides)


def test_pod_options() -> None:
    toleration = {"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}
    resources = {"requests": {"cpu": "250m", "memory": "64Mi"}, "limits": {"memory": "128Mi"}}
    out = job(
        spec(
            resources=resources,
            service_account="queuejob-worker",
            image_pull_secrets=("regcred", "mirror"),
            image_pull_policy="IfNotPresent",
            node_selector={"pool": "batch"},
            tolerations=(toleration,),
        )
    )
    pod = pod_spec(out)
    assert container(out)["resources"] == resources
    assert container(out)["imagePullPolicy"] == "IfNotPresent"
    assert pod["serviceAccountName"] == "queuejob-worker"
    assert pod["imagePullSecrets"] == [{"name": "regcred"}, {"name": "mirror"}]
    assert pod["nodeSelector"] == {"pool": "batch"}
    assert pod["tolerations"] == [toleration]
    assert pod["restartPolicy"] == "Never"


def test_job_dict_is_independent_of_the_spec() -> None:
    s = spec(node_selector={"pool": "batch"}, resources={"limits": {"cpu": "1"}})
    out = job(s)
    pod_spec(out)["nodeSelector"]["pool"] = "changed"
    container(out)["resources"]["limits"]["cpu"] = "2"
    assert s.node_selector == {"pool": "batch"}
    assert s.resources == {"limits": {"cpu": "1"}}


def test_job_is_json_serialisable_and_deterministic() -> None:
    assert json.dumps(job(), sort_keys=True) == json.dumps(job(), sort_keys=True)


# --- counts -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("parallelism", "completions", "fragment"),
    [
        pytest.param(0, 3, "parallelism must be at least 1 (got 0)", id="parallelism-0"),
        pytest.param(-2, 3, "parallelism must be at least 1 (got -2)", id="parallelism-negative"),
        pytest.param(2, 0, "completions must be at least 1 (got 0)", id="completions-0"),
        pytest.param(2, -1, "completions must be at least 1 (got -1)", id="completions-negative"),
    ],
)
def test_check_counts_rejects(parallelism: int, completions: int, fragment: str) -> None:
    with pytest.raises(InvalidInput) as info:
        check_counts(parallelism=parallelism, completions=completions)
    assert fragment in str(info.value)


@pytest.mark.parametrize("completions", [1, 10_000, None], ids=["one", "many", "fine-mode"])
def test_check_counts_accepts(completions: int | None) -> None:
    check_counts(parallelism=1, completions=completions)


@pytest.mark.parametrize("completions", [0, -3], ids=["zero", "negative"])
def test_build_job_rejects_completions_below_one(completions: int) -> None:
    with pytest.raises(InvalidInput, match="use completions=auto"):
        job(completions=completions)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        pytest.param("parallelism", 0, id="parallelism-0"),
        pytest.param("parallelism", -1, id="parallelism-negative"),
        pytest.param("parallelism", 10_001, id="parallelism-too-many"),
        pytest.param("backoff_limit", -1, id="backoff-negative"),
        pytest.param("active_deadline_seconds", 0, id="deadline-0"),
        pytest.param("ttl_seconds_after_finished", -1, id="ttl-negative"),
        pytest.param("idle_timeout_seconds", 0, id="idle-0"),
        pytest.param("mode", "medium", id="unknown-mode"),
        pytest.param("image_pull_policy", "Sometimes", id="unknown-pull-policy"),
        pytest.param("unknown_field", 1, id="unknown-field"),
    ],
)
def test_spec_rejects_out_of_range_values(field: str, value: object) -> None:
    with pytest.raises(pydantic.ValidationError):
        spec(**{field: value})


def test_spec_is_frozen() -> None:
    s = spec()
    with pytest.raises(pydantic.ValidationError):
        s.parallelism = 5


def test_the_brokers_ca_is_mounted_from_the_template_block() -> None:
    from queuejob.blocks import WorkQueueJobTemplate
    from queuejob.flows.core.manifest import CA_FILE_ENV, CA_MOUNT_DIR, build_job

    template = WorkQueueJobTemplate(
        image="registry.example/queuejob:1", command=["cat"], broker_ca_configmap="rabbitmq-ca"
    )
    job = build_job(template.to_job_spec(), run_id="run-1", queue="jobs", completions=None)
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["volumes"] == [
        {
            "name": "broker-ca",
            "configMap": {"name": "rabbitmq-ca", "items": [{"key": "ca.crt", "path": "ca.crt"}]},
        }
    ]
    assert container["volumeMounts"] == [
        {"name": "broker-ca", "mountPath": CA_MOUNT_DIR, "readOnly": True}
    ]
    assert {"name": CA_FILE_ENV, "value": f"{CA_MOUNT_DIR}/ca.crt"} in container["env"]
    secret = WorkQueueJobTemplate(
        image="registry.example/queuejob:1",
        command=["cat"],
        broker_ca_secret="rabbitmq-tls",
        broker_ca_key="ca.pem",
    ).to_job_spec()
    volume = build_job(secret, run_id="r", queue="jobs", completions=None)["spec"]["template"]
    assert volume["spec"]["volumes"][0]["secret"] == {
        "secretName": "rabbitmq-tls",
        "items": [{"key": "ca.pem", "path": "ca.pem"}],
    }
    with pytest.raises(InvalidInput, match="not both"):
        template.to_job_spec(broker_ca_secret="rabbitmq-tls")
    plain = build_job(
        WorkQueueJobTemplate(image="registry.example/queuejob:1", command=["cat"]).to_job_spec(),
        run_id="run-1",
        queue="jobs",
        completions=None,
    )
    assert "volumes" not in plain["spec"]["template"]["spec"]
