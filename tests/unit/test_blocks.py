"""The Prefect blocks: the broker URL and its secrecy, the job template against JobSpec.

The models are tested directly; one test saves and loads both blocks through Prefect's ephemeral
API (marked ``prefect``), and one connects to the real broker with the URL a block builds.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import uuid
from typing import Any
from urllib.parse import quote

import annotated_types
import pika
import pydantic
import pytest
import yaml
from pydantic import SecretStr

from queuejob.blocks import RabbitMQBroker, WorkQueueJobTemplate
from queuejob.flows.cli import main as cli_main
from queuejob.flows.core.errors import ConfigError, InvalidInput
from queuejob.flows.core.manifest import JobSpec, build_job

PASSWORD = "s3cr3t:p@ss/w0rd%"  # characters that need percent-encoding in a URL
ENCODED = quote(PASSWORD, safe="")
HOST = "rabbitmq-service.batch.svc"
CA = "/etc/ssl/certs/ca-certificates.crt"


def broker(**kw: Any) -> RabbitMQBroker:
    values: dict[str, Any] = {"host": HOST, "username": "queuejob", "password": PASSWORD}
    values.update(kw)
    return RabbitMQBroker(**values)


# --- RabbitMQBroker: metadata ----------------------------------------------------------------


def test_broker_block_metadata() -> None:
    assert RabbitMQBroker.get_block_type_slug() == "rabbitmq-broker"
    assert RabbitMQBroker.get_block_type_name() == "RabbitMQ Broker"
    assert RabbitMQBroker.get_description()
    schema = RabbitMQBroker.model_json_schema()
    assert schema["secret_fields"] == ["password"]
    assert schema["properties"]["password"]["format"] == "password"
    missing = [n for n, p in schema["properties"].items() if not p.get("description")]
    assert missing == []


def test_broker_defaults() -> None:
    b = RabbitMQBroker(host="h", password="pw")
    assert (b.port, b.vhost, b.username, b.tls, b.ca_file) == (5672, "/", "guest", False, None)


# --- RabbitMQBroker: url ---------------------------------------------------------------------


def test_url_encodes_credentials_and_default_vhost() -> None:
    url = broker().url()
    assert url.startswith(f"amqp://queuejob:{ENCODED}@{HOST}:5672/%2F?")
    params = pika.URLParameters(url)
    assert params.host == HOST
    assert params.port == 5672
    assert params.virtual_host == "/"
    assert params.credentials.username == "queuejob"
    assert params.credentials.password == PASSWORD
    assert params.ssl_options is None


@pytest.mark.parametrize("vhost", ["/", "team-a", "team/a", "a b%c"])
def test_url_vhost_round_trips_through_pika(vhost: str) -> None:
    assert pika.URLParameters(broker(vhost=vhost).url()).virtual_host == vhost


def test_url_carries_heartbeat_and_timeouts() -> None:
    params = pika.URLParameters(broker(heartbeat_s=15, connect_timeout_s=2.5).url())
    assert params.heartbeat == 15
    assert params.socket_timeout == 2.5
    assert params.stack_timeout == 5.0


def test_tls_url_uses_amqps_and_the_ca_file() -> None:
    b = broker(tls=True, port=5671, ca_file=CA)
    url = b.url()
    assert url.startswith("amqps://")
    params = pika.URLParameters(url)
    assert params.port == 5671
    assert params.ssl_options is not None
    ctx = params.ssl_options.context
    assert ctx.check_hostname and ctx.verify_mode.name == "CERT_REQUIRED"
    # Only the given CA bundle is loaded, not an empty context.
    assert ctx.cert_store_stats()["x509_ca"] > 0


def test_tls_without_ca_uses_system_trust() -> None:
    params = pika.URLParameters(broker(tls=True).url())
    assert params.ssl_options is not None
    assert "ssl_options" not in broker(tls=True).url()


def test_ipv6_host_is_bracketed() -> None:
    b = broker(host="fd00::10")
    assert "@[fd00::10]:5672/" in b.url()
    assert pika.URLParameters(b.url()).host == "fd00::10"
    assert RabbitMQBroker.from_url(b.url()) == b


# --- RabbitMQBroker: the password never shows ------------------------------------------------


def _shown(b: RabbitMQBroker) -> list[str]:
    return [
        repr(b),
        str(b),
        f"{b}",
        b.redacted_url(),
        b.endpoint(),
        repr(b.model_dump()),
        b.model_dump_json(),
        json.dumps(b.model_dump(mode="json")),
        repr(b.model_dump(mode="json")),
    ]


@pytest.mark.parametrize("tls", [False, True])
def test_password_is_hidden_everywhere_but_url(tls: bool) -> None:
    b = broker(tls=tls, ca_file=CA if tls else None)
    assert PASSWORD in RabbitMQBroker.from_url(b.url()).password.get_secret_value()
    for text in _shown(b):
        assert PASSWORD not in text
        assert ENCODED not in text  # nor its URL-encoded form
    assert "queuejob:***@" in b.redacted_url()
    assert b.redacted_url() == b.url().replace(ENCODED, "***")


def test_password_hidden_in_logs(caplog: pytest.LogCaptureFixture) -> None:
    b = broker()
    with caplog.at_level(logging.INFO):
        logging.getLogger("queuejob.test").info("broker %s / %r", b, b)
    assert HOST in caplog.text
    assert PASSWORD not in caplog.text


def test_validation_error_does_not_quote_the_password() -> None:
    with pytest.raises(pydantic.ValidationError) as info:
        broker(port=0, tls=False, ca_file=CA)
    assert PASSWORD not in str(info.value)
    assert "port" in str(info.value)


def test_ca_file_rules() -> None:
    with pytest.raises(pydantic.ValidationError, match="turn tls on or clear ca_file"):
        broker(ca_file=CA)
    with pytest.raises(pydantic.ValidationError, match="absolute path"):
        broker(tls=True, ca_file="certs/ca.pem")


@pytest.mark.parametrize(
    "host", ["amqp://h", "user@h", "h:5672", "h/vhost", "", "host name", "h\n"]
)
def test_host_must_be_only_a_host(host: str) -> None:
    with pytest.raises(pydantic.ValidationError):
        broker(host=host)


def test_empty_password_rejected() -> None:
    with pytest.raises(pydantic.ValidationError):
        broker(password="")


# --- RabbitMQBroker.from_url -----------------------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"vhost": "team/a", "port": 15672},
        {"tls": True, "port": 5671},
        {"tls": True, "ca_file": CA, "heartbeat_s": 0, "connect_timeout_s": 0.5},
        {"username": "ü ser", "host": "10.0.0.7"},
    ],
)
def test_from_url_round_trips(kw: dict[str, Any]) -> None:
    b = broker(**kw)
    back = RabbitMQBroker.from_url(b.url())
    assert back == b
    assert back.password.get_secret_value() == PASSWORD


def test_from_url_defaults_and_overrides() -> None:
    b = RabbitMQBroker.from_url("amqp://rabbit")
    assert (b.host, b.port, b.vhost, b.username) == ("rabbit", 5672, "/", "guest")
    assert b.password.get_secret_value() == "guest"  # what pika assumes without credentials
    tls = RabbitMQBroker.from_url("AMQPS://u:p@rabbit/jobs")
    assert (tls.tls, tls.port, tls.vhost) == (True, 5671, "jobs")
    over = RabbitMQBroker.from_url("amqp://u:p@rabbit:5673/%2F", heartbeat_s=5, vhost="v")
    assert (over.port, over.heartbeat_s, over.vhost) == (5673, 5, "v")


def test_from_url_accepts_the_test_broker_style_url() -> None:
    b = RabbitMQBroker.from_url("amqp://guest:guest@127.0.0.1:54869/%2F")
    assert (b.host, b.port, b.vhost) == ("127.0.0.1", 54869, "/")


@pytest.mark.parametrize(
    ("url", "match"),
    [
        (f"http://u:{ENCODED}@h/", "scheme 'http'"),
        (f"redis://u:{ENCODED}@h/", "scheme"),
        (f"amqp://u:{ENCODED}@/", "no host"),
        ("amqp://u@h/", "no password"),
        (f"amqp://u:{ENCODED}@h:99999/", "malformed"),
        (f"amqp://u:{ENCODED}@h:port/", "malformed"),
        (f"amqp://u:{ENCODED}@h/a/b", "unencoded '/'"),
        (f"amqp://u:{ENCODED}@h/?channel_max=9", "channel_max"),
        (f"amqp://u:{ENCODED}@h/?heartbeat=1&heartbeat=2", "repeats"),
        (f"amqp://u:{ENCODED}@h/?heartbeat=-1", "heartbeat_s"),
        (f"amqp://u:{ENCODED}@h/?heartbeat=often", "heartbeat_s"),
        (f"amqp://u:{ENCODED}@h/?ssl_options=%7B%27ca_certs%27%3A%27%2Fx%27%7D", "amqps"),
        (f"amqps://u:{ENCODED}@h/?ssl_options=None", "ssl_options=None"),
        (f"amqps://u:{ENCODED}@h/?ssl_options=%7B%27certfile%27%3A%27%2Fx%27%7D", "only"),
        (f"amqps://u:{ENCODED}@h/?ssl_options=nonsense(", "only"),
        # Unencoded credentials: whatever urlsplit makes of them, no part is echoed.
        ("amqp://u:s3cr3t/pw@h/", "'@' after the host"),
        ("amqp://us/er:s3cr3t@h/", "'@' after the host"),
        ("amqp://u:s3cr3t?x@h/", "'@' after the host"),
        ("amqp://u:s3cr3t#x@h/", "'@' after the host"),
        ("amqp://u:s3cr3t", "malformed"),
    ],
)
def test_from_url_errors_name_the_problem_not_the_password(url: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        RabbitMQBroker.from_url(url)
    text = str(info.value)
    assert "s3cr3t" not in text
    # The pydantic error (which quotes inputs) is not chained onto the ConfigError.
    assert info.value.__cause__ is None


@pytest.mark.broker
def test_block_url_connects_to_the_real_broker(broker_url: str) -> None:
    b = RabbitMQBroker.from_url(broker_url, heartbeat_s=10, connect_timeout_s=5)
    conn = pika.BlockingConnection(pika.URLParameters(b.url()))
    try:
        assert conn.is_open
        channel = conn.channel()
        assert channel.is_open
    finally:
        conn.close()


# --- WorkQueueJobTemplate --------------------------------------------------------------------


def _bounds(field: Any) -> set[Any]:
    return {
        m
        for m in field.metadata
        if isinstance(
            m,
            (
                annotated_types.Ge,
                annotated_types.Gt,
                annotated_types.Le,
                annotated_types.Lt,
                annotated_types.MaxLen,
                annotated_types.MinLen,
            ),
        )
    }


def test_template_block_metadata() -> None:
    assert WorkQueueJobTemplate.get_block_type_slug() == "work-queue-job-template"
    assert WorkQueueJobTemplate.get_description()
    schema = WorkQueueJobTemplate.model_json_schema()
    missing = [n for n, p in schema["properties"].items() if not p.get("description")]
    assert missing == []
    assert schema.get("secret_fields", []) == []


def test_the_template_form_shows_the_start_settings_with_their_defaults() -> None:
    props = WorkQueueJobTemplate.model_json_schema()["properties"]
    grace, timeout = props["start_grace_seconds"], props["start_timeout_seconds"]
    assert (grace["default"], grace["minimum"]) == (60.0, 0)
    assert (timeout["default"], timeout["minimum"]) == (600.0, 0)
    assert "InvalidImageName" in grace["description"]
    assert "0: wait for the run's timeout" in timeout["description"]
    # On the form beside the other Job settings, in the fields' order.
    order = list(props)
    assert order.index("start_grace_seconds") + 1 == order.index("start_timeout_seconds")


def test_template_has_every_jobspec_field_with_the_same_bounds_and_defaults() -> None:
    tpl_fields = WorkQueueJobTemplate.model_fields
    assert set(tpl_fields) == set(JobSpec.model_fields)
    tpl = WorkQueueJobTemplate(image="busybox", command=["cat"])
    spec = JobSpec(image="busybox", command=("cat",))
    for name, field in JobSpec.model_fields.items():
        assert _bounds(field) <= _bounds(tpl_fields[name]), name
        assert field.is_required() == tpl_fields[name].is_required(), name
        got = getattr(tpl, name)
        want = getattr(spec, name)
        assert (list(got) if isinstance(got, list) else got) == (
            list(want) if isinstance(want, tuple) else want
        ), name


def test_to_job_spec_defaults_and_overrides() -> None:
    tpl = WorkQueueJobTemplate(
        image="registry.example.com/team/worker:1.0",
        command=["python", "/app/process.py"],
        namespace="batch",
        parallelism=4,
        tolerations=[{"key": "batch", "operator": "Exists", "effect": "NoSchedule"}],
        image_pull_secrets=["regcred"],
    )
    spec = tpl.to_job_spec()
    assert isinstance(spec, JobSpec)
    assert spec.command == ("python", "/app/process.py")
    assert spec.tolerations == ({"key": "batch", "operator": "Exists", "effect": "NoSchedule"},)
    assert spec.image_pull_secrets == ("regcred",)
    over = tpl.to_job_spec(parallelism=8, namespace=None, image=None, backoff_limit=0)
    assert (over.parallelism, over.namespace, over.backoff_limit) == (8, "batch", 0)
    assert over.image == tpl.image  # None overrides are ignored
    # The block itself is unchanged.
    assert tpl.parallelism == 4


def test_to_job_spec_command_and_call_replace_each_other() -> None:
    by_command = WorkQueueJobTemplate(image="busybox", command=["cat"])
    called = by_command.to_job_spec(call="mypkg.work:handle")
    assert (called.call, called.command) == ("mypkg.work:handle", ())
    by_call = WorkQueueJobTemplate(image="busybox", call="mypkg.work:handle")
    commanded = by_call.to_job_spec(command=["sh", "-c", "cat"])
    assert (commanded.call, commanded.command) == (None, ("sh", "-c", "cat"))
    # A template without either gets it per run.
    bare = WorkQueueJobTemplate(image="busybox")
    assert bare.to_job_spec(command=["cat"]).command == ("cat",)


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        ({"parallelism": 0}, ["parallelism", "greater than or equal to 1", "got 0"]),
        ({"namespace": "Bad_NS"}, ["namespace", "DNS-1123"]),
        ({"image": "Not An Image"}, ["image", "not a valid image reference"]),
        ({"env": {"QUEUE": "x"}}, ["env", "QUEUE"]),
        ({"call": "not a callable"}, ["package.module:function"]),
        ({"idle_timeout_seconds": 0}, ["idle_timeout_seconds", "greater than 0"]),
    ],
)
def test_to_job_spec_invalid_values_raise_readable_invalid_input(
    overrides: dict[str, Any], words: list[str]
) -> None:
    tpl = WorkQueueJobTemplate(image="busybox", command=["cat"])
    with pytest.raises(InvalidInput) as info:
        tpl.to_job_spec(**overrides)
    text = str(info.value)
    for word in words:
        assert word in text
    assert "Value error," not in text
    assert "errors.pydantic.dev" not in text


def test_to_job_spec_without_command_or_call_says_so() -> None:
    with pytest.raises(InvalidInput, match="exactly one of 'command'"):
        WorkQueueJobTemplate(image="busybox").to_job_spec()


def test_to_job_spec_unknown_override_and_block_name_in_message() -> None:
    tpl = WorkQueueJobTemplate(image="busybox", command=["cat"])
    with pytest.raises(InvalidInput, match=r"cannot override \['completions'\]"):
        tpl.to_job_spec(completions=3)
    tpl._block_document_name = "nightly-render"
    with pytest.raises(InvalidInput, match="job template 'nightly-render'"):
        tpl.to_job_spec(parallelism=0)


def test_template_rejects_misspelt_fields() -> None:
    with pytest.raises(pydantic.ValidationError, match="paralelism"):
        WorkQueueJobTemplate(image="busybox", command=["cat"], paralelism=3)


def test_template_field_bounds_checked_on_the_block() -> None:
    with pytest.raises(pydantic.ValidationError):
        WorkQueueJobTemplate(image="busybox", command=["cat"], parallelism=0)
    with pytest.raises(pydantic.ValidationError):
        WorkQueueJobTemplate(image="busybox", command=["cat"], namespace="Not-Valid")


def test_template_round_trips_through_its_own_dump() -> None:
    tpl = WorkQueueJobTemplate(image="busybox", command=["cat"], env={"A": "1"})
    dumped = tpl.model_dump()
    assert dumped["block_type_slug"] == "work-queue-job-template"
    back = WorkQueueJobTemplate.model_validate(dumped)
    # Prefect keeps its block_type_slug key as an extra, so compare the dumps, not the objects.
    assert back.model_dump() == dumped
    assert back.to_job_spec() == tpl.to_job_spec()


def test_template_feeds_the_job_builder() -> None:
    tpl = WorkQueueJobTemplate(
        image="busybox",
        command=["cat"],
        resources={"limits": {"memory": "64Mi"}},
        node_selector={"pool": "batch"},
    )
    job = build_job(tpl.to_job_spec(), run_id=str(uuid.uuid4()), queue="job1", completions=3)
    pod = job["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"pool": "batch"}
    assert pod["containers"][0]["resources"] == {"limits": {"memory": "64Mi"}}
    assert pod["containers"][0]["command"][-2:] == ["--", "cat"]


# --- through the Prefect API -----------------------------------------------------------------


@pytest.mark.prefect
@pytest.mark.slow
def test_blocks_save_and_load_through_the_prefect_api() -> None:
    suffix = uuid.uuid4().hex[:8]
    b = broker(tls=True, ca_file=CA, vhost="team/a", hosts=["rabbit-1", "rabbit-2:5673"])
    tpl = WorkQueueJobTemplate(
        image="busybox",
        command=["cat"],
        tolerations=[{"key": "k", "operator": "Exists"}],
        broker_ca_configmap="rabbitmq-ca",
    )
    names = (f"qj-test-broker-{suffix}", f"qj-test-template-{suffix}")
    try:
        b.save(names[0])
        tpl.save(names[1])
        loaded_b = RabbitMQBroker.load(names[0])
        loaded_tpl = WorkQueueJobTemplate.load(names[1])
        # `queuejob render --template-block` shows the Job the block makes, CA volume included.
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert cli_main(["render", "--template-block", names[1], "--", "cat"]) == 0
        _secret, job = yaml.safe_load_all(out.getvalue())
    finally:
        for cls, name in ((RabbitMQBroker, names[0]), (WorkQueueJobTemplate, names[1])):
            # Cleanup only: a failed save or load is reported by the assertions below.
            with contextlib.suppress(Exception):
                cls.delete(name)
    assert isinstance(loaded_b.password, SecretStr)
    assert loaded_b.password.get_secret_value() == PASSWORD
    assert loaded_b.url() == b.url()
    assert PASSWORD not in repr(loaded_b)
    assert loaded_tpl == tpl
    assert loaded_tpl.to_job_spec() == tpl.to_job_spec()
    assert loaded_b.hosts == ["rabbit-1", "rabbit-2:5673"]
    pod = job["spec"]["template"]["spec"]
    assert pod["volumes"][0]["configMap"]["name"] == "rabbitmq-ca"
    assert pod["containers"][0]["image"] == "busybox"
    with pytest.raises(InvalidInput, match=f"job template '{names[1]}'"):
        loaded_tpl.to_job_spec(parallelism=0)


def test_broker_block_with_several_hosts_names_each_node_in_its_url() -> None:
    from queuejob.flows.adapters.broker import BrokerConfig

    blk = broker(host="rabbit-0", hosts=["rabbit-1", "[fd00::2]:5673"])
    assert blk.endpoint() == "rabbit-0:5672,rabbit-1:5672,[fd00::2]:5673/%2F"
    cfg = BrokerConfig(blk.url())
    assert [str(e) for e in cfg.endpoints] == ["rabbit-0:5672", "rabbit-1:5672", "[fd00::2]:5673"]
    again = RabbitMQBroker.from_url(blk.url())
    assert (again.host, again.hosts) == ("rabbit-0", ["rabbit-1:5672", "[fd00::2]:5673"])
    assert "***" in blk.redacted_url() and blk.password.get_secret_value() not in repr(blk)
    for bad in (["http://x"], ["a:b"], ["h:70000"]):
        with pytest.raises(ValueError, match="hosts entry"):
            broker(hosts=bad)
