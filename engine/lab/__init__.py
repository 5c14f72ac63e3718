"""The device lab: simulated balenaOS devices with a real init and a real Docker engine.

``device`` is one running device as the host sees it (state, commands inside it, SSH);
``devices`` brings devices up and down (see its docstring for how a device is built);
``images`` builds the tiny local image set, the Supervisor stand-in's included; ``faults``
injects field faults; ``cli`` is the ``remediate lab`` command.  Imports flow one way:
``cli`` -> ``faults``/``devices`` -> ``images`` -> ``device``.
"""

from __future__ import annotations

from engine.lab.device import Device
from engine.lab.devices import Lab, missing_requirements

__all__ = ["Device", "Lab", "missing_requirements"]
