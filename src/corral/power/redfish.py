"""The ``redfish`` driver: a BMC's Redfish service, through the sushy library.

One node's operation is a handful of HTTP requests, each on a connection of its own (as
sushy asks): the service root, the system (whose power state and allowed resets come
with it), the boot override when asked, the reset, and the system again for the state it
reports afterwards. HTTP basic authentication rather than a Redfish session: a session
would add two requests, and one left behind when the deadline cuts a node short holds one
of the few session slots a BMC has until it expires.

Every request is bounded by what is left of the node's deadline, and sushy is asked not
to retry on its own (its default is several tries seconds apart), so that an unreachable
BMC costs one connection timeout, and the deadline is the caller's.

- on: ``On`` unless the system is on already; off: ``ForceOff`` unless it is off;
- cycle: ``ForceRestart`` (else ``PowerCycle``) when it is on, ``On`` when it is off;
- netboot: ``BootSourceOverrideTarget=Pxe`` with ``BootSourceOverrideEnabled=Once``.

sushy's exceptions are translated where they are raised: no connection, no answer in
time, 401/403, an error answer (its Redfish message), a system that does not exist.
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import urlsplit

from corral.power.model import (
    AUTH,
    BMC_ERROR,
    CONFIG,
    TIMEOUT,
    UNREACHABLE,
    Answer,
    Bmc,
    Deadline,
    Driver,
    PowerContext,
    PowerFailure,
)

#: Seconds for a TCP connection to a BMC at most (a BMC on the same network answers in
#: milliseconds; what does not answer in this long is not there).
CONNECT_TIMEOUT = 5.0
SYSTEMS = "/redfish/v1/Systems/"


def redfish_url(address: str) -> str:
    """The base URL (scheme://host[:port]) of a redfish address: a URL or a host (https).
    A ValueError names what is wrong."""
    text = address.strip()
    parts = urlsplit(text if "://" in text else f"https://{text}")
    if parts.scheme not in ("http", "https"):
        raise ValueError(
            f"power.address '{address}': a Redfish URL starts with https:// or http://"
        )
    if parts.username or parts.password:
        raise ValueError(
            f"power.address '{address}' holds a user: set power.user and power.password instead"
        )
    try:
        port = parts.port
    except ValueError:
        port = -1
    if not parts.hostname or port == -1 or any(c.isspace() for c in text):
        raise ValueError(f"power.address '{address}' is not a URL or host[:port] of a BMC")
    return f"{parts.scheme}://{parts.netloc}"


def system_path(system: str) -> str:
    return system if system.startswith("/") else SYSTEMS + system.strip("/")


def _state(value: Any) -> str | None:
    text = str(getattr(value, "value", value or ""))
    return {"On": "on", "Paused": "on", "Off": "off"}.get(text)


class RedfishDriver(Driver):
    name = "redfish"

    def run(
        self, bmc: Bmc, action: str, *, netboot: bool, deadline: Deadline, context: PowerContext
    ) -> Answer:
        url = redfish_url(bmc.address or "")
        try:
            return self._run(url, bmc, action, netboot, deadline)
        except PowerFailure:
            raise
        except Exception as exc:
            raise _failure(exc, url, bmc, deadline) from exc

    def _run(self, url: str, bmc: Bmc, action: str, netboot: bool, deadline: Deadline) -> Answer:
        import sushy
        from sushy.auth import BasicAuth

        # Each failure is told once, in its node's Outcome, not by sushy's log as well.
        logging.getLogger("sushy").setLevel(logging.CRITICAL)
        left = deadline.left(f"BMC {url}")
        root = sushy.Sushy(
            url,
            auth=BasicAuth(username=bmc.user, password=bmc.password),
            verify=bmc.verify_tls,
            read_timeout=left,
            connect_timeout=min(left, CONNECT_TIMEOUT),
            server_side_retries=1,  # one try (sushy reads 0 as "its default")
            server_side_retries_delay=1,
        )
        deadline.left(f"BMC {url}")
        system = root.get_system(system_path(bmc.system) if bmc.system else None)
        state = _state(system.power_state)
        if action == "status":
            return Answer(state)
        note = None
        if netboot and action in ("on", "cycle"):
            note = self._netboot(system, url)
        reset = self._reset(system, action, state)
        if reset is None:
            return Answer(state, note)
        deadline.left(f"BMC {url}")
        system.reset_system(reset)
        deadline.left(f"BMC {url}")
        system.refresh()
        return Answer(_state(system.power_state), note)

    def _reset(self, system: Any, action: str, state: str | None) -> Any:
        """The reset type for ``action`` on a system in ``state``; None: nothing to do."""
        from sushy import ResetType

        if action == "on":
            return None if state == "on" else ResetType.ON
        if action == "off":
            return None if state == "off" else ResetType.FORCE_OFF
        if state == "off":
            return ResetType.ON
        allowed = system.get_allowed_reset_system_values()
        for reset in (ResetType.FORCE_RESTART, ResetType.POWER_CYCLE):
            if reset in allowed:
                return reset
        names = ", ".join(sorted(r.value for r in allowed)) or "none"
        raise PowerFailure(
            BMC_ERROR, f"BMC {system.path} allows no restart (ForceRestart, PowerCycle): {names}"
        )

    def _netboot(self, system: Any, url: str) -> str | None:
        """Boot from the network once; a note when the BMC does not take it."""
        from sushy import BootSource, BootSourceOverrideEnabled
        from sushy.exceptions import HTTPError, InvalidParameterValueError

        try:
            system.set_system_boot_options(
                target=BootSource.PXE, enabled=BootSourceOverrideEnabled.ONCE
            )
        except (HTTPError, InvalidParameterValueError) as exc:
            return (
                f"BMC {url} did not take the network boot device ({_message(exc)}); the node"
                " boots from its usual device"
            )
        return None


def _message(exc: Any) -> str:
    detail = getattr(exc, "detail", None)
    code = getattr(exc, "status_code", None)
    text = str(detail or getattr(exc, "message", None) or exc)
    text = " ".join(text.split())
    return f"HTTP {code}: {text}" if code else text


def _failure(exc: Exception, url: str, bmc: Bmc, deadline: Deadline) -> PowerFailure:
    """sushy's (or requests') exception as a PowerFailure."""
    from requests import exceptions as http
    from sushy import exceptions as rf

    if isinstance(exc, rf.AccessError):
        if exc.status_code == 403:
            return PowerFailure(
                AUTH, f"BMC {url} forbids user '{bmc.user}' this (HTTP 403): give it power control"
            )
        return PowerFailure(AUTH, f"BMC {url} refused the user or password (user '{bmc.user}')")
    if isinstance(exc, rf.ResourceNotFoundError):
        which = system_path(bmc.system) if bmc.system else "the system"
        return PowerFailure(
            BMC_ERROR,
            f"BMC {url} has no {which} (HTTP 404): set power.system to one in {SYSTEMS}",
        )
    if isinstance(exc, rf.UnknownDefaultError):
        return PowerFailure(
            CONFIG, f"BMC {url} has several systems: set power.system to this node's (in {SYSTEMS})"
        )
    if isinstance(exc, rf.HTTPError | rf.InvalidParameterValueError | rf.MissingAttributeError):
        return PowerFailure(BMC_ERROR, f"BMC {url} answered with an error: {_message(exc)}")
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, http.RequestException):
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, http.SSLError):
        return PowerFailure(
            CONFIG if "CERTIFICATE_VERIFY_FAILED" in str(cause) else UNREACHABLE,
            f"TLS with BMC {url} failed ({_message(cause)}): trust its certificate, or set"
            " power.verify_tls false",
        )
    if isinstance(cause, http.Timeout):
        return PowerFailure(TIMEOUT, f"BMC {url} did not answer within {deadline.elapsed():.0f} s")
    if isinstance(cause, http.ConnectionError):
        text = str(cause)
        if "NameResolution" in text or "Name or service not known" in text:
            return PowerFailure(
                UNREACHABLE, f"BMC address {url} does not resolve: fix power.address"
            )
        if "Connection refused" in text:
            return PowerFailure(UNREACHABLE, f"BMC {url} refused the connection: is it Redfish?")
        return PowerFailure(UNREACHABLE, f"BMC {url} cannot be reached: {_short(text)}")
    if isinstance(exc, rf.SushyError):
        return PowerFailure(BMC_ERROR, f"BMC {url}: {_message(exc)}")
    raise exc


def _short(text: str) -> str:
    """The end of requests' long nested messages: the part that says what happened."""
    last = text.rsplit(": ", 1)[-1]
    return " ".join(last.rstrip("')\"").split())[:160]
