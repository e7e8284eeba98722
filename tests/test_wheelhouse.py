"""The device wheelhouse: platform tags, uv's resolution for the device (markers, extras, the
host's versions, offline against wheel files), the fit check, and real (small) builds for aarch64
from PyPI."""

from __future__ import annotations

import hashlib
import zipfile

import pytest
from packaging.utils import parse_wheel_filename

from gemma_edge.reach import wheelhouse
from gemma_edge.reach.device_platform import WheelhouseError, check_wheels_fit, device_platform, platform_tags, wheel_fits
from gemma_edge.reach.wheel_resolver import probe_index, unmet_requirements, uv_compile

PI5 = {"machine": "aarch64", "python": "3.11.2", "glibc": "2.36"}
X86 = {"machine": "x86_64", "python": "3.11.2", "glibc": "2.36"}


def test_device_platform_accepts_libc_ver_tuple_and_string():
    assert device_platform({"machine": "aarch64", "python": "3.11.2", "libc": ["glibc", "2.36"]}) == PI5
    assert device_platform({"machine": "aarch64", "python": "3.11.2", "libc": "glibc 2.36"}) == PI5
    assert device_platform({"machine": "aarch64", "python": "3.11.2", "libc": ("glibc", "2.36.1")})["glibc"] == "2.36"


@pytest.mark.parametrize(
    "facts, words",
    [
        ({"machine": "aarch64", "python": "3.11.2", "libc": ["", ""]}, "not glibc"),
        ({"machine": "aarch64", "python": "3.11.2", "libc": "musl 1.2.4"}, "not glibc"),
        ({"machine": "aarch64", "python": "2.7.18", "libc": "glibc 2.36"}, "not CPython 3"),
        ({"machine": "aarch64", "python": "3.10.13", "implementation": "PyPy", "libc": "glibc 2.36"}, "not CPython 3"),
        ({"python": "3.11.2", "libc": "glibc 2.36"}, "no machine"),
    ],
)
def test_device_platform_refuses_what_manylinux_cannot_serve(facts, words):
    with pytest.raises(WheelhouseError, match=words):
        device_platform(facts)


def test_platform_tags_cover_2_17_to_device_glibc_and_nothing_newer():
    tags = platform_tags(PI5)
    for minor in range(17, 37):
        assert f"manylinux_2_{minor}_aarch64" in tags
    assert "manylinux2014_aarch64" in tags and "linux_aarch64" in tags
    assert not [tag for tag in tags if tag.startswith("manylinux_2_") and int(tag.split("_")[2]) > 36]
    assert all(tag.endswith("_aarch64") for tag in tags)
    assert tags[0] == "manylinux_2_36_aarch64"  # newest first, as pip prefers


def test_wrong_platform_wheel_gives_one_sentence():
    with pytest.raises(WheelhouseError) as caught:
        check_wheels_fit(
            ["numpy-2.3.0-cp311-cp311-manylinux_2_28_aarch64.whl", "numpy-2.3.0-cp311-cp311-manylinux_2_28_x86_64.whl"], PI5
        )
    assert str(caught.value) == (
        "wheelhouse holds numpy-2.3.0-cp311-cp311-manylinux_2_28_x86_64.whl, built for manylinux_2_28_x86_64, "
        "which this device (aarch64, CPython 3.11, glibc 2.36) cannot install: rebuild the wheelhouse for it"
    )


def test_sdist_in_wheelhouse_is_refused():
    with pytest.raises(WheelhouseError, match="not a wheel"):
        check_wheels_fit(["somepkg-1.0.tar.gz"], PI5)


@pytest.mark.parametrize(
    "filename, fits",
    [
        ("six-1.17.0-py2.py3-none-any.whl", True),
        ("cryptography-44.0.0-cp39-abi3-manylinux_2_28_aarch64.whl", True),
        ("PyYAML-6.0.2-cp311-cp311-manylinux_2_17_aarch64.manylinux2014_aarch64.whl", True),
        ("torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_aarch64.whl", True),
        ("numpy-2.3.0-cp311-cp311-manylinux_2_39_aarch64.whl", False),  # newer glibc than the device
        ("numpy-2.3.0-cp312-cp312-manylinux_2_28_aarch64.whl", False),  # other Python
        ("numpy-2.3.0-cp311-cp311-musllinux_1_2_aarch64.whl", False),
        ("numpy-2.3.0-cp311-cp311-macosx_14_0_arm64.whl", False),
        ("not-a-wheel.tar.gz", False),
    ],
)
def test_wheel_fits(filename, fits):
    assert wheel_fits(filename, PI5) is fits


def test_unreachable_index_is_reported_not_raised():
    reachable, reason = probe_index("http://127.0.0.1:9/simple", timeout=2)
    assert not reachable and "127.0.0.1:9/simple/torch/" in reason


def test_build_small_wheelhouse_for_aarch64(tmp_path):
    """Real network: PyPI's pyyaml for the Pi 5, into a folder that already holds an old build."""
    out = tmp_path / "wheelhouse"
    out.mkdir()
    (out / "stale.whl").write_text("from an older build")
    record = wheelhouse.build_wheelhouse({"pyyaml": "6.0.2"}, PI5, out, torch_index=None)

    assert record["schema"] == "gemma-edge.wheelhouse/1" and record["platform"] == PI5
    [wheel] = record["wheels"]
    path = out / wheel["filename"]
    name, version, _, tags = parse_wheel_filename(wheel["filename"])
    assert (name, str(version)) == ("pyyaml", "6.0.2")
    assert all(tag.platform.endswith("_aarch64") and tag.platform.startswith("manylinux") for tag in tags)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == wheel["sha256"]
    assert path.stat().st_size == wheel["size_bytes"] == record["download_bytes"]
    with zipfile.ZipFile(path) as archive:
        assert wheel["installed_bytes"] == sum(info.file_size for info in archive.infolist()) > wheel["size_bytes"]
    assert not (out / "stale.whl").exists()  # replaced as a whole
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folders left
    assert sorted(p.name for p in out.iterdir()) == sorted([wheel["filename"], "requirements.lock", "wheelhouse.json"])
    assert wheelhouse.read_wheelhouse(out, PI5)["wheels"] == record["wheels"]


def test_build_fails_with_a_sentence_naming_the_requirement(tmp_path):
    out = tmp_path / "wheelhouse"
    with pytest.raises(
        WheelhouseError, match=r"no set of wheels of pyyaml==0\.0\.1 for this device \(aarch64, CPython 3\.11, glibc 2\.36\)"
    ):
        wheelhouse.build_wheelhouse({"pyyaml": "0.0.1"}, PI5, out, torch_index=None)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_sdist_only_pure_python_dependency_is_built_on_the_host(tmp_path):
    """omegaconf (hydra-core, executorch) pins antlr4-python3-runtime 4.9.*, which PyPI has only as an sdist."""
    record = wheelhouse.build_wheelhouse({"antlr4-python3-runtime": "4.9.3"}, PI5, tmp_path / "wh", torch_index=None)
    [wheel] = record["wheels"]
    assert wheel["source"] == "sdist built on host" and wheel["filename"].endswith("-py3-none-any.whl")
    assert wheel_fits(wheel["filename"], PI5)


def _fake_wheel(folder, name, version, requires=()):
    path = folder / f"{name}-{version}-py3-none-any.whl"
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{name}-{version}.dist-info/METADATA", metadata)
    return path


def _index(folder, packages: dict) -> str:
    """A find-links folder of fake pure-Python wheels: {"name==version": [Requires-Dist, ...]}."""
    folder.mkdir(exist_ok=True)
    for pin, requires in packages.items():
        _fake_wheel(folder, *pin.split("=="), requires)
    return str(folder)


APP = {
    "app==1.0": ["lib[fast]", "mid", 'x86only; platform_machine == "x86_64"', 'docs; extra == "docs"'],
    "lib==1.0": ['speedup; extra == "fast"', 'gpu; extra == "gpu"', 'other; extra == "other"'],
    "lib==2.0": ['speedup; extra == "fast"', 'gpu; extra == "gpu"', 'other; extra == "other"'],
    "mid==1.0": ["late"],
    "late==1.0": ["lib[gpu]>=1"],
    **{f"{name}==1.0": [] for name in ("speedup", "gpu", "other", "x86only", "docs")},
}


def test_uv_resolves_as_the_device_would_its_markers_and_the_extras_asked_for(tmp_path):
    """uv, offline on fake wheels: lib's extras asked for by app and (later) by late come in, the
    x86-only requirement stays out on the Pi and comes in on x86_64, unasked extras stay out."""
    links = ["--no-index", "--find-links", _index(tmp_path / "links", APP), "--offline"]
    on_pi = uv_compile({"app": "1.0"}, PI5, *links)
    assert sorted(on_pi) == ["app", "gpu", "late", "lib", "mid", "speedup"]
    assert on_pi["gpu"]["required_by"] == ["lib"] and on_pi["app"]["required_by"] == []
    assert on_pi["lib"]["version"] == "2.0"  # the newest, with no preference
    assert "x86only" in uv_compile({"app": "1.0"}, X86, *links)


def test_the_hosts_versions_are_preferred_where_they_fit(tmp_path):
    links = ["--no-index", "--find-links", _index(tmp_path / "links", APP), "--offline"]
    assert uv_compile({"app": "1.0"}, PI5, *links, preferences="lib==1.0\n")["lib"]["version"] == "1.0"
    assert uv_compile({"app": "1.0"}, PI5, *links, preferences="lib==0.5\n")["lib"]["version"] == "2.0"


def test_executorch_for_the_pi_leaves_out_coremltools_and_sklearn():
    """Real network: uv resolves executorch for aarch64 from PyPI (metadata only, nothing downloaded)."""
    on_pi = uv_compile({"executorch": "1.5.1"}, PI5)
    assert "coremltools" not in on_pi and "scikit-learn" not in on_pi
    assert {"numpy", "pandas", "torchao", "hydra-core"} <= set(on_pi)
    assert not {"tosa-tools", "ethos-u-vela", "openvino"} & set(on_pi)  # extras never asked for


def test_unmet_requirements_checks_the_files_as_the_device_would(tmp_path):
    paths = [
        _fake_wheel(tmp_path, "app", "1.0", ["lib[fast]>=1", 'x86only; platform_machine == "x86_64"']),
        _fake_wheel(tmp_path, "lib", "1.0", ['speedup; extra == "fast"']),
    ]
    assert "speedup" in unmet_requirements(paths, {"app": "1.0"}, PI5)
    paths.append(_fake_wheel(tmp_path, "speedup", "2.0"))
    assert unmet_requirements(paths, {"app": "1.0"}, PI5) is None
    assert "x86only" in unmet_requirements(paths, {"app": "1.0"}, X86)
    assert "app==2.0" in unmet_requirements(paths, {"app": "2.0"}, PI5)
    assert unmet_requirements(paths[1:], {"lib": "1.0"}, PI5) is None  # a wheel beside them is not used
