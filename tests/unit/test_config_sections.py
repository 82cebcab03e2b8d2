"""sinkhole.yaml's `tcp` and `udp` sections: defaults, accepted values, and errors naming file, line
and field."""
import pytest

from resolver.config import PolicyError, TcpConfig, UdpConfig, load_config

HEAD = "upstreams: ['192.0.2.1']\n"


def load(tmp_path, text):
    path = tmp_path / "sinkhole.yaml"
    path.write_text(HEAD + text)
    return path, load_config(path)


def test_defaults(tmp_path):
    _, config = load(tmp_path, "")
    assert config.tcp == TcpConfig(max_connections=256, idle_timeout=10.0, max_queries=1000, max_lifetime=120.0)


def test_max_lifetime_is_read(tmp_path):
    _, config = load(tmp_path, "tcp:\n  idle_timeout: 5\n  max_lifetime: 30\n")
    assert (config.tcp.idle_timeout, config.tcp.max_lifetime, config.tcp.max_queries) == (5.0, 30.0, 1000)


@pytest.mark.parametrize("value, message", [
    ("0", "tcp.max_lifetime must be seconds > 0"),
    ("-5", "tcp.max_lifetime: -5 is not a valid float"),
    ("two minutes", "tcp.max_lifetime: 'two minutes' is not a valid float"),
    ("true", "tcp.max_lifetime: True is not a valid float"),
])
def test_bad_max_lifetime_names_file_line_and_field(tmp_path, value, message):
    assert problems(tmp_path, f"tcp:\n  max_connections: 10\n  max_lifetime: {value}\n") == [
        (str(tmp_path / "sinkhole.yaml"), 4, message)]


def problems(tmp_path, text):
    """(file, line, message) of each problem loading HEAD + text (it must fail)."""
    path = tmp_path / "sinkhole.yaml"
    path.write_text(HEAD + text)
    with pytest.raises(PolicyError) as e:
        load_config(path)
    return [(p.path, p.line, p.message) for p in e.value.problems]


def test_unknown_tcp_key_is_an_error(tmp_path):
    [(_, line, message)] = problems(tmp_path, "tcp:\n  max_lifetme: 30\n")
    assert line == 3 and "max_lifetme" in message


@pytest.mark.parametrize("value, expected", [("0", 0), ("5000", 5000), ("", 1 << 17)])
def test_cache_answers(tmp_path, value, expected):
    _, config = load(tmp_path, f"cache:\n  answers: {value}\n" if value else "")
    assert config.cache.answers == expected


def test_negative_cache_answers_names_file_line_and_field(tmp_path):
    [(path, line, message)] = problems(tmp_path, "cache:\n  size: 10\n  answers: -1\n")
    assert (path, line) == (str(tmp_path / "sinkhole.yaml"), 4)
    assert "cache.answers" in message


# -- udp ----------------------------------------------------------------------------------------
def test_default_batch_is_64(tmp_path):
    assert load(tmp_path, "")[1].udp == UdpConfig(batch=64)
    assert load(tmp_path, "udp: {}\n")[1].udp.batch == 64


@pytest.mark.parametrize("value", [1, 2, 1024])
def test_batch_is_read(tmp_path, value):
    assert load(tmp_path, f"udp:\n  batch: {value}\n")[1].udp.batch == value


@pytest.mark.parametrize("value, message", [
    ("0", "udp.batch must be a whole number from 1 to 1024"),
    ("1025", "udp.batch must be a whole number from 1 to 1024"),
    ("-1", "udp.batch: -1 is not a valid int"),
    ("x", "udp.batch: 'x' is not a valid int"),
    ("'64'", "udp.batch: '64' is not a valid int"),
    ("true", "udp.batch: True is not a valid int"),
    ("2.5", "udp.batch: 2.5 is not a valid int"),
])
def test_bad_batch_names_file_line_and_field(tmp_path, value, message):
    assert problems(tmp_path, f"tcp:\n  max_connections: 10\nudp:\n  batch: {value}\n") == [
        (str(tmp_path / "sinkhole.yaml"), 5, message)]


def test_unknown_udp_key_is_an_error(tmp_path):
    [(path, line, message)] = problems(tmp_path, "udp:\n  batch: 8\n  bach: 8\n")
    assert (path, line) == (str(tmp_path / "sinkhole.yaml"), 4)
    assert "'bach'" in message and "udp" in message


def test_udp_must_be_a_mapping(tmp_path):
    [(path, line, message)] = problems(tmp_path, "udp: 64\n")
    assert (path, line) == (str(tmp_path / "sinkhole.yaml"), 2)
    assert "'udp' must be a mapping" in message
