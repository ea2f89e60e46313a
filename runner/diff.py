"""What differs between two runs, from their manifests: the spec, the image and its layers,
the inputs, the trainer's configuration, the versions it ran with, the final metrics and the
artifacts. Run IDs, times and paths differ between any two runs and are left out."""

from __future__ import annotations

from dataclasses import dataclass

# Fields that name or time the run rather than say what it computed.
_IGNORED_SPEC = ("name",)


@dataclass(frozen=True)
class Difference:
    section: str
    key: str
    a: object
    b: object

    def to_dict(self) -> dict:
        return {"section": self.section, "key": self.key, "a": self.a, "b": self.b}

    def line(self) -> str:
        return f"{self.section:<9} {self.key}: {_shown(self.a)} -> {_shown(self.b)}"


def differences(a: dict, b: dict) -> list[Difference]:
    """Every difference between manifests a and b, section by section."""
    found: list[Difference] = []
    for section, view in _SECTIONS:
        left, right = flatten(view(a)), flatten(view(b))
        if section == "image" and left.get("id") == right.get("id"):
            continue  # the same content digest is the same image, however it was named or built
        for key in sorted(left.keys() | right.keys()):
            if left.get(key) != right.get(key):
                found.append(Difference(section, key, left.get(key), right.get(key)))
    return found


def flatten(value: object, prefix: str = "") -> dict[str, object]:
    """Nested mappings as dotted keys (lists of scalars stay values; lists of mappings are
    keyed by position)."""
    if isinstance(value, dict):
        flat: dict[str, object] = {}
        for key, item in value.items():
            flat.update(flatten(item, f"{prefix}{key}."))
        return flat
    if isinstance(value, list) and any(isinstance(item, dict) for item in value):
        flat = {}
        for index, item in enumerate(value):
            flat.update(flatten(item, f"{prefix}{index}."))
        return flat
    return {prefix[:-1]: value} if prefix else {"": value}


def _spec(m: dict) -> dict:
    spec = dict(m.get("job", {}).get("spec") or {})
    for key in _IGNORED_SPEC:
        spec.pop(key, None)
    return spec


def _image(m: dict) -> dict:
    image = m.get("image") or {}
    main, base = image.get("image") or {}, image.get("base") or {}
    return {
        "id": main.get("id"),
        "repo_digests": main.get("repo_digests"),
        "layers": {f"{i:03d}": layer for i, layer in enumerate(main.get("layers") or [])},
        "base": base.get("id"),
        "build_args": image.get("build_args"),
    }


def _inputs(m: dict) -> dict:
    """Inputs by their place under /data, downloads by the path they were fetched to."""
    found = {item["dest"]: item["sha256"] for item in m.get("inputs", [])}
    found |= {item["path"]: item["sha256"] for item in m.get("downloads") or []}
    return found


def _trainer(m: dict) -> dict:
    config = dict((m.get("trainer") or {}).get("config") or {})
    config.pop("out_dir", None)
    return config


def _versions(m: dict) -> dict:
    return {
        "runner": m.get("runner"),
        "source": m.get("source"),
        "environment": (m.get("trainer") or {}).get("environment"),
    }


def _metrics(m: dict) -> dict:
    return (m.get("metrics") or {}).get("final") or {}


def _artifacts(m: dict) -> dict:
    return {item["path"]: item["sha256"] for item in m.get("artifacts", [])}


_SECTIONS = (
    ("spec", _spec),
    ("image", _image),
    ("inputs", _inputs),
    ("trainer", _trainer),
    ("versions", _versions),
    ("metrics", _metrics),
    ("artifacts", _artifacts),
)


def _shown(value: object) -> str:
    if value is None:
        return "(none)"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
