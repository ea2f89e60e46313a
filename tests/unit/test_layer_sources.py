"""Which base a registry is asked for, which registries in which order, and each layer's source."""

import pytest

from runner.images import ImageInfo
from runner.layer_sources import Blob, RegistrySource, base_reference, plan_layers, source_urls
from runner.remote_scripts.registry_fetch import parse_reference, registry_url
from runner.spec import ImageSpec

pytestmark = pytest.mark.unit
DIGEST = "sha256:" + "ab" * 32


def image_spec(**registry) -> ImageSpec:
    return ImageSpec.model_validate({"ref": "sha256:" + "0" * 64, "registry": registry})


@pytest.mark.parametrize(
    ("ref", "parts"),
    [
        ("python:3.11", ("registry-1.docker.io", "library/python", "3.11")),
        ("pytorch/pytorch", ("registry-1.docker.io", "pytorch/pytorch", "latest")),
        ("docker.io/pytorch/pytorch:2.5", ("registry-1.docker.io", "pytorch/pytorch", "2.5")),
        ("10.0.0.2:5000/base/torch:1", ("10.0.0.2:5000", "base/torch", "1")),
        (f"ghcr.io/org/img@{DIGEST}", ("ghcr.io", "org/img", DIGEST)),
        ("localhost/x:y", ("localhost", "x", "y")),
    ],
)
def test_references_read_as_docker_reads_them(ref, parts):
    assert parse_reference(ref) == parts


def test_plain_http_only_for_loopback_and_listed_registries():
    assert registry_url("127.0.0.1:5000", []) == "http://127.0.0.1:5000"
    assert registry_url("10.0.0.2:5000", []) == "https://10.0.0.2:5000"
    assert registry_url("10.0.0.2:5000", ["10.0.0.2:5000"]) == "http://10.0.0.2:5000"


def test_the_spec_base_wins_then_the_pulled_digest_then_a_named_registry():
    pulled = ImageInfo(ref="pytorch/pytorch:2.5", id="x", repo_digests=(f"pytorch/pytorch@{DIGEST}",))
    assert base_reference(image_spec(base="org/other:1"), pulled) == "org/other:1"
    assert base_reference(image_spec(), pulled) == f"pytorch/pytorch@{DIGEST}"  # exactly what was built on
    named = ImageInfo(ref="10.0.0.2:5000/base/torch:1", id="x")
    assert base_reference(image_spec(), named) == "10.0.0.2:5000/base/torch:1"


def test_a_locally_made_base_asks_no_registry():
    local = ImageInfo(ref="runner-base/torch-cpu:2.13.0", id="x")
    assert base_reference(image_spec(), local) is None


def test_a_pinned_ref_with_a_repository_is_its_own_base():
    spec = ImageSpec.model_validate({"ref": f"org/img@{DIGEST}"})
    assert base_reference(spec, None) == f"org/img@{DIGEST}"
    assert base_reference(image_spec(), None) is None  # sha256:<id> alone names no repository


def test_sources_are_the_job_mirrors_then_the_provider_mirrors_then_upstream_once_each():
    settings = image_spec(mirrors=["https://m1.example.com/", "https://m2.example.com"]).registry
    urls = source_urls("pytorch/pytorch:2.5", settings, ["https://m2.example.com", "https://m3.example.com"])
    assert urls == (
        "https://m1.example.com",
        "https://m2.example.com",
        "https://m3.example.com",
        "https://registry-1.docker.io",
    )


def test_each_layer_gets_one_source_in_image_order():
    blob = Blob("sha256:" + "cd" * 32, 40, "application/vnd.oci.image.layer.v1.tar+gzip")
    source = RegistrySource(
        ref="r/base:1", repository="r/base", manifest_digest=DIGEST, config_digest=DIGEST,
        sources=("https://r",), blobs={"sha256:b": blob}, resolved_at="r",
    )  # fmt: skip
    planned = plan_layers(
        ("sha256:a", "sha256:b", "sha256:c", "sha256:b"), (10, 100, 1, 100), source, present={"sha256:a"}
    )
    assert [(p.diff_id, p.source, p.fetch_bytes) for p in planned] == [
        ("sha256:a", "instance", 0),
        ("sha256:b", "registry-1.docker.io", 40),
        ("sha256:c", "laptop", 0),
    ]


def test_credentials_are_named_in_pairs():
    with pytest.raises(ValueError, match="both username_env and password_env"):
        image_spec(username_env="REG_USER")
