"""Pure functions the kubelet uses: `$(VAR)` expansion, resource quantities, and the container → host rewriting.

Nothing here talks to the API or starts processes, so each rule can be read (and unit-tested) on its own.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

LOOPBACK = "127.0.0.1"


# --- $(VAR) expansion: a line-by-line port of k8s third_party/forked/golang/expansion/expand.go -------------------


def expand(text: str, env: Mapping[str, str]) -> str:
    """Expand `$(VAR)` like the kubelet: `$$` is a literal `$`, an undefined or unclosed reference stays as written."""
    out: list[str] = []
    checkpoint = 0
    cursor = 0
    while cursor < len(text):
        if text[cursor] == "$" and cursor + 1 < len(text):
            out.append(text[checkpoint:cursor])
            read, is_var, advance = _read_variable(text[cursor + 1 :])
            out.append(env.get(read, f"$({read})") if is_var else read)
            cursor += advance
            checkpoint = cursor + 1
        cursor += 1
    return "".join(out) + text[checkpoint:]


def _read_variable(rest: str) -> tuple[str, bool, int]:
    """(what to write, whether it is a variable name, how many characters after the `$` it consumed)."""
    if rest[0] == "$":  # `$$`: an escaped operator
        return "$", False, 1
    if rest[0] == "(":
        closer = rest.find(")", 1)
        if closer != -1:
            return rest[1:closer], True, closer + 1
        return "$(", False, 1  # incomplete reference: written as is
    return "$" + rest[0], False, 1  # a `$` that starts no expression


# --- resource quantities and resourceFieldRef -----------------------------------------------------------------------

_QUANTITY = re.compile(r"^([+-]?(?:\d+\.?\d*|\.\d+))(?:([eE][+-]?\d+)|(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E)?)$")
_SUFFIX: dict[str, Fraction] = {
    "": Fraction(1), "n": Fraction(1, 10**9), "u": Fraction(1, 10**6), "m": Fraction(1, 1000),
    "k": Fraction(10**3), "M": Fraction(10**6), "G": Fraction(10**9), "T": Fraction(10**12),
    "P": Fraction(10**15), "E": Fraction(10**18), "Ki": Fraction(2**10), "Mi": Fraction(2**20),
    "Gi": Fraction(2**30), "Ti": Fraction(2**40), "Pi": Fraction(2**50), "Ei": Fraction(2**60),
}  # fmt: skip


def quantity(text: str | int | float) -> Fraction:
    """A Kubernetes resource quantity ("500m", "2", "1Gi", "1e3") as an exact number."""
    match = _QUANTITY.match(str(text).strip())
    if not match:
        raise ValueError(f"not a Kubernetes quantity: {text!r}")
    number, exponent, suffix = match.groups()
    scale = Fraction(10) ** int(exponent[1:]) if exponent else _SUFFIX[suffix or ""]
    return Fraction(number) * scale


def node_capacity(resource: str) -> Fraction:
    """What the kubelet substitutes for a missing limit: the node's allocatable amount (here: this machine)."""
    if resource == "cpu":
        return Fraction(os.cpu_count() or 1)
    if resource == "memory":
        return Fraction(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    return Fraction(0)


def resource_value(container: Mapping[str, object], ref: Mapping[str, object]) -> str:
    """`valueFrom.resourceFieldRef` as the kubelet computes it: ceil(amount / divisor), CPU in whole millicores.

    A missing limit is the node's capacity; a missing request is the limit (API defaulting) or zero.
    """
    kind, _, name = str(ref["resource"]).partition(".")
    resources = container.get("resources") or {}
    assert isinstance(resources, Mapping)
    limits, requests = resources.get("limits") or {}, resources.get("requests") or {}
    if kind == "limits":
        amount = quantity(limits[name]) if name in limits else node_capacity(name)
    else:
        amount = quantity(requests.get(name, limits.get(name, 0)))
    divisor = quantity(str(ref.get("divisor") or "1"))
    if name == "cpu":  # the kubelet divides milli-values, each rounded up first
        return str(math.ceil(Fraction(math.ceil(amount * 1000)) / math.ceil(divisor * 1000)))
    return str(math.ceil(Fraction(math.ceil(amount)) / math.ceil(divisor)))


# --- container → host rewriting -------------------------------------------------------------------------------------

# A path starts where no path character precedes it, and ends where no name character follows (`/` may follow).
_PATH_BEFORE = r"(?:^|(?<=[^\w./-]))"
_PATH_AFTER = r"(?=$|[^\w.-])"
# A host name starts at the beginning, after a non-name character, or right after `//` (a URL's authority).
_HOST_BEFORE = r"(?:^|(?<=[^\w./-])|(?<=//)|(?<=@))"
_LABEL = r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?"


@dataclass
class Rewriter:
    """Turns one container's view of the world into the host's, for its args, command, env and mounted files.

    - `paths`: container path → local path (mount points, the termination-message file), longest prefix first,
      only at path boundaries: `/workspace/x` and `--out=/workspace` map, `/workspaces` and `/a/workspace` do not.
    - host names `<label>.<subdomain>[.<namespace>[.svc[.cluster.local]]]` of the given `subdomains` →
      127.0.0.1, and a `:<port>` after such a name → `port_for(namespace, subdomain, port)`.
    - a whole value equal to one of `declared` ports, or `localhost:<declared>` / `127.0.0.1:<declared>` →
      `own_port(port)`: the loopback port this pod listens on in place of its containerPort.
    """

    paths: Mapping[str, Path] = field(default_factory=dict)
    subdomains: frozenset[str] = frozenset()
    namespace: str = ""
    declared: frozenset[int] = frozenset()
    port_for: Callable[[str, str, int], int] = lambda _ns, _sub, port: port
    own_port: Callable[[int], int] = lambda port: port

    def __post_init__(self) -> None:
        mounts = sorted((p.rstrip("/") for p in self.paths if p.rstrip("/")), key=len, reverse=True)
        self._local = {p.rstrip("/"): str(local) for p, local in self.paths.items() if p.rstrip("/")}
        self._path_re = (
            re.compile(_PATH_BEFORE + "(" + "|".join(map(re.escape, mounts)) + ")" + _PATH_AFTER) if mounts else None
        )
        subs = "|".join(map(re.escape, sorted(self.subdomains, key=len, reverse=True)))
        self._host_re = (
            re.compile(
                _HOST_BEFORE + rf"{_LABEL}\.(?P<sub>{subs})(?:\.(?P<ns>{_LABEL})(?:\.svc(?:\.cluster\.local)?)?)?"
                r"(?::(?P<port>\d+))?(?=$|[^\w.-])"
            )
            if subs
            else None
        )
        self._self_re = re.compile(_HOST_BEFORE + r"(?P<host>localhost|127\.0\.0\.1):(?P<port>\d+)(?=$|[^\w.-])")
        locals_ = sorted(self._local.items(), key=lambda item: len(item[1]), reverse=True)
        self._mount_of = {local.rstrip("/"): mount for mount, local in locals_}
        self._back_re = (
            re.compile("(" + "|".join(re.escape(local) for local in self._mount_of) + ")" + _PATH_AFTER)
            if locals_ else None
        )

    def path(self, text: str) -> str:
        """Container paths → local paths (for mounted ConfigMap files: only paths, not hosts or ports)."""
        if self._path_re is None:
            return text
        return self._path_re.sub(lambda m: self._local[m.group(1)], text)

    def back(self, text: str) -> str:
        """Local paths → the container's own paths: what the process would have written had it seen only
        its mounts (the kubelet reports a termination message in the container's terms)."""
        if self._back_re is None:
            return text
        return self._back_re.sub(lambda m: self._mount_of[m.group(1)], text)

    def value(self, text: str) -> str:
        """An arg, a command word or an env value: hosts and ports first, then paths, each rewritten once."""
        if text.isdigit() and int(text) in self.declared:
            return str(self.own_port(int(text)))
        text = self._self_re.sub(self._self_port, text)
        if self._host_re is not None:
            text = self._host_re.sub(self._host, text)
        return self.path(text)

    def _self_port(self, match: re.Match[str]) -> str:
        port = int(match.group("port"))
        return f"{LOOPBACK}:{self.own_port(port)}" if port in self.declared else match.group(0)

    def _host(self, match: re.Match[str]) -> str:
        port = match.group("port")
        if port is None:
            return LOOPBACK
        namespace = match.group("ns") or self.namespace
        return f"{LOOPBACK}:{self.port_for(namespace, match.group('sub'), int(port))}"
