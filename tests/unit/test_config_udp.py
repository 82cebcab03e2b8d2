"""sinkhole.yaml's `udp` section: the default batch, accepted values, and errors naming file, line and field."""
import pytest

from resolver.config import PolicyError, UdpConfig, load_config

HEAD = "upstreams: ['192.0.2.1']\n"


def load(tmp_path, text):
    path = tmp_path / "sinkhole.yaml"
    path.write_text(HEAD + text)
    return load_config(path)


def test_default_batch_is_64(tmp_path):
    assert load(tmp_path, "").udp == UdpConfig(batch=64)
    assert load(tmp_path, "udp: {}\n").udp.batch == 64


@pytest.mark.parametrize("value", [1, 2, 1024])
def test_batch_is_read(tmp_path, value):
    assert load(tmp_path, f"udp:\n  batch: {value}\n").udp.batch == value


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
    path = tmp_path / "sinkhole.yaml"
    path.write_text(HEAD + f"tcp:\n  max_connections: 10\nudp:\n  batch: {value}\n")
    with pytest.raises(PolicyError) as e:
        load_config(path)
    assert [(p.path, p.line, p.message) for p in e.value.problems] == [(str(path), 5, message)]


def test_unknown_udp_key_is_an_error(tmp_path):
    path = tmp_path / "sinkhole.yaml"
    path.write_text(HEAD + "udp:\n  batch: 8\n  bach: 8\n")
    with pytest.raises(PolicyError) as e:
        load_config(path)
    [problem] = e.value.problems
    assert (problem.path, problem.line) == (str(path), 4)
    assert "'bach'" in problem.message and "udp" in problem.message


def test_udp_must_be_a_mapping(tmp_path):
    path = tmp_path / "sinkhole.yaml"
    path.write_text(HEAD + "udp: 64\n")
    with pytest.raises(PolicyError) as e:
        load_config(path)
    assert [(p.path, p.line) for p in e.value.problems] == [(str(path), 2)]
    assert "'udp' must be a mapping" in e.value.problems[0].message
