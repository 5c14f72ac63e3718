"""Environment variables every Ansible process the engine starts gets.

Both ways the engine runs Ansible use them: the executor's ``ansible-playbook`` runs
(:mod:`engine.executors.ansible`) and the target-selection script
(:func:`engine.targets.select_hosts`), so both read an inventory the same way.  This module
imports nothing: a stage can use it without loading ansible-runner.
"""

from __future__ import annotations

#: Make Ansible fail (instead of warning and going on with no hosts) on a bad inventory.
INVENTORY_ENV = {
    "ANSIBLE_INVENTORY_UNPARSED_FAILED": "True",
    "ANSIBLE_INVENTORY_ANY_UNPARSED_IS_FAILED": "True",
}
#: No colour codes in what Ansible prints (the engine parses and shows its messages).
PLAIN_OUTPUT_ENV = {
    "ANSIBLE_NOCOLOR": "True",
    "ANSIBLE_FORCE_COLOR": "False",
    "NO_COLOR": "1",
}
