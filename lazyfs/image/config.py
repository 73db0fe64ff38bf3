"""The image config kept with a published image: what ``lazyfs inspect`` shows and ``lazyfs run`` starts.

``lazyfs seed`` stores the image's config (the OCI/Docker config JSON, canonicalised) as
the manifest annotation :data:`CONFIG_ANNOTATION`.  :meth:`ImageConfig.from_manifest` reads
it back (``None`` for a tree that is not an image); the fields follow the config's
``config`` object (``Entrypoint``, ``Cmd``, ``Env``, ``WorkingDir``, ``User``, ...).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lazyfs.errors import ManifestError
from lazyfs.image.oci import CONFIG_ANNOTATION
from lazyfs.manifest import Manifest

__all__ = ["CONFIG_ANNOTATION", "ImageConfig"]


def _strings(v: Any) -> tuple[str, ...]:
    if isinstance(v, list) and all(isinstance(x, str) for x in v):
        return tuple(v)
    return ()


def _string(v: Any) -> str:
    return v if isinstance(v, str) else ""


@dataclass(frozen=True)
class ImageConfig:
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    env: tuple[str, ...] = ()  # "NAME=value", in the image's order
    working_dir: str = ""
    user: str = ""
    os: str = ""
    architecture: str = ""
    variant: str = ""
    stop_signal: str = ""
    exposed_ports: tuple[str, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)
    raw: Mapping[str, Any] = field(default_factory=dict)  # the whole config JSON

    @classmethod
    def from_json(cls, text: str | bytes) -> ImageConfig:
        try:
            raw = json.loads(text)
        except ValueError as exc:
            raise ManifestError(f"the image config is not valid JSON: {exc}") from exc
        if not isinstance(raw, dict):
            raise ManifestError("the image config is not a JSON object")
        c = raw.get("config")
        c = c if isinstance(c, dict) else {}
        labels = c.get("Labels")
        ports = c.get("ExposedPorts")
        return cls(
            entrypoint=_strings(c.get("Entrypoint")),
            cmd=_strings(c.get("Cmd")),
            env=_strings(c.get("Env")),
            working_dir=_string(c.get("WorkingDir")),
            user=_string(c.get("User")),
            os=_string(raw.get("os")),
            architecture=_string(raw.get("architecture")),
            variant=_string(raw.get("variant")),
            stop_signal=_string(c.get("StopSignal")),
            exposed_ports=tuple(sorted(k for k in ports if isinstance(k, str))) if isinstance(ports, dict) else (),
            labels={k: v for k, v in labels.items() if isinstance(k, str) and isinstance(v, str)}
            if isinstance(labels, dict)
            else {},
            raw=raw,
        )

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> ImageConfig | None:
        """The config published with ``manifest``; None when it is not an image."""
        for key, value in manifest.annotations:
            if key == CONFIG_ANNOTATION:
                return cls.from_json(value)
        return None

    def argv(self, command: Sequence[str] = ()) -> list[str]:
        """What a runtime starts: the entrypoint, then ``command`` or else the image's Cmd."""
        return [*self.entrypoint, *(command or self.cmd)]

    def environment(self) -> dict[str, str]:
        """``Env`` as a mapping (a later duplicate wins, as in runtimes)."""
        out: dict[str, str] = {}
        for item in self.env:
            name, _, value = item.partition("=")
            if name:
                out[name] = value
        return out

    @property
    def platform(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)

    def summary_lines(self) -> list[str]:
        """``Entrypoint: [...]``, ``Cmd: [...]``, one ``Env:`` line per variable, ``WorkingDir:``,
        ``User:`` (and the platform, ports, stop signal and labels when set): what inspect prints."""
        lines = []
        if self.platform:
            lines.append(f"Platform: {self.platform}")
        lines.append(f"Entrypoint: {json.dumps(list(self.entrypoint), ensure_ascii=False)}")
        lines.append(f"Cmd: {json.dumps(list(self.cmd), ensure_ascii=False)}")
        lines.extend(f"Env: {_one_line(e)}" for e in self.env)
        lines.append(f"WorkingDir: {_one_line(self.working_dir)}")
        lines.append(f"User: {_one_line(self.user)}")
        if self.exposed_ports:
            lines.append(f"ExposedPorts: {' '.join(self.exposed_ports)}")
        if self.stop_signal:
            lines.append(f"StopSignal: {_one_line(self.stop_signal)}")
        lines.extend(f"Label: {_one_line(k)}={_one_line(v)}" for k, v in sorted(self.labels.items()))
        return lines


def _one_line(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")
