"""``python -m engine.ansible_plugins``: print the line that lets plain Ansible find the plugins."""

from __future__ import annotations

import sys

from engine.ansible_plugins import export_line

sys.stdout.write(export_line() + "\n")
