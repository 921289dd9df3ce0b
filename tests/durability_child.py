"""The process ``tests/test_durability.py`` kills: it writes to a store until SIGKILL.

``python -m tests.durability_child STORE_URL JOURNAL QUOTA_KEY_ID SEED`` opens the store,
then creates keys, revokes some of them and charges the quota of the key ``QUOTA_KEY_ID``,
in a random order, forever. Each operation is appended to ``JOURNAL`` as soon as the call
returns (``created <key_id> <digest>``, ``revoked <key_id>``, ``charged``), in one
``write`` each, so that a line in the journal is an acknowledged operation; a charge is
announced (``charging``) before the call, since a kill may land after it has counted.
No key is ever written anywhere: the test checks records by ``key_id`` and digest.
"""

from __future__ import annotations

import os
import random
import sys

from keyguard import APIKeyManager


def main(url: str, journal: str, quota_key_id: str, seed: int) -> None:
    rng = random.Random(seed)
    manager = APIKeyManager.from_url(url, last_used_resolution=None, record_usage=False)
    quota_key = manager.get_key_info(quota_key_id)
    assert quota_key is not None and quota_key.quota is not None
    fd = os.open(journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def acknowledge(line: str) -> None:
        os.write(fd, f"{line}\n".encode())

    acknowledge("ready")
    active: list[str] = []
    while True:
        roll = rng.random()
        if roll < 0.2 and active:
            key_id = active.pop(rng.randrange(len(active)))
            if manager.revoke_by_id(key_id):
                acknowledge(f"revoked {key_id}")
        elif roll < 0.4:
            acknowledge("charging")
            usage = manager.charge(quota_key)
            assert usage is not None and usage.allowed
            acknowledge("charged")
        else:
            _, info = manager.create_key(user_id="durability")
            acknowledge(f"created {info.key_id} {info.digest}")
            active.append(info.key_id)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
