"""A real djangorestframework-api-key database, made by Django in a process of its own.

Django's settings are global to a process, so ``tests/test_imports.py`` never configures
Django itself: it runs this module.

``python -m tests.drf_child create DATABASE OUT`` migrates a fresh database (a SQLite file,
or a ``postgresql://`` DSN with ``#schema`` after it) and creates keys with
``APIKey.objects.create_key``: ``alice`` and ``bob``, ``revoked``, ``expired`` (a day ago),
``later`` (expires in 30 days) and ``legacy``, whose hash is then replaced by the salted
PBKDF2 hash of Django's ``make_password``, as drf-api-key before 3.0 stored keys. It
writes ``{"keys": {name: key}, "prefixes": {name: prefix}}`` as JSON to ``OUT``.

``python -m tests.drf_child use DATABASE KEY`` asks drf-api-key whether ``KEY`` is valid,
as a request would: a valid key with a legacy hash is rehashed with SHA-512.
"""

from __future__ import annotations

import json
import sys
from datetime import timedelta
from typing import Any

import django
from django.conf import settings
from django.contrib.auth.hashers import make_password
from django.core.management import call_command
from django.utils import timezone


def configure(database: str) -> None:
    """Point Django at ``database`` and migrate it."""
    if database.startswith("postgresql://"):
        from psycopg.conninfo import conninfo_to_dict

        dsn, _, schema = database.partition("#")
        parts = conninfo_to_dict(dsn)
        engine: dict[str, Any] = {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": parts.get("dbname", ""),
            "USER": parts.get("user", ""),
            "PASSWORD": parts.get("password", ""),
            "HOST": parts.get("host", ""),
            "PORT": parts.get("port", ""),
            "OPTIONS": {"options": f"-c search_path={schema}"},
        }
    else:
        engine = {"ENGINE": "django.db.backends.sqlite3", "NAME": database}
    settings.configure(
        DATABASES={"default": engine},
        INSTALLED_APPS=[
            "django.contrib.contenttypes",
            "django.contrib.auth",
            "rest_framework",
            "rest_framework_api_key",
        ],
        USE_TZ=True,
        SECRET_KEY="keyguard tests",
        DEFAULT_AUTO_FIELD="django.db.models.AutoField",
    )
    django.setup()
    call_command("migrate", verbosity=0)


def create(out: str) -> None:
    from rest_framework_api_key.models import APIKey

    now = timezone.now()
    made: dict[str, tuple[Any, str]] = {
        "alice": APIKey.objects.create_key(name="alice"),
        "bob": APIKey.objects.create_key(name="bob"),
        "revoked": APIKey.objects.create_key(name="revoked", revoked=True),
        "expired": APIKey.objects.create_key(name="expired", expiry_date=now - timedelta(1)),
        "later": APIKey.objects.create_key(name="later", expiry_date=now + timedelta(30)),
        "legacy": APIKey.objects.create_key(name="legacy"),
    }
    legacy, legacy_key = made["legacy"]
    legacy.hashed_key = make_password(legacy_key)  # Django's default hasher: PBKDF2
    legacy.save()
    assert legacy.hashed_key.startswith("pbkdf2_sha256$")
    for name in ("alice", "bob", "later"):
        assert APIKey.objects.is_valid(made[name][1]), name
    result = {
        "keys": {name: key for name, (_, key) in made.items()},
        "prefixes": {name: obj.prefix for name, (obj, _) in made.items()},
    }
    with open(out, "w", encoding="utf-8") as file:
        json.dump(result, file)


def use(key: str) -> None:
    from rest_framework_api_key.models import APIKey

    assert APIKey.objects.is_valid(key)


if __name__ == "__main__":
    command, database, argument = sys.argv[1:4]
    configure(database)
    if command == "create":
        create(argument)
    else:
        use(argument)
