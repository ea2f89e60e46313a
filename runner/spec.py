"""The job spec: job.yaml turned into a validated, immutable object.

Every problem is reported at once, one line each, naming the field and the YAML line,
so a user fixes a spec in one pass instead of one error per run. The format is documented
field by field in docs/job-spec.md; keep the two in step.
"""

from __future__ import annotations

import hashlib
import posixpath
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from runner.errors import SpecError

SPEC_VERSION = 1
MAX_SPEC_BYTES = 1 << 20  # a job spec is a page of YAML; anything far larger is a wrong file
OUT_ROOT = "/out"


def _matching(pattern: str, what: str) -> AfterValidator:
    """A validator whose error says in words what the value must look like."""
    compiled = re.compile(pattern)

    def check(value: str) -> str:
        if not compiled.fullmatch(value):
            raise ValueError(f"must be {what}, got {value[:80]!r}")
        return value

    return AfterValidator(check)


Name = Annotated[
    str,
    _matching(
        r"(?=.{1,63}$)[a-z0-9]+([._-][a-z0-9]+)*",
        "1-63 lowercase letters and digits, single '.', '_' or '-' between them",
    ),
]
EnvName = Annotated[
    str, _matching(r"[A-Za-z_][A-Za-z0-9_]{0,127}", "an environment variable name ([A-Za-z_][A-Za-z0-9_]*)")
]
Sha256 = Annotated[str, _matching(r"[0-9a-f]{64}", "a sha256 of 64 lowercase hex digits")]
ImageRef = Annotated[
    str,
    _matching(
        r"([a-z0-9][a-z0-9._/:-]{0,254}@)?sha256:[0-9a-f]{64}", "NAME@sha256:<digest> or sha256:<image id>"
    ),
]
ImageTag = Annotated[
    str, _matching(r"[a-z0-9][a-z0-9._/-]{0,127}(:[\w.-]{1,128})?", "an image tag like name:tag")
]
RegistryHost = Annotated[
    str, _matching(r"[A-Za-z0-9.-]{1,253}(:[0-9]{1,5})?", "a registry host like registry.example.com:5000")
]
BaseRef = Annotated[
    str,
    _matching(
        r"([A-Za-z0-9.-]{1,253}(:[0-9]{1,5})?/)?[a-z0-9]+([._/-][a-z0-9]+)*(:[\w.-]{1,128})?(@sha256:[0-9a-f]{64})?",
        "an image reference like pytorch/pytorch:2.5.1 or registry.example.com/name@sha256:<digest>",
    ),
]
MirrorUrl = Annotated[
    str,
    _matching(
        r"https?://[A-Za-z0-9.-]{1,253}(:[0-9]{1,5})?/?", "a registry URL like https://mirror.example.com"
    ),
]
Currency = Annotated[str, _matching(r"[A-Z]{3}", "a 3-letter currency code like CNY")]
Script = Annotated[str, StringConstraints(min_length=1, max_length=65536)]
Money = Annotated[float, Field(ge=0, le=1e9)]


def _out_path(value: str) -> str:
    """Normalise an output path and refuse anything that escapes /out."""
    if any(c in value for c in "\x00\\\n\r") or ".." in value.split("/"):
        raise ValueError(f"must be a path under {OUT_ROOT} without '..' or control characters")
    norm = posixpath.normpath(value)
    if not (norm == OUT_ROOT or norm.startswith(OUT_ROOT + "/")):
        raise ValueError(f"must be a path under {OUT_ROOT}, got {value[:80]!r}")
    return norm


OutPath = Annotated[str, AfterValidator(_out_path)]


class Strict(BaseModel):
    """Unknown keys are errors: a typo must never be silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class LocalProvider(Strict):
    """This machine's Docker engine; no instance, no SSH."""

    type: Literal["local"]


HostName = Annotated[
    str, _matching(r"[A-Za-z0-9]([A-Za-z0-9.:-]{0,252}[A-Za-z0-9])?", "a host name or IP address")
]
UserName = Annotated[str, _matching(r"[a-z_][a-z0-9_.-]{0,31}", "a user name like root")]


def _remote_dir(value: str) -> str:
    """An absolute remote folder, normalised, without '..' or control characters."""
    if not value.startswith("/") or ".." in value.split("/") or any(ord(c) < 32 or c == "\\" for c in value):
        raise ValueError(f"must be an absolute path without '..' or control characters, got {value[:80]!r}")
    norm = posixpath.normpath(value)
    if norm == "/":
        raise ValueError("must not be / itself")
    return norm


class StepLimits(Strict):
    """Caps for each step's container (the docker runtime; proot cannot enforce them)."""

    memory: Annotated[str, _matching(r"[1-9][0-9]{0,5}[mg]", "a size like 48g or 512m")] | None = None
    cpus: Annotated[float, Field(gt=0, le=1024)] | None = None


class _KeyLogin(Strict):
    """An optional SSH key file, checked to exist and resolved against the spec's folder."""

    key_file: str | None = None
    _key_path: Path | None = PrivateAttr(default=None)

    @field_validator("key_file")
    @classmethod
    def _key_file_exists(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and not (_base_dir(info) / value).is_file():
            raise ValueError(f"key file not found: {_base_dir(info) / value}")
        return value

    @model_validator(mode="after")
    def _resolve_key(self, info: ValidationInfo) -> _KeyLogin:
        if self.key_file is not None:
            self._key_path = (_base_dir(info) / self.key_file).resolve()
        return self

    @property
    def key_path(self) -> Path | None:
        """The key file as an absolute path (the spec keeps it as written)."""
        return self._key_path


class SshProvider(_KeyLogin):
    """A host you already have, reached by SSH; there is no instance to create or power-cycle."""

    type: Literal["ssh"]
    host: HostName
    port: Annotated[int, Field(ge=1, le=65535)] = 22
    user: UserName = "root"
    password_env: EnvName | None = None
    data_dir: Annotated[str, AfterValidator(_remote_dir)] = "/root/runner-data"
    runtime: Literal["auto", "docker", "rootfs"] = "auto"
    limits: StepLimits = StepLimits()

    @model_validator(mode="after")
    def _one_way_to_log_in(self) -> SshProvider:
        if (self.key_file is None) == (self.password_env is None):
            raise ValueError("give exactly one of 'key_file' or 'password_env'")
        return self


InstanceId = Annotated[str, _matching(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}", "an instance ID like 3a8f0c1e2b")]
Seconds = Annotated[float, Field(gt=0, le=7 * 24 * 3600)]
HttpUrl = Annotated[str, _matching(r"https?://[A-Za-z0-9.:\[\]-]+(/[A-Za-z0-9._~/-]*)?", "an http(s) URL")]


class _RentedInstance(_KeyLogin):
    """What every AutoDL-style provider shares: which instance, where data lives, how long to wait."""

    instance: InstanceId | None = None
    data_dir: Annotated[str, AfterValidator(_remote_dir)] = "/root/autodl-tmp"
    runtime: Literal["auto", "docker", "rootfs"] = "auto"
    limits: StepLimits = StepLimits()
    boot_timeout_s: Seconds = 600
    gpu_wait_s: Seconds = 1800
    api_timeout_s: Annotated[float, Field(gt=0, le=600)] = 30  # one API call, before it is retried


class AutodlCreate(Strict):
    """A new instance's settings: `image` for an ordinary (console) instance; the rest for Pro."""

    image: str | None = None
    gpu_spec_uuid: str | None = None
    image_uuid: str | None = None
    data_center_list: tuple[str, ...] = ()
    req_gpu_amount: Annotated[int, Field(ge=1, le=8)] = 1

    def pro_body(self) -> dict:
        body = {"gpu_spec_uuid": self.gpu_spec_uuid, "image_uuid": self.image_uuid}
        body |= {"data_center_list": list(self.data_center_list), "req_gpu_amount": self.req_gpu_amount}
        return {key: value for key, value in body.items() if value}


class AutodlProvider(_RentedInstance):
    """AutoDL: ordinary instances through the console API (no-GPU set-up boots), or Pro instances
    through the developer API (GPU boots only)."""

    type: Literal["autodl"]
    api: Literal["console", "pro"] = "console"
    url: HttpUrl | None = None
    token_env: EnvName = "AUTODL_TOKEN"
    create: AutodlCreate | None = None

    @model_validator(mode="after")
    def _instance_or_create(self) -> AutodlProvider:
        if (self.instance is None) == (self.create is None):
            raise ValueError("give exactly one of 'instance' (reuse) or 'create' (a new one)")
        return self


class AwsProvider(_RentedInstance):
    """One EC2 instance on one EBS root volume: set-up on a CPU type, training on a GPU type."""

    type: Literal["aws"]
    region: Annotated[str, _matching(r"[a-z]{2}(-[a-z]+)+-[0-9]", "an AWS region like us-east-1")]
    ami: Annotated[str, _matching(r"ami-[0-9a-f]{8,17}", "an AMI ID like ami-0abc1234")] | None = None
    key_name: Annotated[str, StringConstraints(min_length=1, max_length=255)] | None = None
    security_group_ids: tuple[Annotated[str, _matching(r"sg-[0-9a-f]{8,17}", "sg-...")], ...] = ()
    subnet_id: Annotated[str, _matching(r"subnet-[0-9a-f]{8,17}", "subnet-...")] | None = None
    cpu_type: Annotated[str, _matching(r"[a-z0-9]+\.[a-z0-9]+", "an instance type like t3.large")] = (
        "t3.large"
    )
    gpu_type: Annotated[str, _matching(r"[a-z0-9]+\.[a-z0-9]+", "an instance type like g5.xlarge")] = (
        "g5.xlarge"
    )
    root_volume_gb: Annotated[int, Field(ge=8, le=16384)] = 100
    ssh_user: UserName = "ubuntu"
    endpoint_url: HttpUrl | None = None
    data_dir: Annotated[str, AfterValidator(_remote_dir)] = "/home/ubuntu/runner-data"

    @model_validator(mode="after")
    def _can_create_and_log_in(self) -> AwsProvider:
        if self.key_file is None:
            raise ValueError("give 'key_file': the private key of the instance's key pair, to log in")
        if self.instance is None and not (self.ami and self.key_name and self.security_group_ids):
            raise ValueError(
                "to create an instance give 'ami', 'key_name' and 'security_group_ids' (or 'instance')"
            )
        if self.cpu_type == self.gpu_type:
            raise ValueError("'cpu_type' and 'gpu_type' must differ")
        return self

    def aws_settings(self):
        """The settings infra.aws works with (imported there, so boto3 stays out of validation)."""
        from infra.aws import AwsSettings

        return AwsSettings(
            region=self.region,
            ami=self.ami or "",
            key_name=self.key_name or "",
            security_group_ids=self.security_group_ids,
            cpu_type=self.cpu_type,
            gpu_type=self.gpu_type,
            root_volume_gb=self.root_volume_gb,
            subnet_id=self.subnet_id,
            ssh_user=self.ssh_user,
            endpoint_url=self.endpoint_url,
            api_timeout_s=self.api_timeout_s,
        )


class EmulatorProvider(_RentedInstance):
    """The local AutoDL-style emulator (`runner emulator up`): rehearse a job before paying."""

    type: Literal["emulator"]


PROVIDER_TYPES = ("local", "ssh", "autodl", "emulator", "aws")
ProviderSettings = Annotated[
    LocalProvider | SshProvider | AutodlProvider | EmulatorProvider | AwsProvider, Field(discriminator="type")
]


class ImageBuild(Strict):
    context: str = "."
    dockerfile: str = "Dockerfile"
    args: dict[EnvName, str] = Field(default_factory=dict)
    tag: ImageTag | None = None

    @field_validator("context")
    @classmethod
    def _context_is_a_folder(cls, value: str, info: ValidationInfo) -> str:
        folder = _base_dir(info) / value
        if not folder.is_dir():
            raise ValueError(f"build context folder not found: {folder}")
        return value

    @model_validator(mode="after")
    def _dockerfile_exists(self, info: ValidationInfo) -> ImageBuild:
        dockerfile = _base_dir(info) / self.context / self.dockerfile
        if not dockerfile.is_file():
            raise ValueError(f"dockerfile not found: {dockerfile}")
        return self


class ImageRegistry(Strict):
    """Where the instance fetches the image's public layers itself, so that only the layers no
    registry has travel from the laptop (see docs/remote.md, "Layer sources")."""

    enabled: bool = True
    base: BaseRef | None = None  # default: the Dockerfile's FROM, or image.ref
    mirrors: list[MirrorUrl] = Field(default_factory=list, max_length=16)  # tried first, in order
    insecure: list[RegistryHost] = Field(default_factory=list, max_length=16)  # plain-HTTP registries
    username_env: EnvName | None = None
    password_env: EnvName | None = None
    parallel: int = Field(4, ge=1, le=16)  # layers fetched at once

    @model_validator(mode="after")
    def _credentials_in_pairs(self) -> ImageRegistry:
        if (self.username_env is None) != (self.password_env is None):
            raise ValueError("give both username_env and password_env, or neither")
        return self


class ImageSpec(Strict):
    """Either build from a Dockerfile or use an image pinned by digest (exactly one)."""

    build: ImageBuild | None = None
    ref: ImageRef | None = None
    registry: ImageRegistry = Field(default_factory=ImageRegistry)

    @model_validator(mode="after")
    def _exactly_one(self) -> ImageSpec:
        if (self.build is None) == (self.ref is None):
            raise ValueError("give exactly one of 'build' or 'ref'")
        return self


class InputFile(Strict):
    """A local file copied into the job's data folder (mounted at /data)."""

    src: str
    dest: str | None = None
    sha256: Sha256 | None = None

    @field_validator("src")
    @classmethod
    def _src_is_a_file(cls, value: str, info: ValidationInfo) -> str:
        path = _base_dir(info) / value
        if not path.is_file():
            raise ValueError(f"input file not found: {path}")
        return value

    @field_validator("dest")
    @classmethod
    def _dest_stays_in_data(cls, value: str | None) -> str | None:
        return None if value is None else _relative_inside(value, "/data")

    @property
    def target(self) -> str:
        """Path relative to /data where the file lands."""
        return self.dest or Path(self.src).name


class Step(Strict):
    """A setup command, run in the container in no-GPU mode before training."""

    name: Name
    run: Script
    env: dict[EnvName, str] = Field(default_factory=dict)
    secrets: Annotated[tuple[EnvName, ...], Field(max_length=64)] = ()


class TrainSpec(Strict):
    run: Script
    gpus: Annotated[int, Field(ge=0, le=16)] = 1
    env: dict[EnvName, str] = Field(default_factory=dict)
    secrets: Annotated[tuple[EnvName, ...], Field(max_length=64)] = ()
    metrics: OutPath = f"{OUT_ROOT}/metrics.jsonl"

    @field_validator("metrics")
    @classmethod
    def _metrics_is_a_file(cls, value: str) -> str:
        if value == OUT_ROOT:
            raise ValueError(f"must name a file under {OUT_ROOT}")
        return value


class Pricing(Strict):
    """What each power mode costs per hour (used for estimates and the ledger)."""

    currency: Currency = "CNY"
    cpu_per_hour: Money = 0.0
    gpu_per_hour: Money = 0.0


class Budget(Strict):
    """Spending caps. Checked before anything is paid for, from the expected hours and the
    rates; enforced during the run by the watchdog on the host, which stops the trainer at the
    cap (SIGTERM, so it can checkpoint) and powers off; the run then ends with exit code 4."""

    max_cost: Money | None = None
    max_gpu_hours: Annotated[float, Field(gt=0, le=10000)] | None = None
    max_hourly_price: Money | None = None
    expected_gpu_hours: Annotated[float, Field(ge=0, le=10000)] | None = None  # for the estimate
    expected_cpu_hours: Annotated[float, Field(ge=0, le=10000)] | None = None


class Watchdog(Strict):
    """The guard started on the host next to the trainer (remote_scripts/watchdog.py): it powers
    a rented instance off as soon as training ends, and stops a stuck or abandoned run."""

    stall_s: Seconds | None = 1800  # no new step in train.metrics for this long: stop the run
    heartbeat_s: Seconds | None = None  # the laptop silent this long: stop the run (opt-in)
    grace_s: Seconds = 60  # after SIGTERM, time for the trainer to checkpoint before SIGKILL
    interval_s: Annotated[float, Field(ge=0.2, le=300)] = 5


class Shutdown(Strict):
    """What happens to the instance after the run: stop billing (default), release it, or keep it."""

    after: Literal["stop", "release", "keep"] = "stop"


class JobSpec(Strict):
    version: Literal[1] = SPEC_VERSION
    name: Name
    provider: ProviderSettings
    image: ImageSpec
    inputs: Annotated[tuple[InputFile, ...], Field(max_length=1000)] = ()
    setup: Annotated[tuple[Step, ...], Field(max_length=64)] = ()
    train: TrainSpec
    outputs: Annotated[tuple[OutPath, ...], Field(min_length=1, max_length=1000)]
    pricing: Pricing = Pricing()
    budget: Budget = Budget()
    watchdog: Watchdog = Watchdog()
    shutdown: Shutdown = Shutdown()

    @field_validator("setup")
    @classmethod
    def _unique_step_names(cls, value: tuple[Step, ...]) -> tuple[Step, ...]:
        names = [step.name for step in value]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"step names must be unique; repeated: {', '.join(repeated)}")
        return value

    @field_validator("inputs")
    @classmethod
    def _unique_input_targets(cls, value: tuple[InputFile, ...]) -> tuple[InputFile, ...]:
        targets = [item.target for item in value]
        repeated = sorted({t for t in targets if targets.count(t) > 1})
        if repeated:
            raise ValueError(f"two inputs land on the same path: {', '.join(repeated)}")
        nested = sorted({t for t in targets for o in targets if o.startswith(t + "/")})
        if nested:
            raise ValueError(f"an input lands on a folder another input needs: {', '.join(nested)}")
        return value

    @model_validator(mode="after")
    def _price_within_budget(self) -> JobSpec:
        cap = self.budget.max_hourly_price
        if cap is not None and self.pricing.gpu_per_hour > cap:
            raise ValueError(
                f"budget.max_hourly_price {cap} {self.pricing.currency}/h is below "
                f"pricing.gpu_per_hour {self.pricing.gpu_per_hour}"
            )
        return self

    @model_validator(mode="after")
    def _caps_need_a_watchdog(self) -> JobSpec:
        if self.provider.type == "local" and (self.budget.max_cost or self.budget.max_gpu_hours):
            raise ValueError(
                "budget.max_cost and budget.max_gpu_hours are enforced by the watchdog on a remote"
                " host; the local provider has none (and bills nothing)"
            )
        return self

    @model_validator(mode="after")
    def _release_where_possible(self) -> JobSpec:
        provider = self.provider
        if self.shutdown.after == "release" and provider.type == "autodl" and provider.api == "console":
            raise ValueError(
                "shutdown.after: release is not possible through AutoDL's console API (release the"
                " instance in the console); use stop, or a Pro instance (provider.api: pro)"
            )
        return self


@dataclass(frozen=True)
class LoadedSpec:
    """A validated spec with where it came from (needed to resolve relative paths)."""

    spec: JobSpec
    path: Path
    sha256: str
    text: str

    @property
    def base_dir(self) -> Path:
        return self.path.parent

    def resolve(self, relative: str) -> Path:
        return (self.base_dir / relative).resolve()


def load_spec(path: str | Path) -> LoadedSpec:
    """Read and validate a job spec; raise SpecError listing every problem."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_SPEC_BYTES + 1)
    except OSError as exc:
        raise SpecError(f"{path}: cannot read job spec: {exc.strerror or exc}") from None
    if len(raw) > MAX_SPEC_BYTES:
        raise SpecError(f"{path}: job spec is over {MAX_SPEC_BYTES >> 20} MB: not a job spec")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise SpecError(f"{path}: job spec is not UTF-8 text") from None
    data, lines = _parse_yaml(path, text)
    try:
        spec = JobSpec.model_validate(data, context={"base_dir": path.parent.resolve()})
    except ValidationError as exc:
        problems = [_describe(path, error, lines) for error in _most_specific(exc.errors())]
        if len(problems) == 1:  # one line: `FILE:LINE: field: what is wrong`
            raise SpecError(problems[0]) from None
        raise SpecError(f"{path}: invalid job spec ({len(problems)} problems)", details=problems) from None
    return LoadedSpec(spec=spec, path=path.resolve(), sha256=hashlib.sha256(raw).hexdigest(), text=text)


class _SpecLoader(yaml.SafeLoader):
    """Safe YAML without anchors and aliases: a spec has no use for them, and aliases allow
    self-references and exponential expansion."""

    def compose_node(self, parent, index):  # noqa: ANN001, ANN201 (PyYAML's signature)
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise yaml.composer.ComposerError(None, None, "anchors and aliases are not allowed", mark)
        return super().compose_node(parent, index)


def _parse_yaml(path: Path, text: str) -> tuple[object, dict[tuple, int]]:
    """Parse YAML, keeping each value's line and refusing duplicated keys."""
    loader = _SpecLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            raise SpecError(f"{path}: job spec is empty")
        lines: dict[tuple, int] = {}
        _index_lines(path, node, (), lines)
        data = loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise SpecError(f"{where}: invalid YAML: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: invalid YAML: {exc}") from None
    finally:
        loader.dispose()
    if not isinstance(data, dict):
        raise SpecError(f"{path}:1: a job spec must be a mapping of fields, got {type(data).__name__}")
    return data, lines


def _index_lines(path: Path, node: yaml.Node, at: tuple, lines: dict[tuple, int]) -> None:
    lines[at] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key = key_node.value
            if key in seen:
                field = ".".join(str(p) for p in (*at, key))
                raise SpecError(f"{path}:{key_node.start_mark.line + 1}: {field}: key given twice")
            seen.add(key)
            _index_lines(path, value_node, (*at, key), lines)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _index_lines(path, item, (*at, index), lines)


def _describe(path: Path, error: dict, lines: dict[tuple, int]) -> str:
    loc = tuple(p for p in error["loc"] if not _is_union_tag(p))
    if loc[:1] == ("provider",) and loc[1:2] and loc[1] in PROVIDER_TYPES:
        loc = loc[:1] + loc[2:]  # the discriminated union's tag, not a field
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "union_tag_not_found":
        loc, message = (*loc, "type"), "required field is missing"
    elif error["type"] == "union_tag_invalid":
        loc, message = (
            (*loc, "type"),
            "Input should be "
            + ", ".join(f"'{t}'" for t in PROVIDER_TYPES[:-1])
            + f" or '{PROVIDER_TYPES[-1]}'",
        )
    elif error["type"] == "extra_forbidden":
        message = "unknown field"
    elif error["type"] == "missing":
        message = "required field is missing"
    field = ".".join(str(p) for p in loc) or "(top level)"
    line = next((lines[loc[:n]] for n in range(len(loc), -1, -1) if loc[:n] in lines), 1)
    return f"{path}:{line}: {field}: {message}"


def _most_specific(errors: list[dict]) -> list[dict]:
    """Drop an error about a whole container when one of its items already has an error."""
    locs = [tuple(e["loc"]) for e in errors]
    return [
        e
        for e, loc in zip(errors, locs, strict=True)
        if not any(o[: len(loc)] == loc and o != loc for o in locs)
    ]


def _is_union_tag(part: object) -> bool:
    return isinstance(part, str) and ("[" in part or part in {"str", "int", "float", "none"})


def _base_dir(info: ValidationInfo) -> Path:
    context = info.context or {}
    return Path(context.get("base_dir", "."))


def _relative_inside(value: str, root: str) -> str:
    """A normalised relative path naming a file inside root (not root itself)."""
    if not value or value.startswith("/") or any(c in value for c in "\\\x00\n\r"):
        raise ValueError(f"must be a relative path inside {root}")
    if ".." in value.split("/"):
        raise ValueError(f"must stay inside {root}: '..' is not allowed")
    norm = posixpath.normpath(value)
    if norm == ".":
        raise ValueError(f"must name a file inside {root}, not {root} itself")
    return norm
