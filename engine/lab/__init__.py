"""The device lab: simulated balenaOS devices with a real init and a real Docker engine.

``devices`` brings devices up and down (see its docstring for how a device is built),
``images`` builds the tiny local image set, ``faults`` injects field faults, ``cli`` is the
``remediate lab`` command.
"""

from __future__ import annotations

from engine.lab.devices import Device, Lab, missing_requirements

__all__ = ["Device", "Lab", "missing_requirements"]
